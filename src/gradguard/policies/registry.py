"""The policy registry and the spec language.

A spec names a chain: policies joined by ``+``; each is ``name``, ``name:value`` (sets its first
parameter) or ``name:key=value,key=value``. Examples: ``clip_norm:1.0``, ``agc:0.01``,
``zclip:z_thresh=2.0,max_norm=5``, ``skip_nonfinite+zclip``. ``default`` expands to the recommended
chain. List values use ``|`` (``agc:exclude=head|fc*``).
"""

from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from ..errors import SpecError
from .base import Policy

_REGISTRY: dict[str, type[Policy]] = {}

#: The recommended chain (see the README for why).
DEFAULT_SPEC = "skip_nonfinite+zclip+clip_norm:1.0"

# A '+' joins policies, except inside a number's exponent: ``str(1e20)`` is ``1e+20``, and a
# policy's ``spec()`` must parse back (``clip_norm:max_norm=1e+20``).
_CHAIN_SEP = re.compile(r"\+(?![0-9])|(?<![0-9.][eE])\+")


def register(cls: type[Policy]) -> type[Policy]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(
            f"policy name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    """Names of every registered policy, sorted."""
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(
            f"unknown policy {name!r}; valid policies: {', '.join(available_policies())} (or 'default')"
        ) from None


def _parameters(cls: type[Policy]) -> list[inspect.Parameter]:
    return [p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"]


def _coerce(policy: str, pname: str, raw: str, hint: Any) -> Any:
    """Turn the text of a spec value into the parameter's annotated type."""
    text = raw.strip()
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(policy, pname, text, a)
            except SpecError as e:
                errors.append(str(e))
        raise SpecError(errors[-1] if errors else f"{policy}: bad value {raw!r} for {pname}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if text not in choices:
            raise SpecError(
                f"{policy}: {pname}={text!r} is not one of {', '.join(map(str, choices))}"
            )
        return text
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        return tuple(t for t in text.split("|") if t)
    if hint is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise SpecError(f"{policy}: {pname}={text!r} is not a boolean (use true or false)")
    if hint is int:
        try:
            f = float(text)  # 1e3, 100.0
        except ValueError:
            raise SpecError(f"{policy}: {pname}={text!r} is not an integer") from None
        if not f.is_integer():
            raise SpecError(f"{policy}: {pname}={text!r} is not an integer")
        n = int(text) if text.lstrip("+-").isdigit() else int(f)  # exact past 2**53
        if abs(n) > sys.maxsize:  # beyond any count or window (and a C size: deque would raise)
            raise SpecError(f"{policy}: {pname}={text!r} is too large (at most {sys.maxsize})")
        return n
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise SpecError(f"{policy}: {pname}={text!r} is not a number") from None
    if hint is str:
        return text
    raise SpecError(f"{policy}: parameter {pname} cannot be set from a spec string")


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
        values[params[0].name] = _coerce(
            name, params[0].name, args[0], hints.get(params[0].name, str)
        )
    for k, v in (kwargs or {}).items():
        if k not in names:
            valid = ", ".join(names) if names else "none"
            raise SpecError(f"{name}: unknown parameter {k!r}; valid parameters: {valid}")
        if k in values:
            raise SpecError(f"{name}: parameter {k!r} given twice")
        values[k] = _coerce(name, k, v, hints.get(k, str))
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
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep:
        return make_policy(name)
    if not rest.strip():
        raise SpecError(f"{name}: nothing after ':'; write {name}:VALUE or {name}:key=value")
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for item in rest.split(","):
        if "=" in item:
            k, _, v = item.partition("=")
            if not k.strip():
                raise SpecError(f"{name}: missing parameter name in {item!r}")
            if k.strip() in kwargs:
                raise SpecError(f"{name}: parameter {k.strip()!r} given twice")
            kwargs[k.strip()] = v
        elif kwargs:
            raise SpecError(
                f"{name}: positional value {item!r} after key=value; only the first value may omit its key"
            )
        else:
            args.append(item)
    return make_policy(name, args, kwargs)


def parse_spec(spec: str | Policy | Iterable[str | Policy] | None) -> list[Policy]:
    """Turn a spec string, a policy, or a list of either into a list of fresh policies."""
    if spec is None or spec == "default":
        spec = DEFAULT_SPEC
    if isinstance(spec, Policy):
        return [spec]
    if isinstance(spec, str):
        if not spec.strip():
            raise SpecError("empty policy spec; use 'default', 'none' or e.g. 'clip_norm:1.0'")
        if spec.strip() == "none":
            return []
        out: list[Policy] = []
        for part in _CHAIN_SEP.split(spec):
            out.extend(parse_spec(DEFAULT_SPEC) if part.strip() == "default" else [parse_one(part)])
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
