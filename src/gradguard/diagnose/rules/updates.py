"""``update_spike``: the update jumped far above its own history while the gradient did not
explain it, or the learning rate jumped from a flat level.

At scale, update-norm spikes come before loss spikes (Wortsman et al. 2023, "Small-scale proxies
for large-scale Transformer training instabilities"; Molybog et al. 2023, "A Theory on Adam
Instability in Large-Scale Machine Learning"): an LR schedule that jumps (a bad warmup or resume),
or Adam's second moment gone stale, makes one step move the weights far more than the steps before
it, with the gradient looking normal. A spike the gradient explains (the gradient grew as much as
the update) is the gradient's problem and is left to the other rules.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ..records import RunLog
from .base import Finding, _g, _num, _step, _trouble
from .registry import register

#: A sampled update/weight ratio this many times the median of the samples before it is a spike.
UPD_SPIKE = 10.0
#: Samples needed before one can be called a spike, and how many earlier samples are compared.
UPD_MIN_HISTORY = 5
UPD_HISTORY = 20
#: A spike is the gradient's when the gradient norm rose by at least this share of the update's
#: rise (the update of SGD is the gradient times the LR: it cannot rise more on its own).
UPD_GRAD_SHARE = 1 / 3
#: Steps of gradients an update can still carry: momentum 0.9 keeps 0.9^20 = 12% of a gradient
#: 20 steps on (Adam's first moment the same), so an update spike within 20 steps of a gradient
#: spike as large is that gradient's.
UPD_MOMENTUM_STEPS = 20
#: The LR jumped: at least this many times its level over the records before, which were flat
#: (within a factor ``LR_FLAT`` of each other: a warmup or a decay is not flat).
LR_JUMP = 3.0
LR_FLAT = 2.0
LR_HISTORY = 10
#: A jump matters when a spike or non-finite event, or a sampled update spike, came within this
#: many steps after it began, or when a sampled update inside it rose at least ``LR_JUMP`` times
#: the median of the samples just before the jump (the updates followed the LR: an update spike
#: of the LR's making, however the run took it).
UPD_AFTER = 50


def _records(run: RunLog) -> list[dict[str, Any]]:
    return [s for s in run.steps if _step(s) is not None]


def update_series(run: RunLog) -> list[tuple[int, float]]:
    """(step, largest per-layer update/weight ratio) on every step where it was measured: the
    telemetry's sampled ``update_ratio``, or ``update_clip``'s per-step measurement."""
    out = []
    for s in _records(run):
        ratios = [v for v in (_num(r) for r in (s.get("update_ratio") or [])) if v is not None]
        metrics = s.get("metrics")
        metrics = metrics if isinstance(metrics, dict) else {}
        measured = _num(metrics.get("update_clip.max_ratio"))
        if ratios:
            out.append((s["step"], max(ratios)))
        elif measured is not None and measured > 0:
            out.append((s["step"], measured))
    return out


def lr_jumps(run: RunLog) -> list[dict[str, Any]]:
    """Each stretch of records whose LR jumped from a flat level: first and last step, the level
    before, the largest factor over it."""
    recs = [(s["step"], v) for s in _records(run) if (v := _num(s.get("lr"))) is not None and v > 0]
    jumps: list[dict[str, Any]] = []
    calm: list[float] = []
    cur: dict[str, Any] | None = None
    for step, lr in recs:
        if cur is not None:
            if lr >= math.sqrt(LR_JUMP) * cur["level"]:
                cur["last"] = step
                cur["factor"] = max(cur["factor"], lr / cur["level"])
                continue
            cur = None
        prev = calm[-LR_HISTORY:]
        if len(prev) >= UPD_MIN_HISTORY and max(prev) <= LR_FLAT * min(prev):
            level = statistics.median(prev)
            if lr >= LR_JUMP * level:
                cur = {"first": step, "last": step, "level": level, "factor": lr / level}
                jumps.append(cur)
                continue
        calm.append(lr)
    return jumps


def _grad_rise(norms: list[tuple[int, float | None]], step: int) -> float | None:
    """The largest gradient norm of the :data:`UPD_MOMENTUM_STEPS` steps up to ``step`` over the
    median of the recorded norms before them. Not the norm at ``step`` alone: a momentum or
    Adam update is a running average of the recent gradients, so one huge gradient (an outlier
    batch) keeps the updates large for the steps after it while the gradient itself is calm
    again (measured: a CNN under momentum 0.9, an update 29x its level 10 steps after a batch
    scaled 500x, its gradient then 5.8x)."""
    if next((v for s, v in norms if s == step), None) is None:
        return None
    start = step - UPD_MOMENTUM_STEPS
    recent = [v for s, v in norms if start < s <= step and v is not None]
    before = [v for s, v in norms if s <= start and v is not None][-UPD_HISTORY * 5 :]
    if len(before) < UPD_MIN_HISTORY:
        return None
    level = statistics.median(before)
    if not level > 0:
        return None
    now = max(recent)
    return now / level if math.isfinite(now) else math.inf


def update_spikes(run: RunLog) -> list[dict[str, Any]]:
    """Sampled updates ``UPD_SPIKE`` times the median of the samples before them."""
    series = update_series(run)
    out = []
    for i, (step, ratio) in enumerate(series):
        prev = [r for _, r in series[max(0, i - UPD_HISTORY) : i]]
        if len(prev) < UPD_MIN_HISTORY:
            continue
        level = statistics.median(prev)
        if level > 0 and ratio >= UPD_SPIKE * level:
            out.append({"step": step, "ratio": ratio, "factor": ratio / level, "level": level})
    return out


def _explained_by_gradient(rise: float | None, spike: dict[str, Any]) -> bool:
    return rise is None or not math.isfinite(rise) or rise >= UPD_GRAD_SHARE * spike["factor"]


@register
def update_spike(run: RunLog) -> Finding | None:
    """The update/weight ratio jumped far above its history (the gradient did not explain it),
    or the LR jumped from a flat level and the updates or trouble followed."""
    jumps = lr_jumps(run)
    spikes = update_spikes(run)
    trouble = [e["step"] for e in _trouble(run)]
    norms = [(s["step"], _num(s.get("grad_norm"))) for s in _records(run)]
    rises = {s["step"]: _grad_rise(norms, s["step"]) for s in spikes}

    def within(j: dict[str, Any], steps: list[int]) -> bool:
        return any(j["first"] <= s <= j["last"] + UPD_AFTER for s in steps)

    def in_jump(step: int) -> bool:
        return any(j["first"] <= step <= j["last"] for j in jumps)

    series = update_series(run)

    def followed(j: dict[str, Any]) -> tuple[int, float, float] | None:
        """(step, ratio, factor) of the largest sampled update inside the jump, when it rose
        ``LR_JUMP`` times the samples just before it."""
        before = [r for st, r in series if st < j["first"]][-UPD_MIN_HISTORY:]
        inside = [(r, st) for st, r in series if j["first"] <= st <= j["last"]]
        if len(before) < UPD_MIN_HISTORY or not inside:
            return None
        level = statistics.median(before)
        ratio, step = max(inside)
        return (step, ratio, ratio / level) if level > 0 and ratio >= LR_JUMP * level else None

    follows = {j["first"]: followed(j) for j in jumps}
    bad_jumps = [
        j
        for j in jumps
        if within(j, trouble + [s["step"] for s in spikes]) or follows[j["first"]] is not None
    ]
    lone = [
        s
        for s in spikes
        if not in_jump(s["step"]) and not _explained_by_gradient(rises[s["step"]], s)
    ]
    if not bad_jumps and not lone:
        return None
    evidence = []
    for j in bad_jumps[:3]:
        evidence.append(
            f"the learning rate jumped {j['factor']:.3g}x, from {_g(j['level'])} to "
            f"{_g(j['level'] * j['factor'])}, at steps {j['first']}-{j['last']}"
        )
        if (f := follows[j["first"]]) is not None:
            evidence.append(
                f"step {f[0]}: update/weight ratio {_g(f[1])}, {f[2]:.3g}x the samples just "
                "before the jump"
            )
    for s in (spikes if bad_jumps else lone)[:3]:
        rise = rises[s["step"]]
        grad = f"; the gradient norm {rise:.2g}x its level" if rise is not None else ""
        evidence.append(
            f"step {s['step']}: update/weight ratio {_g(s['ratio'])}, {s['factor']:.3g}x the "
            f"median {_g(s['level'])} of the samples before{grad}"
        )
    first = min([j["first"] for j in bad_jumps] + [s["step"] for s in lone])
    after = [t for t in trouble if t >= first]
    if after:
        evidence.append(f"the first spike or non-finite event after it came at step {after[0]}")
    if bad_jumps:
        summary = (
            f"The learning rate jumped {bad_jumps[0]['factor']:.3g}x at step "
            f"{bad_jumps[0]['first']} from a steady level, and the updates with it"
            + (": the trouble that followed started there." if after else ".")
        )
    else:
        summary = (
            f"At step {lone[0]['step']} the update moved the weights {lone[0]['factor']:.3g}x "
            "more than the steps before, while the gradient had not grown as much: the optimizer, "
            "not the gradient, made the step too large."
        )
    advice = [
        "Check the LR schedule around that step (a warmup that restarts, a resume that loses the "
        "scheduler's state, a per-group LR set by hand): print the LR every step.",
        "Bound the step itself, not only the gradient: policy 'default' includes update_clip, "
        "which caps each layer's update relative to its weights; 'rollback' undoes a step that "
        "ruined the run.",
    ]
    if not bad_jumps:
        advice.append(
            "With Adam, a gradient that grows after a long quiet stretch meets a stale second "
            "moment: raise eps (1e-8 to 1e-6), lower beta2 (0.999 to 0.95), or warm up again."
        )
    return Finding(
        cause="update_spike",
        title="Update-norm spike",
        summary=summary,
        evidence=evidence,
        advice=advice,
        severity="high" if after else "medium",
        step=first,
    )
