"""What each telemetry field holds, and the repair of a record read back.

A telemetry file can be edited, truncated, written by another tool or by a buggy callback; the
report reads it anyway. :func:`repair` checks every known field of a record against the kind the
writer gives it and replaces a value of another kind (a string where a number goes, a number
beyond float's range, a list where a flag goes) by what the reader takes for "not recorded"
(None, or the field's empty value), noting each one; a record without its step is dropped. So
the report says what it skipped (:attr:`RunLog.notes`) instead of raising a traceback.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

#: A value of the right kind, or the replacement (the first element) and False.
Check = Callable[[Any], tuple[Any, bool]]


def _is_num(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    try:
        float(v)  # an int beyond float's range is not a number the reader can use
    except OverflowError:
        return False
    return True


def _num(v: Any) -> tuple[Any, bool]:
    """A number (NaN and +-inf included: the writer records non-finite values), or None."""
    if v is None or _is_num(v):
        return (None if v is None else float(v) if isinstance(v, int) else v), True
    return None, False


def _int(v: Any) -> tuple[Any, bool]:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63:
        return v, True
    if _is_num(v) and math.isfinite(float(v)) and float(v).is_integer() and abs(v) < 2**63:
        return int(v), True
    return None, False


def _flag(v: Any) -> tuple[Any, bool]:
    return (v, True) if isinstance(v, bool) else (False, False)


def _text(v: Any) -> tuple[Any, bool]:
    return (v, True) if v is None or isinstance(v, str) else (None, False)


def _nums(v: Any) -> tuple[Any, bool]:
    """A list of numbers or None (an entry of another kind becomes None: not recorded)."""
    if v is None:
        return None, True
    if not isinstance(v, list):
        return None, False
    out = [_num(x)[0] for x in v]
    return out, all(_num(x)[1] for x in v)


def _shares(v: Any) -> tuple[Any, bool]:
    """A list of shares, numbers in [0, 1], or None (an entry of another kind or out of range
    becomes None: not recorded)."""
    if v is None:
        return None, True
    if not isinstance(v, list):
        return None, False
    out = [float(x) if _is_num(x) and 0.0 <= x <= 1.0 else None for x in v]
    return out, all(x is None or y is not None for x, y in zip(v, out, strict=True))


def _kept(v: Any, keep: Callable[[Any], bool]) -> tuple[Any, bool]:
    """A list with only the entries ``keep`` accepts (another value: an empty list)."""
    if not isinstance(v, list):
        return [], v is None
    out = [x for x in v if keep(x)]
    return out, len(out) == len(v)


def _texts(v: Any) -> tuple[Any, bool]:
    return _kept(v, lambda x: isinstance(x, str))


def _layers(v: Any) -> tuple[Any, bool]:
    """Layer references: indices or names."""
    return _kept(v, lambda x: isinstance(x, str) or _int(x)[1])


def _mapping(v: Any) -> tuple[Any, bool]:
    return (v, True) if v is None or isinstance(v, Mapping) else (None, False)


def _numbers_by_name(v: Any) -> tuple[Any, bool]:
    """A dict of named numbers (metrics, spectral radii)."""
    if v is None:
        return None, True
    if not isinstance(v, Mapping):
        return {}, False
    out = {k: _num(x)[0] for k, x in v.items() if isinstance(k, str)}
    return out, all(isinstance(k, str) and _num(x)[1] for k, x in v.items())


def _named_numbers(v: Any) -> tuple[Any, bool]:
    """A dict of named numbers, or None for a value of another kind (not recorded: a field that
    is null when it was not sampled)."""
    if v is not None and not isinstance(v, Mapping):
        return None, False
    return _numbers_by_name(v)


STEP: dict[str, Check] = {
    "loss": _num,
    "lr": _num,
    "grad_norm": _num,
    "grad_norm_after": _num,
    "clipped": _flag,
    "skipped": _flag,
    "skip_reason": _text,
    "rolled_back": _flag,
    "actions": _texts,
    "layer_norms": _nums,
    "layer_norms_after": _nums,
    "weight_norms": _nums,
    "update_ratio": _nums,
    "nonfinite_layers": _layers,
    "input": _numbers_by_name,
    "logits": _named_numbers,
    "attn_logit": _named_numbers,
    "dead_units": _shares,
    "amp_scale": _num,
    "radius": _numbers_by_name,
    "metrics": _numbers_by_name,
    "rerun": _mapping,
}
EVENT: dict[str, Check] = {"kind": _text, "layers": _texts, "action": _text, "detail": _mapping}
LOCALIZATION: dict[str, Check] = {
    "origin": _text,
    "phase": _text,
    "path": _texts,
    "method": _text,
    "detail": _mapping,
}
META: dict[str, Check] = {
    "layers": _texts,
    "layer_types": _texts,
    "forward_order": _layers,
    "attention": _texts,
}
END: dict[str, Check] = {"counters": _mapping, "events": _mapping}
SCHEMAS: dict[str, dict[str, Check]] = {
    "step": STEP,
    "event": EVENT,
    "localization": LOCALIZATION,
    "meta": META,
    "end": END,
}
#: Record types placed by their ``step``: a step record without one is dropped (the reader sorts
#: and matches by it); an event or a localization keeps what it says, at no step.
STEPPED = frozenset({"step", "event", "localization"})


def repair(kind: str, rec: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """``rec`` with every known field of the wrong kind replaced (see the module docstring), and
    the fields replaced; None for a step record the reader cannot place (no integer ``step``)."""
    fixed: list[str] = []
    if kind in STEPPED and ("step" in rec or kind == "step"):
        step, ok = _int(rec.get("step"))
        if not ok or step is None or step < 0:
            if kind == "step":
                return None, ["step"]
            rec["step"] = None
            fixed.append("step")
        else:
            rec["step"] = step
    for key, check in SCHEMAS.get(kind, {}).items():
        if key not in rec:
            continue
        value, ok = check(rec[key])
        if not ok:
            rec[key] = value
            fixed.append(key)
    if kind == "event" and not isinstance(rec.get("kind"), str):
        rec["kind"] = "unknown"
    return rec, fixed
