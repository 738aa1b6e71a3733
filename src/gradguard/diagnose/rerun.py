"""The report's sentence for a step the Guard reran (rerun attribution, ``guard.step(replay=...)``).

step 3 was rerun: the NaN did not recur (transient: hardware or nondeterminism; the step was
skipped)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from .events import action_of

#: Most rerun sentences a report lists (the rest are counted).
MAX_RERUN_LINES = 10

_CAUSE = {
    "transient": "transient: hardware or nondeterminism",
    "reproducible": "reproducible: the data or the model",
}


def _what(rec: Mapping[str, Any], trigger: str) -> str:
    if trigger == "spike":
        return "the loss spike" if "loss" in str(rec.get("skip_reason") or "") else "the spike"
    values = [rec.get("grad_norm"), rec.get("loss")]
    nan = any(isinstance(v, float) and math.isnan(v) for v in values)
    return "the NaN" if nan else "the Inf" if any(isinstance(v, float) for v in values) else "it"


_ACTIONS = {
    "rolled_back": "the model was rolled back and the step's data recorded as skipped",
    "skipped": "the step was skipped",
    "clipped": "the step was clipped and taken",
    "none": "the step was taken",
}


def rerun_sentence(rec: Mapping[str, Any]) -> str | None:
    """One plain sentence for a ``step`` record with a ``rerun`` field; None without one (a step
    not rerun, or a file written before the field existed)."""
    rerun = rec.get("rerun")
    if not isinstance(rerun, Mapping):
        return None
    result = str(rerun.get("result"))
    what = _what(rec, str(rerun.get("trigger")))
    verb = "recurred" if result == "reproducible" else "did not recur"
    cause = _CAUSE.get(result, result)
    return f"step {rec.get('step')} was rerun: {what} {verb} ({cause}; {_ACTIONS[action_of(dict(rec))]})"


def rerun_sentences(steps: Iterable[Mapping[str, Any]]) -> list[str]:
    """The sentences of every rerun step, in order, at most :data:`MAX_RERUN_LINES` (then a count)."""
    out = [s for s in map(rerun_sentence, steps) if s is not None]
    if len(out) > MAX_RERUN_LINES:
        out = [*out[:MAX_RERUN_LINES], f"{len(out) - MAX_RERUN_LINES} more steps were rerun"]
    return out


def rerun_html(steps: Iterable[Mapping[str, Any]]) -> str:
    """The report's section of rerun sentences ("" when no step was rerun)."""
    import html

    lines = rerun_sentences(steps)
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(s)}</li>" for s in lines)
    return f'<section><h2>Reruns</h2><ul class="reruns">{items}</ul></section>'
