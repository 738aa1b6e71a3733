"""The policy registry and the spec language.

A spec names a chain: policies joined by ``+``; each is ``name``, ``name:value`` (sets its first
parameter) or ``name:key=value,key=value``. Examples: ``clip_norm:1.0``, ``agc:0.01``,
``zclip:z_thresh=2.0,max_norm=5``, ``skip_nonfinite+zclip``. ``default`` expands to the recommended
chain. List values use ``|`` (``agc:exclude=head|fc*``). The grammar (splitting, typed values,
numbers written exactly) is :mod:`gradguard.specgrammar`, shared with the fault specs.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..errors import ConfigError, SpecError
from ..registries import InfoRecord, OptionInfo, options_of, summary_of
from ..specgrammar import Where, coerce, split_chain, split_term
from .base import Policy

_REGISTRY: dict[str, type[Policy]] = {}

#: The recommended chain (docs/policies.md says why): no threshold to tune. ``adaptive_clip``
#: clips the gradient norm relative to the run's own recent norms; ``update_clip`` bounds each
#: layer's update relative to its weights (the step, which clipping does not bound).
DEFAULT_SPEC = "skip_nonfinite+adaptive_clip+update_clip+lr_backoff"
#: Named chains a spec may use as a term, like ``default``. ``default_v1``: the default of
#: gradguard 0.x, whose fixed ``clip_norm:1.0`` backstop ignores the model's gradient scale.
NAMED_CHAINS = {
    "default": DEFAULT_SPEC,
    "default_v1": "skip_nonfinite+zclip+clip_norm:1.0",
}


def register(cls: type[Policy]) -> type[Policy]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(
            f"policy name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class PolicyInfo(InfoRecord):
    """One registered policy: its spec name, its class, its one-line summary (the docstring's
    first paragraph), its options (the constructor's parameters, with defaults and types) and
    its kind (``clip``, ``skip``, ``reset``, ``react``, ``update``, ``recover``)."""

    name: str
    cls: type[Policy]
    summary: str
    options: tuple[OptionInfo, ...]
    kind: str


def available_policies() -> list[str]:
    """Names of every registered policy, sorted."""
    return sorted(_REGISTRY)


def list_policies() -> list[str]:
    """Names of every registered policy, sorted (the same as ``available_policies()``)."""
    return available_policies()


def policy_infos() -> dict[str, PolicyInfo]:
    """Every registered policy's record by name, sorted by name."""
    return {name: policy_info(name) for name in available_policies()}


def policy_info(name: str) -> PolicyInfo:
    """The record of policy ``name``; an unknown name raises ``SpecError`` naming the valid ones."""
    cls = policy_class(name)
    options = options_of(cls.__init__, keyword_only=False, skip=("self",))
    return PolicyInfo(name, cls, summary_of(cls.__doc__), options, cls.kind)


def policy_class(name: str) -> type[Policy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(
            f"unknown policy {name!r}; valid policies: {', '.join(available_policies())} (or a named chain: {', '.join(NAMED_CHAINS)})"
        ) from None


def _parameters(cls: type[Policy]) -> list[inspect.Parameter]:
    return [p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"]


def _where(policy: str, pname: str) -> Where:
    # A policy's list drops empty items ("exclude=" is no layer); its counts fit a C size.
    return Where(policy, pname, drop_empty_items=True)


def make_policy(
    name: str, args: Sequence[str] = (), kwargs: dict[str, str] | None = None
) -> Policy:
    """Build one policy from its spec name and textual arguments."""
    cls = policy_class(name)
    params = _parameters(cls)
    hints = typing.get_type_hints(cls.__init__)
    names = [p.name for p in params]
    values: dict[str, Any] = {}
    if len(args) > 1:
        raise SpecError(
            f"{name}: only the first parameter can be given without a key; use key=value"
        )
    if args:
        if not params:
            raise SpecError(f"{name} takes no parameters")
        first = params[0].name
        values[first] = coerce(args[0], hints.get(first, str), _where(name, first))
    for k, v in (kwargs or {}).items():
        if k not in names:
            valid = ", ".join(names) if names else "none"
            raise SpecError(f"{name}: unknown parameter {k!r}; valid parameters: {valid}")
        if k in values:
            raise SpecError(f"{name}: parameter {k!r} given twice")
        values[k] = coerce(v, hints.get(k, str), _where(name, k))
    try:
        return cls(**values)
    except (TypeError, ValueError, OverflowError) as e:  # SpecError included: prefix the name
        raise SpecError(f"{name}: {e}") from None


def parse_one(text: str) -> Policy:
    text = text.strip()
    if not text:
        raise SpecError(
            "empty policy in spec; write policies joined by '+', e.g. 'skip_nonfinite+zclip'"
        )
    term = split_term(text)
    name = term.name
    if not term.colon:
        return make_policy(name)
    if not term.items:
        raise SpecError(f"{name}: nothing after ':'; write {name}:VALUE or {name}:key=value")
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for item in term.items:
        if item.key is not None:
            if not item.key:
                raise SpecError(f"{name}: missing parameter name in {item.text!r}")
            if item.key in kwargs:
                raise SpecError(f"{name}: parameter {item.key!r} given twice")
            kwargs[item.key] = item.value
        elif kwargs:
            raise SpecError(
                f"{name}: positional value {item.text!r} after key=value; only the first value may omit its key"
            )
        else:
            args.append(item.value)
    return make_policy(name, args, kwargs)


def parse_spec(spec: str | Policy | Iterable[str | Policy] | None) -> list[Policy]:
    """Turn a spec string, a policy, or a list of either into a list of fresh policies."""
    if spec is None:
        spec = DEFAULT_SPEC
    if isinstance(spec, str) and spec.strip() in NAMED_CHAINS:
        spec = NAMED_CHAINS[spec.strip()]
    if isinstance(spec, Policy):
        return [spec]
    if isinstance(spec, str):
        if not spec.strip():
            raise SpecError("empty policy spec; use 'default', 'none' or e.g. 'clip_norm:1.0'")
        if spec.strip() == "none":
            return []
        out: list[Policy] = []
        for part in split_chain(spec):
            name = part.strip()
            out.extend(
                parse_spec(NAMED_CHAINS[name]) if name in NAMED_CHAINS else [parse_one(part)]
            )
        return out
    out = []
    try:
        items = list(spec)
    except TypeError:
        raise SpecError(
            f"policy must be a spec string, a Policy or a list of them, not {type(spec).__name__}"
        ) from None
    for item in items:
        if isinstance(item, (str, Policy)):
            out.extend(parse_spec(item))
        else:
            raise SpecError(
                f"policy list items must be spec strings or Policy objects, not {type(item).__name__}"
            )
    return out


class _Kinded(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...


_Named = TypeVar("_Named", bound=_Kinded)

#: When each kind of policy runs: detecting, clipping and skipping ones in the order given, the
#: reacting ones (``lr_backoff``) after all of them.
_PHASES = {"clip": 0, "reset": 0, "skip": 0, "react": 1}


def order_chain(chain: list[_Named]) -> list[_Named]:
    """A chain as a Guard runs it (torch's or Keras's): each policy once (a ConfigError names
    the duplicates), reacting policies after the rest, the order given otherwise."""
    names = [p.name for p in chain]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"policy {', '.join(dupes)} appears twice in the chain; give each policy once"
        )
    return sorted(chain, key=lambda p: _PHASES.get(p.kind, 0))
