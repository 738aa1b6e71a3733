"""``outlier_batch``: a spike or NaN came with a batch whose inputs are far larger than the rest.

Only inputs that are unusually *large* or *shifted* count: a batch whose absmax or std is far below
the usual is not what makes a gradient explode. A batch of another size is judged for what its size
does not explain: a small batch (an epoch's last, say) has a noisier mean and std and a smaller
max, a larger one a larger max, so the spread of the mean and std is widened by ``sqrt(usual / n)``
and a larger batch's max is not scored (``batch`` in the input record; in older files without it
only the upward direction and the per-sample size of a mean shift protect a small batch)."""

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
#: A mean shift must also be large per sample: a quarter of the inputs' typical std (a shift the
#: size of the usual wobble of a batch mean is not one, however steady the earlier batches were).
OUTLIER_MEAN_SHIFT = 0.25

_INPUT_KEYS = ("mean", "std", "absmax")

#: One outlier found: (|z|, step, the event's kind, the evidence line).
_Hit = tuple[float, int, str, str]


def _input_stats(rec: Mapping[str, Any]) -> dict[str, float] | None:
    """mean, std, absmax (floats) and ``batch`` (the batch size, when recorded and valid)."""
    inp = rec.get("input")
    if not isinstance(inp, Mapping):
        return None
    out = {}
    for k in _INPUT_KEYS:
        v = inp.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        out[k] = float(v)
    n = inp.get("batch")
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        out["batch"] = float(n)
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
    if not all(math.isfinite(cur[k]) for k in _INPUT_KEYS):
        return (math.inf, step, e["kind"], f"step {step} ({e['kind']}): the batch contains NaN/Inf")
    hist = [
        st
        for s, st in inputs
        if s < step and s not in event_steps and all(math.isfinite(st[k]) for k in _INPUT_KEYS)
    ][-OUTLIER_WINDOW:]
    if len(hist) < OUTLIER_MIN_HISTORY:
        return None
    scores = _scores(cur, hist)
    if not scores:
        return None
    az, z, key, value, usual = max(scores)
    if not az > OUTLIER_Z:
        return None
    size = ""
    if "batch" in cur:
        size = f"; batch of {cur['batch']:.0f}"
    return (
        az,
        step,
        e["kind"],
        f"step {step} ({e['kind']}): input {key} {_g(value)} vs a median of "
        f"{_g(usual)} over the {len(hist)} steps before (z = {z:+.1f}{size})",
    )


def _usual_batch(hist: list[dict[str, float]]) -> float | None:
    sizes = [h["batch"] for h in hist if "batch" in h]
    return statistics.median(sizes) if len(sizes) * 2 > len(hist) else None


def _scores(
    cur: dict[str, float], hist: list[dict[str, float]]
) -> list[tuple[float, float, str, float, float]]:
    """(|z|, z, statistic, its value, its usual value) for what makes a batch an outlier: log10
    absmax and log10 std *above* the usual (z > 0 only; smaller inputs are never scored), and a
    mean shift of either sign that is large per sample (``OUTLIER_MEAN_SHIFT``) and beyond what
    the batch's size explains."""
    typical_std = statistics.median(h["std"] for h in hist)
    usual_n, n = _usual_batch(hist), cur.get("batch")
    # Batch-size factors: a batch of n < usual has a mean and a std noisier by about
    # sqrt(usual / n) (one heavy-tailed value inflates the std of 3 samples, not of 64); a batch of
    # n > usual has a larger max from its size alone, so its max is not scored.
    widen, skip_absmax = 1.0, False
    if usual_n is not None and n is not None and n != usual_n:
        widen = math.sqrt(usual_n / n) if n < usual_n else 1.0
        skip_absmax = n > usual_n
    scores = []
    for key in ("absmax", "std"):
        if key == "absmax" and skip_absmax:
            continue
        past = [math.log10(h[key]) for h in hist if h[key] > 0]
        if len(past) < OUTLIER_MIN_HISTORY or cur[key] <= 0:
            continue
        med, sd = _robust(past, OUTLIER_LOG_FLOOR)
        z = (math.log10(cur[key]) - med) / (sd * (widen if key == "std" else 1.0))
        if z > 0:
            scores.append((z, z, key, cur[key], 10**med))
    med, sd = _robust([h["mean"] for h in hist], OUTLIER_MEAN_FLOOR * typical_std + 1e-12)
    shift = cur["mean"] - med
    if abs(shift) > OUTLIER_MEAN_SHIFT * typical_std:
        z = shift / (sd * widen)
        scores.append((abs(z), z, "mean", cur["mean"], med))
    return scores
