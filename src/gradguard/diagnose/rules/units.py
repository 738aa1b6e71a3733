"""``dead_units``: most units of the network's hidden layers stopped getting any gradient (dead
ReLUs, or saturated tanh/sigmoid units), and stayed so to the end of the run.

A ReLU unit whose input is negative for every example of a batch passes no gradient: the row of
the weight gradient that feeds it is exactly zero (the telemetry's ``dead_units``, the share of
such rows per layer that stayed zero on every batch of the few steps up to a sampled step: one
batch alone leaves a rarely active unit silent by chance). Once most units of a layer are dead
the layers below it get no gradient either, and the network can no longer learn: a large update that pushed the biases
negative (too high an LR), a negative bias init, or a large init that saturated the units does it
(Lu et al. 2019, "Dying ReLU and Initialization"). Files without ``dead_units`` are read through
the per-layer gradient norms: a hidden layer whose gradient is exactly zero is wholly dead.
"""

from __future__ import annotations

import statistics

from ..records import RunLog
from .base import Finding, _layer, _list, _num, _step, _weight_layers
from .registry import register

#: The hidden layers' mean share of dead units at the end of the run beyond which the network is
#: mostly dead ...
DEAD_SHARE = 0.5
#: ... or one hidden layer's share (a layer that passes no gradient starves every layer below).
DEAD_LAYER = 0.95
#: Sampled steps at the end of the run whose median share is "the end".
DEAD_LAST = 3


def _profiles(run: RunLog, hidden: list[int]) -> list[tuple[int, dict[int, float]]]:
    """(step, {hidden layer: dead share}) on every step that recorded it; through the gradient
    norms (exactly zero: wholly dead) when the file has no ``dead_units`` at all."""
    steps = [s for s in run.steps if _step(s) is not None]
    has_field = any(isinstance(s.get("dead_units"), list) for s in steps)
    out = []
    for s in steps:
        if has_field:
            shares = _list(s.get("dead_units"))
            row = {i: v for i in hidden if i < len(shares) and (v := _num(shares[i])) is not None}
        else:
            norms = _list(s.get("layer_norms"))
            row = {
                i: 1.0 if v == 0.0 else 0.0
                for i in hidden
                if i < len(norms) and (v := _num(norms[i])) is not None
            }
        if row:
            out.append((s["step"], row))
    return out


def _end_shares(profiles: list[tuple[int, dict[int, float]]]) -> dict[int, float]:
    last = profiles[-DEAD_LAST:]
    layers = {i for _, row in last for i in row}
    return {i: statistics.median(row[i] for _, row in last if i in row) for i in layers}


def _dead(shares: dict[int, float]) -> bool:
    return bool(shares) and (
        statistics.fmean(shares.values()) >= DEAD_SHARE or max(shares.values()) >= DEAD_LAYER
    )


def _since(profiles: list[tuple[int, dict[int, float]]]) -> int:
    """The first sampled step from which every later sample was dead."""
    since = profiles[-1][0]
    for step, row in reversed(profiles):
        if not _dead(row):
            break
        since = step
    return since


def died_during(run: RunLog) -> int | None:
    """The sampled step from which the hidden layers were dead to the end of the run, when they
    were alive at the first sample (the training killed them); None when they are alive at the
    end, or were dead from the start (an init, e.g. negative biases, killed them)."""
    hidden = _weight_layers(run)[:-1]
    profiles = _profiles(run, hidden) if hidden else []
    if len(profiles) < DEAD_LAST or not _dead(_end_shares(profiles)) or _dead(profiles[0][1]):
        return None
    return _since(profiles)


def dead_from_start(run: RunLog) -> bool:
    """Whether the hidden layers were dead at the first sample (an init killed them)."""
    hidden = _weight_layers(run)[:-1]
    profiles = _profiles(run, hidden) if hidden else []
    return bool(profiles) and _dead(profiles[0][1])


@register
def dead_units(run: RunLog) -> Finding | None:
    """Most units of the hidden layers (or all of one) get exactly zero gradient at the end."""
    weights = _weight_layers(run)
    hidden = weights[:-1]  # the last weight layer is the output: its rows are the outputs
    if not hidden:
        return None
    profiles = _profiles(run, hidden)
    if len(profiles) < DEAD_LAST:
        return None
    shares = _end_shares(profiles)
    if not _dead(shares):
        return None
    since = _since(profiles)
    mean = statistics.fmean(shares.values())
    worst = sorted(shares, key=lambda i: -shares[i])
    dead_layers = [i for i in worst if shares[i] >= DEAD_LAYER]
    evidence = [
        f"at the end ({DEAD_LAST} last sampled steps): {mean:.0%} of the hidden layers' units "
        f"get no gradient on average; "
        + ", ".join(f"{_layer(run, i)} {shares[i]:.0%}" for i in worst[:5]),
        f"dead from step {since} on",
    ]
    losses = [v for s in run.steps if (v := _num(s.get("loss"))) is not None]
    if len(losses) >= 10:
        evidence.append(
            f"the loss was {losses[0]:.3g} at the start and {statistics.median(losses[-5:]):.3g} "
            "at the end"
        )
    return Finding(
        cause="dead_units",
        title="Dead units",
        summary=(
            f"From step {since} on, {mean:.0%} of the hidden units get exactly zero gradient"
            + (f" ({len(dead_layers)} layer(s) wholly dead)" if dead_layers else "")
            + ": they no longer learn, and the layers below them get no gradient either."
        ),
        evidence=evidence,
        advice=[
            "Use an activation that always passes some gradient: Leaky ReLU (e.g. the mlp "
            "model's activation=leaky_relu) or GELU instead of ReLU.",
            "Lower the learning rate or warm it up: one large update can push a unit's bias so "
            "negative that it never fires again.",
            "Initialize with He (kaiming) init and zero biases; normalization before the "
            "activation (BatchNorm/LayerNorm) keeps pre-activations centred.",
        ],
        severity="high" if dead_layers or mean >= 0.9 else "medium",
        step=since,
        layers=[_layer(run, i) for i in (dead_layers or worst[:3])],
    )
