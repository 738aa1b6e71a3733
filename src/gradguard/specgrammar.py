"""The one grammar of policy specs and fault specs: how a spec string splits, how a value's text
becomes a typed value, and how a value is written back.

A spec is a chain of terms joined by ``+`` (a ``+`` inside a number's exponent, ``1e+27``, joins
nothing); a term is ``name``, ``name:value`` (the first parameter) or ``name:key=value,...``; a list
value joins its items with ``|``. The policy registry (:mod:`gradguard.policies.registry`, and so
the Keras package) and the fault parser (:mod:`gradguard.faults.spec`) both read specs with this
module and write them with :func:`format_value`, so whatever ``spec()`` writes parses back to the
same value: numbers of any magnitude included (``float(format_number(x)) == x``).

Each parser words its own structural errors (they name its policies or options); the value
errors here are raised as the caller's error type (:class:`~gradguard.SpecError` or a subclass).

This module is a leaf: it imports nothing of gradguard but :mod:`gradguard.errors`.
"""

from __future__ import annotations

import math
import numbers
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import SpecError

#: Joins the terms of a chain (``skip_nonfinite+zclip``).
CHAIN = "+"
#: Joins the items of a list value (``exclude=head|fc*``).
LIST = "|"

# A number whose exponent sign is the '+' right after the match (``1e+27``, ``-2.5E+3``,
# ``.5e+1``): it starts a value (at the start, or after a separator or a space) and a digit follows.
_EXPONENT = re.compile(r"(?<![^\s:=,|+])-?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE](?=\+\d)")


# ----- splitting -----------------------------------------------------------------------------------
def split_chain(text: str) -> list[str]:
    """The terms of a chain, as written (not stripped): split at every ``+`` except a number's
    exponent sign, so ``"clip_norm:1e+20+zclip"`` is ``["clip_norm:1e+20", "zclip"]``. Empty terms
    are kept (``"a++b"`` gives ``["a", "", "b"]``) for the caller to refuse in its own words."""
    signs = {m.end() for m in _EXPONENT.finditer(text)}
    parts, start = [], 0
    for i, c in enumerate(text):
        if c == CHAIN and i not in signs:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


@dataclass(frozen=True)
class Item:
    """One comma-separated item of a term: ``key=value`` or a positional ``value``."""

    key: str | None  # stripped; None for a positional value
    value: str  # the value's text as written (coerce() strips it)
    text: str  # the whole item as written, for messages


@dataclass(frozen=True)
class Term:
    """One term of a chain: its name, whether a ``:`` followed it, and its items."""

    name: str  # stripped
    colon: bool
    rest: str  # the text after the ':' ('' without one)
    items: tuple[Item, ...]


def split_term(text: str) -> Term:
    """``name``, ``name:value`` or ``name:key=value,...`` split into its parts; no checks (each
    parser refuses a missing name, an empty key or a misplaced positional value in its words)."""
    name, colon, rest = text.strip().partition(":")
    items: list[Item] = []
    if colon and rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            items.append(Item(key.strip(), value, item) if eq else Item(None, item, item))
    return Term(name.strip(), bool(colon), rest, tuple(items))


def split_list(text: str) -> list[str]:
    """The items of a list value, stripped (``"3| 7|20"`` is ``["3", "7", "20"]``)."""
    return [t.strip() for t in text.split(LIST)]


# ----- writing -------------------------------------------------------------------------------------
def format_number(x: Any) -> str:
    """A number as a spec writes it, exactly: an int as its digits (however large), a float as its
    ``repr`` (the shortest text that reads back to the same float: ``0.1``, ``1e+27``, ``1e-300``).
    The exponent's ``+`` is not a chain separator (:func:`split_chain`)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"not a number: {x!r}")
    if isinstance(x, numbers.Integral):
        return str(int(x))
    return repr(float(x))


def format_value(v: Any) -> str:
    """A parameter's value as spec text that :func:`coerce` reads back to it: numbers by
    :func:`format_number`, lists joined by ``|``, anything else (``True``, ``None``, a name) by
    ``str``."""
    if isinstance(v, (list, tuple)):
        return LIST.join(format_value(x) for x in v)
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return format_number(v)
    return str(v)


# ----- reading -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Where:
    """Where a value goes, for the messages of :func:`coerce`: ``"{owner}: {name}='text' is not a
    number{note}"``, raised as ``error``."""

    owner: str  # "zclip", "fault 'nan'"
    name: str  # the parameter or option
    error: type[SpecError] = SpecError
    note: str = ""  # appended to every message ("; p is the strike probability ...")
    max_int: int | None = sys.maxsize  # larger ints are refused (None: no limit)
    drop_empty_items: bool = False  # "a||b" is [a, b] (else an error); "" is the empty list

    def fail(self, text: str, problem: str) -> SpecError:
        return self.error(f"{self.owner}: {self.name}={text!r} {problem}{self.note}")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def coerce(raw: str, hint: Any, where: Where) -> Any:
    """The text of a spec value as the type ``hint``: ``bool``, ``int`` (exact however large;
    ``1e3`` is 1000), ``float``, ``str``, a ``Literal``, an ``Optional``/union (``none``, ``null``
    or nothing is None) or a list/tuple/``Sequence`` of any of them (items joined by ``|``; the
    result is a tuple). A bad value raises ``where.error`` naming the value and what it should be."""
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
                return coerce(text, a, where)
            except SpecError as e:
                errors.append(e)
        if errors:
            raise errors[-1]
        raise where.error(f"{where.owner}: bad value {raw!r} for {where.name}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if text not in choices:
            raise where.fail(text, f"is not one of {', '.join(map(str, choices))}")
        return text
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        item = next((a for a in typing.get_args(hint) if a is not Ellipsis), str)
        if not text:
            return ()
        items = split_list(text)
        if where.drop_empty_items:
            items = [t for t in items if t]
        elif not all(items):
            raise where.fail(text, f"has an empty item; join values with single '{LIST}'")
        return tuple(coerce(t, item, where) for t in items)
    if hint is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise where.fail(text, "is not a boolean (use true or false)")
    if hint is int:
        return _integer(text, where)
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise where.fail(text, "is not a number") from None
    if hint is str:
        return text
    raise where.error(f"{where.owner}: parameter {where.name} cannot be set from a spec string")


def _integer(text: str, where: Where) -> int:
    try:
        n = int(text)  # exact, however large
    except ValueError:
        n = _whole(text, where)  # 1e3, 100.0
    if where.max_int is not None and abs(n) > where.max_int:
        # beyond any count or window (and a C size: a deque would raise)
        raise where.fail(text, f"is too large (at most {where.max_int})")
    return n


def _whole(text: str, where: Where) -> int:
    try:
        f = float(text)
    except ValueError:
        raise where.fail(text, "is not an integer") from None
    if not math.isfinite(f):
        raise where.fail(text, "is not an integer")
    if not f.is_integer():
        raise where.fail(text, f"is not an integer ({format_number(f)} is not a whole number)")
    return int(f)
