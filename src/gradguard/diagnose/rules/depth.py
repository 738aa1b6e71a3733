"""``init_depth``: gradient norms grow or shrink geometrically with depth from the start."""

from __future__ import annotations

import math
import statistics
from typing import Any

from ..records import RunLog
from .base import Finding, _first_trouble, _layer, _list, _num, _step, _weight_layers
from .registry import register

#: Steps at the start (before any event) whose per-layer gradient norms show the init/depth trend.
INIT_STEPS = 5
#: Weight layers needed to call a trend with depth a trend.
INIT_MIN_LAYERS = 6
#: Input-side vs output-side gradient norm (from the fit) beyond which the trend is reported: an
#: order of magnitude and a half, i.e. one learning rate is ~30x off for one end of the network.
#: (A deep tanh MLP at 4x the Xavier gain gives ~1e3 over 12 layers, at 2.2x ~1e2, at 1x ~1.3;
#: the healthy controls of the diagnosis corpus with 6 or more weight layers stay within 10^0.4.
#: ReLU nets are positively homogeneous, so scaling their init moves all layers' weight gradients
#: alike, not with depth.)
INIT_RATIO = 10**1.5
#: Goodness of the log-linear fit (R^2) needed to say "geometric".
INIT_MIN_R2 = 0.8
#: The model's largest output logit on its first step beyond which the init is too large
#: whatever the depth: a well-initialized network's outputs start at a few units (the loss near
#: that of a uniform guess); at 50 the softmax is saturated for every example from step 0.
INIT_LOGITS = 50.0
#: ... and below which, on a run whose loss then never moved, it is too small: the signal dies
#: on its way through the layers (a 12-layer ReLU net at 0.6x He starts at ~5e-3, at 0.7x at
#: 0.04-0.09; a healthy one at a few units), so the gradients vanish as well. Small outputs alone
#: are no fault (a healthy LSTM's start at 0.02-0.07 and it learns): the loss that never moved is
#: the evidence, this bound only says the init is where the signal was lost.
INIT_LOGITS_SMALL = 0.25


