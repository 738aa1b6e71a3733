"""The one shape of the project's registries (policies, faults, models, tasks, diagnosis rules).

Each registry keeps one frozen *info record* per entry, with at least ``name``, ``summary`` (the
first paragraph of its docstring, on one line), ``options`` (records with ``name``, ``default``
and ``type``, in declaration order) and ``defaults`` (each option's default by name), and offers
the same three functions, as timm's model registry does:

- ``list_<kind>s()``: the names, in the registry's order;
- ``<kind>_infos()``: every record by name, in that order;
- ``<kind>_info(name)``: one record; an unknown name raises the registry's error, naming the valid
  ones.

A parametrized contract test (``tests/test_registries.py``) runs over the five. This module holds
what the records share: :class:`OptionInfo`, read from a signature by :func:`options_of`, and
:func:`summary_of`.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["InfoRecord", "OptionInfo", "options_of", "summary_of"]


@dataclass(frozen=True)
class OptionInfo:
    """One option of a registered entry: its name, default and type (the annotation)."""

    name: str
    default: Any
    type: Any


class InfoRecord:
    """What every registry's record adds to its fields (``name``, ``summary``, ``options``): the
    options' defaults by name. A record is a frozen dataclass deriving from this."""

    options: tuple[Any, ...]

    @property
    def defaults(self) -> dict[str, Any]:
        """Each option's default, in declaration order."""
        return {o.name: o.default for o in self.options}


def options_of(
    fn: Callable[..., Any], *, keyword_only: bool, skip: tuple[str, ...] = ()
) -> tuple[OptionInfo, ...]:
    """The options of ``fn`` in declaration order: its keyword-only parameters (``keyword_only``)
    or all of them but ``skip`` (``self``), with their defaults and resolved annotations."""
    hints = typing.get_type_hints(fn)
    return tuple(
        OptionInfo(p.name, p.default, hints.get(p.name, Any))
        for p in inspect.signature(fn).parameters.values()
        if p.name not in skip and (not keyword_only or p.kind is inspect.Parameter.KEYWORD_ONLY)
    )


def summary_of(doc: str | None) -> str:
    """A docstring's first paragraph on one line (its first line when that is the paragraph)."""
    return " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())
