"""What the bench's two registries (models and tasks) share: a builder's options read from its
signature, the check of an option's value against its annotation, and a docstring's summary.

A registered builder declares its options as keyword parameters with a default and an annotation
(``int``, ``float``, ``bool`` or a ``Literal`` of choices); :func:`options_of` reads them into
:class:`OptionInfo` records and :func:`check_type` checks a value against one before the call.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError

__all__ = ["OptionInfo", "check_type", "options_of", "summary_of"]


@dataclass(frozen=True)
class OptionInfo:
    """One option of a model family or a task: its name, default and type (the annotation)."""

    name: str
    default: Any
    type: Any


def options_of(fn: Callable[..., Any], *, keyword_only: bool) -> tuple[OptionInfo, ...]:
    """The options of builder ``fn`` in declaration order: its keyword-only parameters
    (``keyword_only``) or all of them, with their defaults and resolved annotations."""
    hints = typing.get_type_hints(fn)
    return tuple(
        OptionInfo(p.name, p.default, hints.get(p.name, Any))
        for p in inspect.signature(fn).parameters.values()
        if not keyword_only or p.kind is inspect.Parameter.KEYWORD_ONLY
    )


def summary_of(doc: str | None) -> str:
    """A docstring's first paragraph on one line (its first line when that is the paragraph)."""
    return " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())


def check_type(where: str, key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint`` (a ``Literal``, ``bool``, ``int`` or
    ``float``; anything else passes). A float option takes an int, returned as a float."""
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {', '.join(choices)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}={value!r} is not a boolean (use True or False)")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}={value!r} is not an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}={value!r} is not a number")
        return float(value)
    return value
