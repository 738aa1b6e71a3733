"""``missing_normalization``: a deep plain network without normalization layers had spikes/NaN
(several, or with a loss that degraded or never fell), or the training killed its units."""

from __future__ import annotations

from collections import Counter

from ..records import RunLog
from .base import NONFINITE_KINDS, Finding, _g, _layer, _trouble, _weight_layers
from .registry import register

#: Weight layers from which a plain (unnormalized) network counts as deep: beyond about 8-10
#: layers plain nets needed careful init or BatchNorm to train at all (VGG, Simonyan & Zisserman
#: 2014; He et al. 2015); a heuristic, applied only when the run had spikes or NaN.
NORM_MIN_LAYERS = 8
#: Spike events a run with no non-finite step and no lasting damage must have for its depth to be
#: the story: a deep plain net that trains well through a spike or two is not missing anything.
NORM_MIN_SPIKES = 3


@register
def missing_normalization(run: RunLog) -> Finding | None:
    """A deep plain network (no normalization layer) that had non-finite gradients, several
    spikes, spikes and a loss that ended well above its best or never fell, or hidden units that
    were alive at the start and dead at the end."""
    if run.meta.get("normalization") is not False:  # absent: unknown, say nothing
        return None
    weights = _weight_layers(run)
    if len(weights) < NORM_MIN_LAYERS:
        return None
    # here: the rules register in their report order
    from .depth import init_depth
    from .progress import START_BAND, _degradation, did_not_learn, flat_at_start, stuck_at_start
    from .units import dead_from_start, died_during

    events = _trouble(run)
    # units killed in training are the depth's doing when the init was sound: an init that was
    # off (init_depth) is the account of a run whose signal died through the layers
    init_off = init_depth(run) is not None
    died = died_during(run) if not init_off else None
    nonfinite = any(e["kind"] in NONFINITE_KINDS for e in events)
    # spikes in a net that never learned: a deep plain net at an LR its depth cannot take sits at
    # its starting loss, its signal blown up and damped layer by layer, with no NaN
    stuck = did_not_learn(run) if events else None
    # ... or sits at its start for half the run before it learns at all (a 12-layer plain CNN at
    # momentum LR 0.05: at 2.30 until step 120 of 200, with two spikes)
    late = stuck_at_start(run) if events and stuck is None else None
    # ... or, with no event at all, never left its start (a 12-layer plain CNN at momentum LR
    # 0.05 at 2.30 for 200 steps), unless the init is the account (off, or dead from the start)
    flat = (
        flat_at_start(run)
        if not events and not init_off and died is None and not dead_from_start(run)
        else None
    )
    if (
        died is None
        and not nonfinite
        and stuck is None
        and late is None
        and flat is None
        and (not events or (len(events) < NORM_MIN_SPIKES and _degradation(run) is None))
    ):
        return None
    kinds = Counter(e["kind"] for e in events)
    had = [f"it had {len(events)} spike or non-finite events"] if events else []
    if died is not None:
        had.append(f"its hidden units died from step {died} on")
    if stuck is not None and died is None and not nonfinite:
        had.append(f"its loss stayed near where it started ({_g(stuck[0])} to {_g(stuck[1])})")
    if flat is not None:
        had.append(f"its loss never left its start ({_g(flat)})")
    if late is not None and died is None and not nonfinite:
        had.append(f"its loss sat at its start ({_g(late[1])}) until step {late[0]}")
    evidence = [
        f"{len(weights)} weight layers ({_layer(run, weights[0])} ... "
        f"{_layer(run, weights[-1])}); no BatchNorm/LayerNorm/GroupNorm/RMSNorm layer"
    ]
    if events:
        evidence.append(
            "events: "
            + ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
            + f"; the first at step {events[0]['step']}"
        )
    if died is not None:
        evidence.append(
            f"alive at the first sampled step, most hidden units get no gradient from step {died}"
            " on (see Dead units)"
        )
    if flat is not None:
        evidence.append(
            f"the loss stayed within {START_BAND:.0%} of its start ({_g(flat)}) to the end, with "
            "no spike, no dead units and no init off the mark: the signal does not get through "
            "the layers"
        )
    if late is not None:
        evidence.append(
            f"the loss stayed within {START_BAND:.0%} of its start ({_g(late[1])}) until step "
            f"{late[0]}, half the run or more, before it fell: the signal took that long to get "
            "through the layers"
        )
    if stuck is not None:
        evidence.append(
            f"median loss {_g(stuck[0])} over the first tenth of the run and {_g(stuck[1])} over "
            "the last: it did not learn"
        )
    starts = [e["step"] for e in events[:1]] + ([died] if died is not None else [])
    return Finding(
        cause="missing_normalization",
        title="No normalization layers",
        summary=(
            f"The model stacks {len(weights)} weight layers without any normalization layer, so "
            "the size of activations and gradients compounds with depth; "
            + ", and ".join(had)
            + "."
        ),
        evidence=evidence,
        advice=[
            "Add normalization: BatchNorm after each conv (before the activation) in a CNN, "
            "LayerNorm in an MLP, transformer (pre-norm) or on an RNN's input and hidden state "
            "(Ioffe & Szegedy 2015; Ba et al. 2016).",
            "Standardize the inputs with the training set's mean and std.",
            "Residual connections help too; until then keep policy 'default' to skip and clip.",
        ],
        severity="medium",
        step=min(starts) if starts else 0,
    )
