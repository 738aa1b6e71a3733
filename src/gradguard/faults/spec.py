"""The fault registry and the fault spec language, the policy spec language's twin.

A spec names a plan: faults joined by ``+`` (not the ``+`` of an exponent: ``factor=1e+27``);
each is ``name``, ``name:value`` (sets its first option) or ``name:key=value,key=value``. Lists use
``|`` (``at=3|7|20``). ``none`` is the empty plan. Examples: ``nan:p=0.01``, ``spike:1e5,at=100``,
``poison:shuffle,p=0.02``, ``lr_burst:factor=100,steps=10,at=200``,
``nan:p=0.01+spike:scale=1e4,p=0.02``.

Every malformed spec raises :class:`FaultSpecError` (a :class:`~gradguard.SpecError`) naming the
problem and the fix: the valid faults, the fault's options, the option's range. The grammar
(splitting, typed values, numbers written exactly) is :mod:`gradguard.specgrammar`, the policy
specs' own.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from ..registries import InfoRecord, summary_of
from ..specgrammar import split_chain, split_term
from .base import Fault, FaultPlan, FaultSpecError, Option, check_seed

_REGISTRY: dict[str, type[Fault]] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class FaultInfo(InfoRecord):
    """What the registry knows of a fault: its name, class, one-line summary and options."""

    name: str
    cls: type[Fault]
    summary: str
    options: tuple[Option, ...]


def register(cls: type[Fault]) -> type[Fault]:
    """Class decorator: make a fault available to specs under ``cls.name``."""
    if not cls.name or not _NAME.fullmatch(cls.name):
        raise TypeError(f"{cls.__name__} needs a class attribute `name` (lowercase, a-z0-9_)")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(
            f"fault {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


def available_faults() -> dict[str, FaultInfo]:
    """Every registered fault by name (sorted), with its summary and options (for ``--help``,
    a CLI listing, and the contract test that runs over every fault)."""
    return {name: fault_info(name) for name in list_faults()}


def list_faults() -> list[str]:
    """Names of every registered fault, sorted."""
    return sorted(_REGISTRY)


def fault_infos() -> dict[str, FaultInfo]:
    """Every registered fault's record by name, sorted by name (``available_faults()``)."""
    return available_faults()


def fault_info(name: str) -> FaultInfo:
    """The record of fault ``name``; an unknown name raises ``FaultSpecError`` (a ``SpecError``)
    naming the valid ones."""
    cls = fault_class(name)
    return FaultInfo(name, cls, summary_of(cls.__doc__), cls.options)


def _unknown_fault(name: str) -> FaultSpecError:
    names = sorted(_REGISTRY)
    close = difflib.get_close_matches(name.lower(), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return FaultSpecError(
        f"unknown fault {name!r}{hint}; valid faults: {', '.join(names)} (or 'none' for no faults)"
    )


def fault_class(name: str) -> type[Fault]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise _unknown_fault(name) from None


def _option(cls: type[Fault], key: str) -> Option:
    for o in cls.options:
        if o.name == key:
            return o
    names = [o.name for o in cls.options]
    close = difflib.get_close_matches(key.lower(), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise FaultSpecError(
        f"fault {cls.name!r}: unknown option {key!r}{hint}; options: {', '.join(names)}"
    )


def parse_fault(text: str, seed: int = 0) -> Fault:
    """One fault from ``name``, ``name:value`` or ``name:key=value,...``."""
    if not isinstance(text, str):
        raise FaultSpecError(f"a fault spec is a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise FaultSpecError("empty fault; write e.g. 'nan:p=0.01' (faults joined by '+')")
    term = split_term(text)
    name = term.name
    if not name:
        raise FaultSpecError(
            f"missing fault name in {text!r}; write name:key=value, e.g. nan:p=0.01 "
            f"(faults: {', '.join(sorted(_REGISTRY))})"
        )
    if name == "none":
        raise FaultSpecError("'none' stands alone (the empty plan); drop it or drop the others")
    cls = fault_class(name)
    if not term.colon:
        return cls(seed=seed)
    options = ", ".join(o.name for o in cls.options)
    if not term.items:
        raise FaultSpecError(
            f"fault {name!r}: nothing after ':'; write {name}:key=value (options: {options})"
        )
    values: dict[str, Any] = {}
    for i, item in enumerate(term.items):
        if item.key is None:
            if i > 0:
                raise FaultSpecError(
                    f"fault {name!r}: {item.text.strip()!r} is not key=value; only the first value "
                    f"may omit its key (options: {options})"
                )
            opt = cls.options[0]
        elif not item.key:
            raise FaultSpecError(
                f"fault {name!r}: missing option name in {item.text.strip()!r}; write key=value "
                f"(options: {options})"
            )
        else:
            opt = _option(cls, item.key)
        if opt.name in values:
            raise FaultSpecError(f"fault {name!r}: option {opt.name!r} given twice")
        values[opt.name] = opt.parse(name, item.value)
    return cls(seed=seed, **values)


def parse(spec: str, seed: int = 0) -> FaultPlan:
    """A :class:`FaultPlan` from a spec such as ``"nan:p=0.01+lr_burst:factor=100,at=200"``;
    ``"none"`` is the empty plan. The schedules are drawn from ``seed`` (an int >= 0)."""
    if not isinstance(spec, str):
        raise FaultSpecError(f"a fault spec is a string, got {type(spec).__name__}")
    seed = check_seed(seed)
    text = spec.strip()
    if not text:
        raise FaultSpecError("empty fault spec; write 'none' or e.g. 'nan:p=0.01'")
    if text == "none":
        return FaultPlan()
    parts = split_chain(text)
    if any(not p.strip() for p in parts):
        raise FaultSpecError(f"empty fault in {spec!r}; join faults with a single '+'")
    return FaultPlan(parse_fault(p, seed) for p in parts)
