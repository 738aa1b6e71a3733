"""``recurrent_explosion``: a recurrent weight's spectral radius is above 1 before (or at) the
events, or a vanilla RNN's stays above 1 (the condition itself, before any explosion shows)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from ..records import RunLog
from .base import Finding, _g, _list, _lone_nonfinite, _names, _num, _step, _trouble
from .registry import register

#: A recurrent weight's spectral radius above 1 is necessary for exploding gradients in a tanh RNN
#: (Pascanu, Mikolov & Bengio 2013, "On the difficulty of training RNNs", section 2.1).
RADIUS_LIMIT = 1.0
#: Steps before/after a spike or NaN event within which a radius sample counts as "around" it.
RADIUS_WINDOW = 100
#: Without any event, a gradient norm that grew this many times over its first recorded steps'
#: median while a radius was above 1 is the explosion itself, only gradual (the event detector
#: calls a jump against recent history a spike, and a steady climb has none).
RADIUS_GROWTH = 100.0
#: First recorded steps whose median gradient norm is the start's level.
RADIUS_START = 5
#: Layer type whose radius above 1 is itself the finding, with no event: a vanilla ``nn.RNN``. Its
#: hidden state is ``f(W_hh h + ...)`` with no gate, so a radius above 1 is Pascanu et al.'s
#: necessary condition for the gradient to grow with every time step, present in the weights
#: before any blow-up. An LSTM's or GRU's gates bound that growth: theirs counts only at events.
VANILLA = "RNN"
#: Without events, a radius that rose by this factor over its first sample was pushed up by the
#: training (smaller moves are the noise of a few SGD steps).
EDGE_GREW = 1.1


@register
def recurrent_explosion(run: RunLog) -> Finding | None:
    """A recurrent weight's spectral radius above 1 around spike or non-finite events."""
    recurrent = [str(n) for n in _list(run.meta.get("recurrent"))]
    if not recurrent:
        return None
    samples = _radius_samples(run, recurrent)
    # one bad batch (single_bad_step) is no explosion: a GRU's gate blocks sit above 1 by design
    events = (_trouble(run) if not _lone_nonfinite(run) else []) or _growth(run)
    if not events:
        return _edge(run, samples)
    worst = _worst_around(events, samples)
    over = {n: w for n, w in worst.items() if w[0] > RADIUS_LIMIT}
    if not over:
        return None
    layer = max(over, key=lambda n: over[n][0])
    r, _, ev = over[layer]
    first_sample = next(((s, v) for s, n, v in samples if n == layer), None)
    evidence = [
        f"{n}: spectral radius {_g(w[0])} at step {w[1]}, near the event at step {w[2]}"
        for n, w in sorted(over.items(), key=lambda t: -t[1][0])
    ]
    grew = first_sample is not None and first_sample[1] < r
    if grew:
        assert first_sample is not None  # grew says so
        evidence.append(
            f"{layer}'s radius was {_g(first_sample[1])} at step {first_sample[0]}: training "
            "pushed it up"
        )
    if events[0].get("kind") == "growth":
        evidence.append(
            f"the gradient norm grew {events[0]['factor']:.3g}x over its start by step "
            f"{events[0]['step']}, with no single spike: a steady climb; a radius above 1 is "
            "what lets the gradient grow over time steps (Pascanu et al. 2013)"
        )
    else:
        evidence.append(
            f"{len(events)} spike/non-finite events, the first at step {events[0]['step']}; a "
            "radius above 1 is what lets the gradient grow over time steps (Pascanu et al. 2013)"
        )
    return Finding(
        cause="recurrent_explosion",
        title="Exploding recurrent weights",
        summary=(
            f"Exploding recurrent weights: the spectral radius of {layer}'s recurrent weights was "
            f"{_g(r)} (> 1) around step {ev}, so the gradient grows with every time step."
        ),
        evidence=evidence,
        advice=_advice(run, over, grew),
        severity="high",
        step=ev,
        layers=sorted(over, key=lambda n: -over[n][0]),
    )


