"""``outlier_batch``: a spike or NaN came with a batch whose inputs are far larger than the rest;
or, in a run with no spike or NaN at all, a batch whose inputs were 10x the usual size.

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
    inputs = _inputs(run)
    if not events:
        return _quiet_outlier(inputs)
    hits, seen = _event_hits(events, inputs)
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
        advice=_advice(first),
        severity="high",
        step=first,
    )


def _inputs(run: RunLog) -> list[tuple[int, dict[str, float]]]:
    return [
        (s["step"], st)
        for s in run.steps
        if _step(s) is not None and (st := _input_stats(s)) is not None
    ]


def _event_hits(
    events: list[dict[str, Any]], inputs: list[tuple[int, dict[str, float]]]
) -> tuple[list[_Hit], set[int]]:
    """The events whose batch is an outlier (one hit a step), and every event step looked at."""
    event_steps = {e["step"] for e in events}
    hits: list[_Hit] = []
    seen: set[int] = set()
    for e in events:
        if e["step"] in seen:
            continue
        seen.add(e["step"])
        hit = _outlier(e, inputs, event_steps)
        if hit is not None:
            hits.append(hit)
    return hits, seen


def outlier_steps(run: RunLog) -> set[int]:
    """The steps of spike or non-finite events whose batch was an outlier: trouble the data made
    (the other rules do not read it as evidence about the LR)."""
    events = _trouble(run)
    if not events:
        return set()
    hits, _ = _event_hits(events, _inputs(run))
    return {h[1] for h in hits}


def _quiet_outlier(inputs: list[tuple[int, dict[str, float]]]) -> Finding | None:
    """No spike or NaN: batches whose inputs' absmax or std was :data:`QUIET_FACTOR` times the
    usual (and beyond :data:`OUTLIER_Z`), which the run took without a spike. Said at medium
    severity: nothing broke, but such a batch is a data bug that a less robust run, or the same
    run at another LR, does not survive (an LSTM took a batch scaled 300x with no spike: its
    gates saturate)."""
    hits: list[tuple[int, str, float, float, float]] = []  # step, statistic, value, usual, z
    hit_steps: set[int] = set()
    for i, (step, cur) in enumerate(inputs):
        if not all(math.isfinite(cur[k]) for k in _INPUT_KEYS):
            continue
        hist = [
            st
            for s, st in inputs[max(0, i - OUTLIER_WINDOW) : i]
            if s not in hit_steps and all(math.isfinite(st[k]) for k in _INPUT_KEYS)
        ]
        if len(hist) < OUTLIER_MIN_HISTORY:
            continue
        for az, z, key, value, usual in _scores(cur, hist):
            if key != "mean" and az > OUTLIER_Z and value >= QUIET_FACTOR * usual:
                hits.append((step, key, value, usual, z))
                hit_steps.add(step)
                break
    if not hits:
        return None
    first, key, value, usual, _ = hits[0]
    evidence = [
        f"step {s}: input {k} {_g(v)} vs a median of {_g(u)} over the batches before "
        f"({v / u:.3g}x, z = {z:+.1f})"
        for s, k, v, u, z in hits[:5]
    ]
    evidence.append(
        f"{len(hits)} batch(es) {QUIET_FACTOR:g}x or more above the usual; no spike or "
        "non-finite step followed: the run took them"
    )
    return Finding(
        cause="outlier_batch",
        title="Outlier batch (the run took it)",
        summary=(
            f"An outlier batch at step {first}: its inputs' {key} was {value / usual:.3g}x the "
            "usual. Nothing broke, but a batch like it is usually a data bug (a sample left "
            "unnormalized, a corrupt record) that a less robust run does not survive."
        ),
        evidence=evidence,
        advice=_advice(first),
        severity="medium",
        step=first,
    )


#: Without any event, how many times the usual absmax or std a batch's inputs must reach.
QUIET_FACTOR = 10.0


def _advice(step: int) -> list[str]:
    return [
        "Standardize the inputs with statistics of the training set (per-feature mean and "
        "std computed once, applied to every batch), not per batch.",
        f"Find the samples of step {step} (log the sample ids) and fix or drop them; if "
        "extreme values are legitimate, clip input features to a few std (e.g. +-5).",
        "Let the Guard skip such steps: add 'skip_spike' to the policy "
        "(e.g. 'skip_nonfinite+skip_spike+zclip').",
    ]


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
