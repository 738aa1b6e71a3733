"""``label_noise``: a burst of batches whose loss jumped far above the run's level while the
inputs, the learning rate and the updates before it were normal, and the run recovered after.

That is what wrong labels do (a shuffled or corrupted shard, a bad join in the data pipeline): the
model is fine, so its loss on correctly labelled batches stays low, and on a run of wrongly labelled
ones it jumps at once, with the gradient; the batches after the burst bring it back. A loss that
climbs because the weights went bad does not come back when the data does, and an LR or an input
outlier that explains the jump is reported by its own rule instead.
"""

from __future__ import annotations

import statistics
from typing import Any

from ..records import RunLog
from .base import Finding, _finite_step, _g, _num, _step
from .learning_rate import UPDATE_RATIO_HIGH
from .outliers import _input_stats, _outlier
from .registry import register
from .updates import lr_jumps, update_series

#: Loss spike events at most this many steps apart belong to one burst ...
LABEL_GAP = 5
#: ... and a burst has at least this many spike steps (one bad batch is ``outlier_batch``'s or
#: chance: only a run of them says the data went wrong).
LABEL_MIN_STEPS = 2
#: The burst's first spike: at least this many times the median loss of the steps before it.
LABEL_JUMP = 3.0
#: Steps before the burst that set its level.
LABEL_BEFORE = 20
#: The run recovered: within this many steps after the burst the loss came back to at most
#: ``LABEL_RECOVER`` times the level before it, or gave back all but ``LABEL_BACK`` of its jump
#: (a model that had memorized its batches, loss ~0 before, relearns from a long burst in more
#: than those steps, but its loss comes back down all the same).
LABEL_AFTER = 150
LABEL_RECOVER = 3.0
LABEL_BACK = 0.1


def _bursts(run: RunLog) -> list[list[int]]:
    steps = sorted(
        {e["step"] for e in run.events if e.get("kind") == "loss_spike" and _step(e) is not None}
    )
    out: list[list[int]] = []
    for s in steps:
        if out and s - out[-1][-1] <= LABEL_GAP:
            out[-1].append(s)
        else:
            out.append([s])
    return [b for b in out if len(b) >= LABEL_MIN_STEPS]


def _losses(run: RunLog) -> list[tuple[int, float]]:
    return [
        (s["step"], v)
        for s in run.steps
        if _step(s) is not None and (v := _num(s.get("loss"))) is not None
    ]


def _judge(
    run: RunLog, burst: list[int], losses: list[tuple[int, float]], ctx: dict[str, Any]
) -> dict[str, Any] | None:
    first, last = burst[0], burst[-1]
    before = [v for s, v in losses if first - LABEL_BEFORE <= s < first]
    at = next((v for s, v in losses if s == first), None)
    if len(before) < LABEL_BEFORE // 2 or at is None:
        return None
    level = statistics.median(before)
    if level <= 0 or at < LABEL_JUMP * level:
        return None
    peak = max(v for s, v in losses if first <= s <= last)
    after = [v for s, v in losses if last < s <= last + LABEL_AFTER]
    if not after or min(after) > max(LABEL_RECOVER * level, level + LABEL_BACK * (peak - level)):
        return None
    recs = [s for s in run.steps if _step(s) is not None and first <= s["step"] <= last]
    if not all(_finite_step(s) for s in recs):
        return None
    if any(j["first"] <= last and j["last"] >= first - LABEL_BEFORE for j in ctx["jumps"]):
        return None
    ratios = [r for s, r in ctx["updates"] if s < first]
    if ratios and statistics.median(ratios[-5:]) > UPDATE_RATIO_HIGH:
        return None
    for step in burst:
        if _outlier({"step": step, "kind": "loss_spike"}, ctx["inputs"], set(burst)) is not None:
            return None
    return {
        "first": first,
        "last": last,
        "steps": len(burst),
        "level": level,
        "peak": peak,
        "back": min(after),
    }


@register
def label_noise(run: RunLog) -> Finding | None:
    """A burst of loss spikes with normal inputs, LR and updates, from which the run recovered."""
    bursts = _bursts(run)
    if not bursts:
        return None
    losses = _losses(run)
    ctx = {
        "jumps": lr_jumps(run),
        "updates": update_series(run),
        "inputs": [
            (s["step"], st)
            for s in run.steps
            if _step(s) is not None and (st := _input_stats(s)) is not None
        ],
    }
    found = [b for burst in bursts if (b := _judge(run, burst, losses, ctx)) is not None]
    if not found:
        return None
    b = found[0]
    evidence = [
        f"steps {x['first']}-{x['last']}: {x['steps']} loss spikes, the loss up to {_g(x['peak'])} "
        f"from a level of {_g(x['level'])} just before; back to {_g(x['back'])} afterwards"
        for x in found[:3]
    ]
    evidence.append(
        "the inputs of those batches were normal (mean/std/absmax), the LR did not change and "
        "the updates before the burst were small"
    )
    return Finding(
        cause="label_noise",
        title="Bad labels in a run of batches",
        summary=(
            f"At steps {b['first']}-{b['last']} the loss jumped to {_g(b['peak'])} from "
            f"{_g(b['level'])} on normal-looking inputs and came back after: those batches' "
            "labels (or targets) look wrong, not the model or the learning rate."
        ),
        evidence=evidence,
        advice=[
            f"Look at the samples of steps {b['first']}-{b['last']} (log sample ids with each "
            "batch): a shuffled or corrupted shard, a join that misaligned inputs and labels.",
            "Let the Guard skip such steps: 'skip_spike' skips a step whose gradient norm spikes; "
            "'rollback' undoes the steps that damaged the run and records them for the data "
            "loader to skip (skip_batches.json).",
            "If some label noise is expected, label smoothing or a robust loss (e.g. truncated "
            "or symmetric cross-entropy) limits what one wrong batch can do.",
        ],
        severity="medium",
        step=b["first"],
    )
