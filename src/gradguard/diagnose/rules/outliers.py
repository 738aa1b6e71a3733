"""``outlier_batch``: a spike or NaN came with a batch whose statistics are far off the rest."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

from ..records import RunLog
from .base import Finding, _g, _robust, _step, _trouble
from .registry import register

#: Robust z-score (median/MAD of the steps before) beyond which a batch's input statistics are an
#: outlier; 6 is the spike threshold used for the gradient norm too (OLMo-core, ``skip_spike``).
OUTLIER_Z = 6.0
#: Steps of input statistics before an event needed to compare against, and how many are used.
OUTLIER_MIN_HISTORY = 8
OUTLIER_WINDOW = 200
#: Floors on the spread, so that perfectly steady inputs do not turn a tiny change into a huge z:
#: 0.05 decades (12%) for log10 absmax / log10 std, 5% of the typical std for the mean.
OUTLIER_LOG_FLOOR = 0.05
OUTLIER_MEAN_FLOOR = 0.05

_INPUT_KEYS = ("mean", "std", "absmax")

#: One outlier found: (|z|, step, the event's kind, the evidence line).
_Hit = tuple[float, int, str, str]


def _input_stats(rec: Mapping[str, Any]) -> dict[str, float] | None:
    inp = rec.get("input")
    if not isinstance(inp, Mapping):
        return None
    out = {}
    for k in _INPUT_KEYS:
        v = inp.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        out[k] = float(v)
    return out


@register
def outlier_batch(run: RunLog) -> Finding | None:
    """At a spike or NaN, the batch's input statistics are far from those of the steps before."""
    events = _trouble(run)
    if not events:
        return None
    event_steps = {e["step"] for e in events}
    inputs = [
        (s["step"], st)
        for s in run.steps
        if _step(s) is not None and (st := _input_stats(s)) is not None
    ]
    hits: list[_Hit] = []
    seen: set[int] = set()
    for e in events:
        if e["step"] in seen:
            continue
        seen.add(e["step"])
        hit = _outlier(e, inputs, event_steps)
        if hit is not None:
            hits.append(hit)
    if not hits:
        return None
    hits.sort(key=lambda h: h[1])
    first = hits[0][1]
    evidence = [h[3] for h in hits[:5]]
    evidence.append(
        f"{len(hits)} of {len(seen)} spike/non-finite steps came with an outlier batch "
        f"(|z| > {OUTLIER_Z:g} against the median and MAD of earlier batches)"
    )
    return Finding(
        cause="outlier_batch",
        title="Outlier batch",
        summary=(
            f"An outlier batch: the {hits[0][2]} at step {first} came on a batch whose "
            "statistics were far from those of the batches before it."
        ),
        evidence=evidence,
        advice=[
            "Standardize the inputs with statistics of the training set (per-feature mean and "
            "std computed once, applied to every batch), not per batch.",
            f"Find the samples of step {first} (log the sample ids) and fix or drop them; if "
            "extreme values are legitimate, clip input features to a few std (e.g. +-5).",
            "Let the Guard skip such steps: add 'skip_spike' to the policy "
            "(e.g. 'skip_nonfinite+skip_spike+zclip').",
        ],
        severity="high",
        step=first,
    )


def _outlier(
    e: dict[str, Any], inputs: list[tuple[int, dict[str, float]]], event_steps: set[int]
) -> _Hit | None:
    """Event ``e``'s batch as an outlier against the finite, event-free batches before it, or
    None (no statistics for its step, too little history, or not far enough off)."""
    step = e["step"]
    cur = next((st for s, st in inputs if s == step), None)
    if cur is None:
        return None
    if not all(math.isfinite(v) for v in cur.values()):
        return (math.inf, step, e["kind"], f"step {step} ({e['kind']}): the batch contains NaN/Inf")
    hist = [
        st
        for s, st in inputs
        if s < step and s not in event_steps and all(math.isfinite(v) for v in st.values())
    ][-OUTLIER_WINDOW:]
    if len(hist) < OUTLIER_MIN_HISTORY:
        return None
    az, z, key, value, usual = max(_scores(cur, hist))
    if not az > OUTLIER_Z:
        return None
    return (
        az,
        step,
        e["kind"],
        f"step {step} ({e['kind']}): input {key} {_g(value)} vs a median of "
        f"{_g(usual)} over the {len(hist)} steps before (z = {z:+.1f})",
    )


def _scores(
    cur: dict[str, float], hist: list[dict[str, float]]
) -> list[tuple[float, float, str, float, float]]:
    """(|z|, z, statistic, its value, its usual value) for log10 absmax, log10 std and the mean."""
    typical_std = statistics.median(h["std"] for h in hist)
    scores = []
    for key in ("absmax", "std"):
        past = [math.log10(h[key]) for h in hist if h[key] > 0]
        if len(past) < OUTLIER_MIN_HISTORY or cur[key] <= 0:
            continue
        med, sd = _robust(past, OUTLIER_LOG_FLOOR)
        z = (math.log10(cur[key]) - med) / sd
        scores.append((abs(z), z, key, cur[key], 10**med))
    med, sd = _robust([h["mean"] for h in hist], OUTLIER_MEAN_FLOOR * typical_std + 1e-12)
    z = (cur["mean"] - med) / sd
    scores.append((abs(z), z, "mean", cur["mean"], med))
    return scores