def _edge(run: RunLog, samples: list[tuple[int, str, float]]) -> Finding | None:
    """No event: a vanilla RNN whose recurrent radius was above 1 on most of its samples (the
    median: one sample over the line on the way down is not it)."""
    types = dict(zip(_names(run), _list(run.meta.get("layer_types")), strict=False))
    by_layer: dict[str, list[tuple[int, float]]] = {}
    for step, name, r in samples:
        if types.get(name) == VANILLA:
            by_layer.setdefault(name, []).append((step, r))
    over = {}
    for name, rs in by_layer.items():
        median = statistics.median(r for _, r in rs)
        if median > RADIUS_LIMIT:
            over[name] = (median, rs[0], max(rs, key=lambda t: t[1]))
    if not over:
        return None
    layer = max(over, key=lambda n: over[n][0])
    median, (s0, r0), (_, r1) = over[layer]
    evidence = [
        f"{n}: median spectral radius {_g(w[0])} over {len(by_layer[n])} sampled step(s) "
        f"(step {w[1][0]}: {_g(w[1][1])}; largest {_g(w[2][1])} at step {w[2][0]})"
        for n, w in sorted(over.items(), key=lambda t: -t[1][0])
    ]
    grew = r1 >= EDGE_GREW * r0
    if grew:
        evidence.append(f"{layer}'s radius rose from {_g(r0)} to {_g(r1)}: training pushed it up")
    evidence.append(
        "no spike, NaN or steady climb was recorded in this run; the condition is in the "
        "weights: a radius above 1 is what lets the gradient grow over time steps (Pascanu et "
        "al. 2013), so longer sequences, a larger LR or a worse batch can set it off"
    )
    return Finding(
        cause="recurrent_explosion",
        title="Recurrent weights past the stability edge",
        summary=(
            f"Recurrent weights past the stability edge: the spectral radius of {layer}'s "
            f"recurrent weights stayed above 1 ({_g(median)}, median of its samples), so the "
            "gradient can grow with every time step; it has not exploded yet."
        ),
        evidence=evidence,
        advice=_advice(run, {n: (w[0], 0, 0) for n, w in over.items()}, grew),
        severity="medium",
        step=s0,
        layers=sorted(over, key=lambda n: -over[n][0]),
    )


def _growth(run: RunLog) -> list[dict[str, Any]]:
    """The step where the gradient norm first reached ``RADIUS_GROWTH`` times its start (an
    infinite norm counts), as a pseudo-event; [] if it never did."""
    norms = [(s["step"], s.get("grad_norm")) for s in run.steps if _step(s) is not None]
    start = [v for _, x in norms[:RADIUS_START] if (v := _num(x)) is not None and v > 0]
    if len(start) < RADIUS_START:
        return []
    level = sorted(start)[len(start) // 2]
    for step, v in norms[RADIUS_START:]:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= RADIUS_GROWTH * level:
            return [{"step": step, "kind": "growth", "factor": v / level}]
    return []


def _radius_samples(run: RunLog, recurrent: list[str]) -> list[tuple[int, str, float]]:
    """Every (step, layer, radius) the telemetry sampled for the recurrent layers."""
    samples: list[tuple[int, str, float]] = []
    for s in run.steps:
        radius = s.get("radius")
        if _step(s) is None or not isinstance(radius, Mapping):
            continue
        for name, v in radius.items():
            r = _num(v)
            if r is not None and str(name) in recurrent:
                samples.append((s["step"], str(name), r))
    return samples


def _worst_around(
    events: list[dict[str, Any]], samples: list[tuple[int, str, float]]
) -> dict[str, tuple[float, int, int]]:
    """Each layer's largest radius within ``RADIUS_WINDOW`` steps before an event, or at it:
    layer -> (radius, its step, the event's step). Not after it: the radius an explosion (or a
    too-high LR) leaves behind is its effect, not the recurrence the gradient went through (an
    LSTM under Adam at LR 0.3: 0.62 at step 0, 65 at step 100 after its gradient grew 100x)."""
    worst: dict[str, tuple[float, int, int]] = {}
    for e in events:
        for step, name, r in samples:
            if 0 <= e["step"] - step <= RADIUS_WINDOW and r > worst.get(name, (-1.0,))[0]:
                worst[name] = (r, step, e["step"])
    return worst


def _advice(run: RunLog, over: dict[str, tuple[float, int, int]], grew: bool) -> list[str]:
    types = dict(zip(_names(run), _list(run.meta.get("layer_types")), strict=False))
    vanilla = [n for n in over if types.get(n) == "RNN"]
    advice = [
        "Clip the gradient norm, Pascanu et al.'s remedy: policy 'skip_nonfinite+clip_norm:1.0' "
        "(or 'default', which clips spikes adaptively).",
        "Initialize the recurrent weights orthogonal with a gain below 1, e.g. "
        "nn.init.orthogonal_(w, gain=0.9) for each weight_hh_l* block, so the radius starts < 1.",
    ]
    if vanilla:
        advice.append(
            f"Replace the vanilla RNN ({', '.join(vanilla)}) with an LSTM or GRU: the gates "
            "keep the gradient through time bounded."
        )
    else:
        advice.append(
            "Use an LSTM or GRU if this is a vanilla RNN; keep the gates' biases default."
        )
    if grew:
        advice.append("Lower the learning rate: the radius grew during training.")
    return advice