def _fit(ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys against 0..n-1, and R^2 (0 when ys are constant)."""
    n = len(ys)
    mx = (n - 1) / 2
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in range(n))
    sxy = sum((x - mx) * (y - my) for x, y in enumerate(ys))
    slope = sxy / sxx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (my + slope * (x - mx))) ** 2 for x, y in enumerate(ys))
    return slope, (1 - ss_res / ss_tot) if ss_tot > 0 else 0.0


@register
def init_depth(run: RunLog) -> Finding | None:
    """Per-layer gradient norms at the start grow or shrink geometrically toward the input."""
    extreme = _large_outputs(run) or _small_outputs(run)
    if extreme is not None:
        return extreme
    early = _early_steps(run)
    if not early:
        return None
    layers, logs = _depth_profile(run, early)
    if len(layers) < INIT_MIN_LAYERS:
        return None
    slope, r2 = _fit(logs)
    # Input side vs output side, from the fit: log10(first / last).
    decades = -slope * (len(layers) - 1)
    if r2 < INIT_MIN_R2 or abs(decades) < math.log10(INIT_RATIO):
        return None
    per_layer = 10 ** (-slope)
    explode = decades > 0
    first, last = _layer(run, layers[0]), _layer(run, layers[-1])
    steps = f"steps {early[0]['step']}-{early[-1]['step']}"
    evidence = [
        f"{len(layers)} weight layers in forward order, {steps}: gradient norm "
        f"{10 ** logs[0]:.3g} at {first} (input side) vs {10 ** logs[-1]:.3g} at {last} (output side)",
        f"log10(norm) vs depth: slope {slope:+.3f} per layer, R^2 = {r2:.2f}; ratio input/output "
        f"from the fit 10^{decades:+.1f}",
    ]
    trouble = _first_trouble(run)
    if trouble is not None:
        evidence.append(f"the first spike or non-finite gradient came at step {trouble}")
    if explode:
        summary, advice = _exploding(first, last, per_layer, decades, len(layers))
    else:
        summary, advice = _vanishing(first, last, per_layer, decades)
    return Finding(
        cause="init_depth",
        title="Initialization / depth: " + ("exploding" if explode else "vanishing") + " gradients",
        summary=summary,
        evidence=evidence,
        advice=advice,
        severity="high" if explode and trouble is not None else "medium",
        step=early[0]["step"],
        layers=[first, last],
    )


def _first_logits(run: RunLog) -> tuple[dict[str, Any] | None, float | None]:
    """The first step's record and its largest output logit: its forward ran on the initial
    weights (the later ones on weights a too-high LR may already have changed)."""
    first = next((s for s in run.steps if _step(s) is not None), None)
    lg = first.get("logits") if first is not None else None
    return first, _num(lg.get("absmax")) if isinstance(lg, dict) else None


def _small_outputs(run: RunLog) -> Finding | None:
    """Outputs near zero on the initial weights, and a loss that never moved, with the units
    alive (units dead from the start, e.g. biases pushed negative, are ``dead_units``)."""
    # Imported here: the rules register in their report order.
    from .progress import NO_PROGRESS, _no_progress
    from .units import _dead, _profiles

    first, small = _first_logits(run)
    if first is None or small is None or small > INIT_LOGITS_SMALL or not _no_progress(run):
        return None
    profiles = _profiles(run, _weight_layers(run)[:-1])
    if profiles and _dead(profiles[0][1]):
        return None
    losses = [v for s in run.steps if (v := _num(s.get("loss"))) is not None]
    return Finding(
        cause="init_depth",
        title="Initialization: outputs near zero from the start",
        summary=(
            f"The model's outputs start at most {small:.2g} and the loss never moved from "
            f"{losses[0]:.3g}: the initial weights are too small, so the signal, and the "
            "gradients, die on their way through the layers."
        ),
        evidence=[
            f"largest output logit {small:.2g} at step {first['step']}, on the initial weights "
            "(a well-initialized network starts at a few units)",
            f"the loss stayed within {NO_PROGRESS:.0%} of {losses[0]:.3g} over the whole run "
            f"({len(losses)} steps)",
        ],
        advice=[
            "Initialize with He (kaiming_normal_, for ReLU) or Xavier (for tanh) init at gain 1, "
            "not scaled down; check any custom init's std against 1/sqrt(fan_in).",
            "Normalization (LayerNorm/BatchNorm) or residual connections keep the signal's size "
            "through depth whatever the init.",
        ],
        severity="high",
        step=first["step"],
    )


def _large_outputs(run: RunLog) -> Finding | None:
    """The finding for outputs far too large from the first steps (``logits`` telemetry)."""
    first, big = _first_logits(run)
    if first is None or big is None or big < INIT_LOGITS:
        return None
    evidence = [
        f"largest output logit {big:.3g} at step {first['step']}, on the initial weights "
        "(a well-initialized network starts at a few units)"
    ]
    loss = _num(first.get("loss"))
    if loss is not None:
        evidence.append(f"loss {loss:.3g} at step {first['step']}")
    trouble = _first_trouble(run)
    if trouble is not None:
        evidence.append(f"the first spike or non-finite gradient came at step {trouble}")
    return Finding(
        cause="init_depth",
        title="Initialization: outputs far too large from the start",
        summary=(
            f"The model's outputs start at up to {big:.3g}: the initial weights are too large, "
            "so the loss and the gradients are huge from the first step."
        ),
        evidence=evidence,
        advice=[
            "Initialize at scale 1: He (nn.init.kaiming_normal_) for ReLU/GELU, Xavier with the "
            "activation's gain for tanh; check any custom init or weight scaling.",
            "Scale the output layer's init down (or zero it) so the first predictions are near "
            "uniform; normalization layers keep activations from compounding.",
            "Meanwhile clip: policy 'default' bounds the first steps' updates.",
        ],
        severity="high" if trouble is not None else "medium",
        step=first["step"],
    )


def _early_steps(run: RunLog) -> list[dict[str, Any]]:
    """The first ``INIT_STEPS`` steps with finite per-layer norms, before any event (fp16
    overflows aside: they are routine)."""
    quiet = {"amp_overflow"}
    event_steps = [
        e["step"] for e in run.events if _step(e) is not None and e.get("kind") not in quiet
    ]
    before = min(event_steps) if event_steps else None
    return [
        s
        for s in run.steps
        if _step(s) is not None
        and (before is None or s["step"] < before)
        and _list(s.get("layer_norms"))
        and not _list(s.get("nonfinite_layers"))
    ][:INIT_STEPS]


def _depth_profile(run: RunLog, early: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """The weight layers in forward order that have norms, and each one's median log10 norm."""
    layers, logs = [], []
    for i in _weight_layers(run):
        vals = []
        for s in early:
            norms = s["layer_norms"]
            v = _num(norms[i]) if i < len(norms) else None
            if v is not None and v > 0:
                vals.append(math.log10(v))
        if vals:
            layers.append(i)
            logs.append(statistics.median(vals))
    return layers, logs


def _exploding(
    first: str, last: str, per_layer: float, decades: float, n_layers: int
) -> tuple[str, list[str]]:
    summary = (
        f"Initialization/depth: going from the output toward the input the gradient is "
        f"multiplied by about {per_layer:.2f} per layer, so {first} gets "
        f"{10**decades:.3g}x the gradient of {last} (exploding gradients from the start)."
    )
    advice = [
        "Initialize at scale 1: He (nn.init.kaiming_normal_, ReLU/GELU) or Xavier "
        "(nn.init.xavier_uniform_ with gain=nn.init.calculate_gain('tanh') for tanh); a "
        f"factor of {per_layer:.2f} per layer compounds over {n_layers} layers.",
        "Add residual connections and normalization (LayerNorm/BatchNorm) so that the "
        "gradient's size no longer multiplies layer by layer.",
        "Or use fewer layers; meanwhile clip: policy 'default' or 'clip_norm:1.0'.",
    ]
    return summary, advice


def _vanishing(first: str, last: str, per_layer: float, decades: float) -> tuple[str, list[str]]:
    summary = (
        f"Initialization/depth: going from the output toward the input the gradient shrinks "
        f"by about {1 / per_layer:.2f}x per layer, so {first} gets only "
        f"{10**decades:.2g} of the gradient of {last} (vanishing gradients)."
    )
    advice = [
        "Initialize at scale 1: He (nn.init.kaiming_normal_) for ReLU/GELU, Xavier with the "
        "activation's gain for tanh; PyTorch's default Linear init is smaller than both.",
        "Use ReLU/GELU rather than sigmoid/tanh in deep stacks; add residual connections "
        "and normalization (LayerNorm/BatchNorm).",
        "Or use fewer layers.",
    ]
    return summary, advice
