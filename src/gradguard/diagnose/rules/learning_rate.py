"""``lr_too_high``: updates are a large fraction of the weights (update/weight ratio)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from ..records import RunLog
from .base import (
    Finding,
    _first_trouble,
    _g,
    _layer,
    _lone_nonfinite,
    _lone_spikes,
    _num,
    _step,
    _trouble,
)
from .registry import register

#: The update:data ratio rule of thumb: each step should change a weight matrix by about 1e-3 of
#: its norm (Karpathy, CS231n "Neural Networks Part 3", and "A Recipe for Training Neural Networks").
UPDATE_RATIO_TARGET = 1e-3
#: Ten times the rule of thumb for the median layer, before the trouble started: too high.
UPDATE_RATIO_HIGH = 1e-2
#: One layer changing by 10% of its norm per step (100x the rule of thumb) before the trouble.
UPDATE_RATIO_LAYER_HIGH = 0.1
#: Without any spike or NaN, only a median layer moving 10% per step is reported: far enough from
#: the rule of thumb that it is not a matter of taste (Adam at lr 3e-4 on weights of std 0.02 gives
#: about 1.5e-2, which trains well).
UPDATE_RATIO_SEVERE = 0.1
#: How the advice's LR change begins (``gradguard advise`` replaces that line with what its LR
#: probe measured).
LR_CHANGE = "Divide the learning rate"
#: Sampled steps (every 10th by default) whose updates must be too large: one sampled step is no
#: evidence (Adam's first steps move every weight by about the LR, whatever the LR's later fate).
UPDATE_RATIO_MIN_STEPS = 3
#: Sampled steps enough when one of them moved the median layer by more than its size (a CNN at
#: SGD LR 1.5: 0.42 and 4.5x its weights on steps 0 and 1, then at chance for 200 steps).
RUNAWAY_RATIO = 1.0
RUNAWAY_MIN_STEPS = 2
#: The leading too-large steps may start this many samples in (momentum's build-up).
LEAD_START = 3


@register
def lr_too_high(run: RunLog) -> Finding | None:
    """Update/weight ratio far above ~1e-3 on several sampled steps before the first spike or NaN.

    The sampled steps are judged all together and, where the run shows the damage (trouble,
    units ``dead_units`` finds dead, a loss that rose 10x in its first steps or never fell), on
    their own the ones from the start for as long as each is
    too large: a run that blows up, or kills its units, within a few steps has most of its
    samples after the damage, where updates are small again. A loss that degraded
    or stalled with no event (``loss_degradation``) is trouble too: the steps before it are
    judged as before a spike. So is a loss that keeps jumping far above its recent level with no
    event (``progress._loss_jumps``): Adam at too high an LR on a small net can reach a low loss
    and bounce off it every few steps, with calm gradients; its updates are judged all together
    against the troubled threshold.
    A lone non-finite step the run recovered from (``single_bad_step``) says nothing about the
    LR: such a run is judged on all its sampled steps with the thresholds of a run without
    events (the median layer, or one layer, moving 10% per step). Nor do one or two gradient
    spikes after which the loss neither degraded nor stalled: that run is judged as one without
    events (Adam's healthy updates are ~1e-2 of the weights, the troubled threshold), nor spikes
    that all came on outlier batches (the data's doing)."""
    lone = bool(_lone_nonfinite(run))
    first = None if lone or _data_trouble_only(run) else _first_trouble(run)
    if first is not None and _lone_spikes(run) and _quiet_trouble(run) is None:
        first = None  # one or two spikes the loss shrugged off: no trouble to judge the LR by
    quiet = _quiet_trouble(run) if first is None and not lone else None
    jumps = _erratic(run) if first is None and quiet is None and not lone else []
    troubled = first is not None or quiet is not None or bool(jumps)
    sampled = _sampled_before(run, first if first is not None else quiet)
    median_limit = UPDATE_RATIO_HIGH if troubled else UPDATE_RATIO_SEVERE
    layer_limit = UPDATE_RATIO_LAYER_HIGH if troubled or lone else math.inf
    # The lead-in judged on its own needs the damage it stands for: trouble, units that died or a
    # loss that blew up in it (a vanilla RNN at 1.5x init moved its weights by ~0.2 a step for
    # three samples, then trained well with no event: large first steps alone are not a too-high
    # LR).
    lead = troubled or lone or _units_died(run) or _early_blowup(run) or _never_learned(run)
    for chosen in (sampled, _leading(sampled, median_limit, layer_limit)) if lead else (sampled,):
        verdict = _judge(chosen, median_limit, layer_limit)
        if verdict is not None:
            return _finding(run, chosen, *verdict, first, quiet, jumps)
    return None


def _data_trouble_only(run: RunLog) -> bool:
    """Whether every spike or non-finite event came on an outlier batch or within
    :data:`OUTLIER_AFTER` steps after one: trouble the data made, not the LR (an LSTM under Adam
    3e-3, updates ~3e-2 of its weights as Adam's are, spiked only on a batch scaled 300x)."""
    from .outliers import outlier_steps  # here: the rules register in their report order

    bad = outlier_steps(run)
    steps = {e["step"] for e in _trouble(run)}
    return bool(bad) and all(any(0 <= s - b <= OUTLIER_AFTER for b in bad) for s in steps)


#: Steps after an outlier batch whose spikes are still that batch's (momentum carries it).
OUTLIER_AFTER = 2


def _never_learned(run: RunLog) -> bool:
    """Whether the loss ended above 80% of where it started (``progress.did_not_learn``): a CNN
    at SGD LR 1.5 moved its weights by 0.2-2.9x their size on its first three steps and then sat
    at chance for 200 steps, with two late spikes and no NaN."""
    from .progress import did_not_learn  # here: the rules register in their report order

    return did_not_learn(run) is not None


def _early_blowup(run: RunLog) -> bool:
    """Whether the loss blew up in the lead-in: within the first :data:`EARLY_STEPS` recorded
    steps it rose to :data:`EARLY_LOSS_JUMP` times its first value (an LSTM under Adam at LR 0.3:
    its first update 4x its weights, the loss from 1.3 to 96 at step 1; Adam's second moment then
    caught up and it trained, with no event: the detector has no history that early)."""
    losses = [
        v
        for s in run.steps[:EARLY_STEPS]
        if _step(s) is not None and (v := _num(s.get("loss"))) is not None
    ]
    return len(losses) >= 2 and losses[0] > 0 and max(losses[1:]) >= EARLY_LOSS_JUMP * losses[0]


#: The recorded steps of the lead-in, and the rise of the loss over its first value in them that
#: is a blow-up (a healthy start does not multiply its loss by 10).
EARLY_STEPS = 10
EARLY_LOSS_JUMP = 10.0


def _units_died(run: RunLog) -> bool:
    """Whether ``dead_units`` finds dead units in the run."""
    from .units import dead_units  # here: the rules register in their report order

    return dead_units(run) is not None


def _erratic(run: RunLog) -> list[int]:
    """The steps of the loss's jumps when it is erratic without any event, or []."""
    from .progress import _loss_jumps  # here: the rules register in their report order

    return _loss_jumps(run)


def _quiet_trouble(run: RunLog) -> int | None:
    """The step from which the loss degraded or stalled without any event, or None."""
    from .progress import _degradation, _stall  # here: the rules register in their report order

    d = _degradation(run)
    if d is not None:
        return int(d["best"][1])
    st = _stall(run)
    return int(st["half"][0]) if st is not None else None


def _judge(
    sampled: list[dict[str, Any]], median_limit: float, layer_limit: float
) -> tuple[dict[int, float], float, int] | None:
    """(each layer's median ratio, the median layer's, the worst layer) when the updates of
    ``sampled`` are too large, on at least :data:`UPDATE_RATIO_MIN_STEPS` steps; else None."""
    by_layer = _median_ratios(sampled)
    if not by_layer:
        return None
    typical = statistics.median(by_layer.values())
    worst = max(by_layer, key=lambda i: by_layer[i])
    fires = typical > median_limit or by_layer[worst] > layer_limit
    need = UPDATE_RATIO_MIN_STEPS if not _runaway(sampled) else RUNAWAY_MIN_STEPS
    if not fires or _steps_too_high(sampled, worst, median_limit, layer_limit) < need:
        return None
    return by_layer, typical, worst


def _runaway(sampled: list[dict[str, Any]]) -> bool:
    """Whether a sampled step moved its median layer by more than the layer's own size (what no
    optimizer's first step does at a sound LR: Adam's moves each weight by about the LR)."""
    for s in sampled:
        ratios = [v for v in map(_num, s["update_ratio"]) if v is not None and v > 0]
        if ratios and statistics.median(ratios) > RUNAWAY_RATIO:
            return True
    return False


def _finding(
    run: RunLog,
    sampled: list[dict[str, Any]],
    by_layer: dict[int, float],
    typical: float,
    worst: int,
    first: int | None,
    quiet: int | None,
    jumps: list[int],
) -> Finding:
    lrs = [v for v in (_num(s.get("lr")) for s in sampled) if v is not None]
    lr = statistics.median(lrs) if lrs else None
    hot = sorted(
        (i for i, r in by_layer.items() if r > UPDATE_RATIO_HIGH), key=lambda i: -by_layer[i]
    )
    evidence = _evidence(run, sampled, by_layer, typical, worst, lr, first)
    if quiet is not None:
        evidence.append(f"the loss degraded or stalled from step {quiet}, without any event")
    if jumps:
        from .progress import JUMP_RATIO  # here: the rules register in their report order

        evidence.append(
            f"the loss jumped to over {JUMP_RATIO:g}x its recent median on {len(jumps)} steps "
            f"(the first at step {jumps[0]}) without any gradient event: steps too large for it "
            "to settle"
        )
    return Finding(
        cause="lr_too_high",
        title="Learning rate too high",
        summary=(
            "The learning rate is too high: each step changes the weights by "
            f"{_g(typical if typical > UPDATE_RATIO_HIGH else by_layer[worst])} of their size, "
            "far above the ~1e-3 that trains stably."
        ),
        evidence=evidence,
        advice=_advice(run, by_layer, typical, worst, lr),
        severity="high" if first is not None else "medium",
        step=first if first is not None else sampled[0]["step"],
        layers=[_layer(run, i) for i in (hot or [worst])[:5]],
    )


def _sampled_before(run: RunLog, first: int | None) -> list[dict[str, Any]]:
    """The steps with a sampled update ratio that took their update, before step ``first``."""
    return [
        s
        for s in run.steps
        if isinstance(s.get("update_ratio"), list)
        and _step(s) is not None
        and not s.get("skipped")
        and not s.get("rolled_back")
        and (first is None or s["step"] < first)
    ]


def _leading(
    sampled: list[dict[str, Any]], median_limit: float, layer_limit: float
) -> list[dict[str, Any]]:
    """The sampled steps from the first that is too large on its own, for as long as each is;
    the first must come among the first :data:`LEAD_START` samples (SGD with momentum builds its
    step up: its first update is ``1 - beta`` of the later ones, so a too-high LR can show only
    from the second sampled step)."""
    out: list[dict[str, Any]] = []
    for i, s in enumerate(sampled):
        if _too_large(s, median_limit, layer_limit):
            out.append(s)
        elif out or i + 1 >= LEAD_START:
            break
    return out


def _steps_too_high(
    sampled: list[dict[str, Any]], worst: int, median_limit: float, layer_limit: float
) -> int:
    """How many sampled steps on their own show updates too large: the median layer above
    ``median_limit``, or the worst layer above ``layer_limit``."""
    return sum(1 for s in sampled if _too_large(s, median_limit, layer_limit, worst))


def _too_large(
    s: dict[str, Any], median_limit: float, layer_limit: float, worst: int | None = None
) -> bool:
    """Whether one sampled step's updates are too large: its median layer above
    ``median_limit``, or layer ``worst`` (any layer when None) above ``layer_limit``; False
    when it has no ratio."""
    ratios = [v for v in map(_num, s["update_ratio"]) if v is not None and v > 0]
    if not ratios:
        return False
    if worst is None:
        w: float | None = max(ratios)
    else:
        r = s["update_ratio"]
        w = _num(r[worst]) if worst < len(r) else None
    return statistics.median(ratios) > median_limit or (w is not None and w > layer_limit)


def _median_ratios(sampled: list[dict[str, Any]]) -> dict[int, float]:
    """Each layer's median update ratio over the sampled steps (frozen layers left out)."""
    per_layer: dict[int, list[float]] = {}
    for s in sampled:
        for i, r in enumerate(s["update_ratio"]):
            v = _num(r)
            if v is not None and v > 0:  # 0: a frozen layer, which does not learn at all
                per_layer.setdefault(i, []).append(v)
    return {i: statistics.median(v) for i, v in per_layer.items()}


def _evidence(
    run: RunLog,
    sampled: list[dict[str, Any]],
    by_layer: dict[int, float],
    typical: float,
    worst: int,
    lr: float | None,
    first: int | None,
) -> list[str]:
    span = f"steps {sampled[0]['step']}-{sampled[-1]['step']}"
    when = (
        f"before the first spike/non-finite step ({first}) ({span})" if first is not None else span
    )
    evidence = [
        f"median update/weight ratio {_g(typical)} over {len(by_layer)} layers and "
        f"{len(sampled)} sampled steps {when}; the rule of thumb is ~1e-3",
        f"largest: {_layer(run, worst)} at {_g(by_layer[worst])} per step",
    ]
    if lr is not None:
        evidence.append(f"learning rate {_g(lr)}")
    if typical > 1:
        evidence.append(
            "the updates are larger than the weights themselves: the run diverges from its first "
            "steps, which also points at the initialization or unscaled inputs"
        )
    if first is not None:
        evidence.append(f"the first spike or non-finite gradient came at step {first}")
    return evidence


def _advice(
    run: RunLog, by_layer: dict[int, float], typical: float, worst: int, lr: float | None
) -> list[str]:
    advice = []
    if typical > 1:
        # Updates larger than the weights: the run is already running away, and the ratio grows
        # with the weights it inflates; it no longer scales linearly with the LR.
        target = f" (from {_g(lr)} to {lr / 10:.2g} or less)" if lr is not None else ""
        advice.append(
            f"{LR_CHANGE} by 10 or more{target} and measure again: at updates "
            f"{_g(typical)}x the weights the run is already diverging, so this ratio overstates "
            "the factor (updates scale about linearly with the LR only near the ~1e-3 working point)."
        )
    elif typical > UPDATE_RATIO_HIGH:
        factor = typical / UPDATE_RATIO_TARGET
        target = f" (from {_g(lr)} to about {lr / factor:.2g})" if lr is not None else ""
        advice.append(
            f"{LR_CHANGE} by about {factor:.0f}{target}: the update grows about "
            "linearly with the LR for SGD and Adam, and ~1e-3 of the weights per step is the "
            "usual working point."
        )
    else:
        factor = by_layer[worst] / UPDATE_RATIO_TARGET
        advice.append(
            f"Give {_layer(run, worst)} its own parameter group with a learning rate about "
            f"{factor:.0f}x smaller, or bound updates relative to the weights with policy 'agc'."
        )
    advice += [
        "Warm the learning rate up linearly over the first few hundred to few thousand steps "
        "(e.g. torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=1000)).",
        "Keep a safety net while tuning: policy 'default' (skip non-finite steps, clip spikes) "
        "or 'skip_nonfinite+lr_backoff' to cut the LR when spikes repeat.",
    ]
    return advice
