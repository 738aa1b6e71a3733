"""``loss_degradation``: the loss climbed, or gave back much of what it had learned, with or
without any event; a run that ends well above its own best is never "healthy".

The run's recorded steps are cut into ``DEGRADE_WINDOWS`` equal step ranges and each range's
median loss taken (the median: one spike does not move it). The rule compares the last window with
the best one: how far the loss rose from its best (``rise``) against what it had gained from the
first window to its best (``gain``). Learning slowly is not degrading: a loss that keeps going down,
however slowly, ends at its best and never fires.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ..records import RunLog
from .base import Finding, _g, _num, _step, _trouble, _trouble_text
from .registry import register

#: Step ranges the run is cut into; the last one is "the end of the run".
DEGRADE_WINDOWS = 10
#: Recorded steps with a finite loss needed to say anything (at least ~4 per window).
DEGRADE_MIN_STEPS = 40
#: The end must be above the best by this share of what the run had gained (first window to
#: best): giving back a quarter of the progress is not noise in a window median.
DEGRADE_GIVE_BACK = 0.25
#: ... and by this share of the best loss itself (for a run that never improved: a climb of 5%).
DEGRADE_REL = 0.05
#: ... and by this many times the loss's own spread (MAD) within the last window.
DEGRADE_NOISE = 2.0


def _losses(run: RunLog) -> list[tuple[int, float]]:
    """(step, loss) of every recorded step with a finite loss, in order."""
    return [
        (s["step"], v)
        for s in run.steps
        if _step(s) is not None and (v := _num(s.get("loss"))) is not None
    ]


def _windows(run: RunLog) -> list[tuple[int, int, float, list[float]]]:
    """(first step, last step, median loss, losses) per non-empty step range, in order."""
    pts = _losses(run)
    if len(pts) < DEGRADE_MIN_STEPS:
        return []
    lo, hi = pts[0][0], pts[-1][0]
    width = max(1, math.ceil((hi - lo + 1) / DEGRADE_WINDOWS))
    groups: dict[int, list[tuple[int, float]]] = {}
    for step, v in pts:
        groups.setdefault((step - lo) // width, []).append((step, v))
    return [
        (g[0][0], g[-1][0], statistics.median(v for _, v in g), [v for _, v in g])
        for _, g in sorted(groups.items())
        if len(g) >= 2
    ]


def _degradation(run: RunLog) -> dict[str, Any] | None:
    """The numbers of a degradation (first, best and last window, rise, gain), or None."""
    wins = _windows(run)
    if len(wins) < DEGRADE_WINDOWS // 2:
        return None
    first, last = wins[0], wins[-1]
    best = min(wins[:-1], key=lambda w: w[2])
    gain = max(first[2] - best[2], 0.0)
    rise = last[2] - best[2]
    med = last[2]
    noise = statistics.median(abs(v - med) for v in last[3]) * 1.4826
    need = max(DEGRADE_GIVE_BACK * gain, DEGRADE_REL * abs(best[2]), DEGRADE_NOISE * noise)
    if not rise > need:
        return None
    return {"first": first, "best": best, "last": last, "gain": gain, "rise": rise, "need": need}


def _stall(run: RunLog) -> dict[str, Any] | None:
    """The numbers of a stall far above the early trend's promise, or None.

    The early trend is read from the first three windows' medians ``m0, m1, m2``: gains
    ``g1 = m0 - m1`` and ``g2 = m1 - m2`` shrinking by ``q = g2 / g1`` per window, as a loss that
    converges to a floor does, promise a floor ``F = m2 - g2 q / (1 - q)`` (the geometric tail;
    minus infinity when the gains do not shrink). The run stalled when its second half made no
    progress (:data:`STALL_FLAT`) while the end is still above ``F`` by more than
    :data:`STALL_KEPT` of what the trend promised to lose from the start (``m0 - F``). A run that
    converges to its floor, however high the floor, ends at ``F`` and never fires; a run that keeps
    learning, however slowly, is not flat."""
    wins = _windows(run)
    if len(wins) < DEGRADE_WINDOWS // 2 + 3:
        return None
    meds = [w[2] for w in wins]
    m0, m1, m2, end = meds[0], meds[1], meds[2], meds[-1]
    noise = statistics.median(
        statistics.median(abs(v - w[2]) for v in w[3]) * 1.4826 / math.sqrt(len(w[3])) for w in wins
    )
    g1, g2 = m0 - m1, m1 - m2
    # The early windows must have learned, clearly: above the medians' noise and by 10% of m0.
    if not (end > 0 and g1 > DEGRADE_NOISE * noise and g2 > 0 and m0 - m2 > STALL_EARLY * m0):
        return None
    q = g2 / g1
    floor = m2 - g2 * q / (1 - q) if q < 1 else -math.inf
    half = len(meds) // 2
    progress = min(meds[:half]) - min(meds[half:])
    flat = progress <= max(STALL_FLAT * (m0 - end), DEGRADE_NOISE * noise)
    far = not math.isfinite(floor) or end - floor > STALL_KEPT * (m0 - floor)
    if not flat or not far:
        return None
    return {
        "first": wins[0],
        "early": wins[2],
        "last": wins[-1],
        "floor": floor,
        "progress": progress,
        "half": wins[half],
    }


def _no_progress(run: RunLog) -> bool:
    """The loss never moved: every window's median within :data:`NO_PROGRESS` of the first's."""
    wins = _windows(run)
    if len(wins) < DEGRADE_WINDOWS // 2:
        return False
    m0 = wins[0][2]
    return m0 > 0 and all(abs(w[2] - m0) <= NO_PROGRESS * m0 for w in wins)


def did_not_learn(run: RunLog) -> tuple[float, float] | None:
    """(first, last) window median losses of a run that did not learn: it ended above
    ``1 - NOT_LEARNED`` of where it started; None if it learned (or is too short to say)."""
    wins = _windows(run)
    if len(wins) < DEGRADE_WINDOWS // 2:
        return None
    m0, end = wins[0][2], wins[-1][2]
    return (m0, end) if m0 > 0 and end >= (1 - NOT_LEARNED) * m0 else None


def stuck_at_start(run: RunLog) -> tuple[int, float] | None:
    """(the last step, the loss) of a start the loss sat at for at least half the run: every
    window from the first within :data:`START_BAND` of the first's median, for at least half the
    windows; None otherwise (or too short to say)."""
    wins = _windows(run)
    if len(wins) < DEGRADE_WINDOWS // 2:
        return None
    m0 = wins[0][2]
    if not m0 > 0:
        return None
    n = next((i for i, w in enumerate(wins) if abs(w[2] - m0) > START_BAND * m0), len(wins))
    return (wins[n - 1][1], m0) if n * 2 >= len(wins) else None


def flat_at_start(run: RunLog) -> float | None:
    """The starting loss of a run whose loss never left it: the last window and at least
    :data:`FLAT_SHARE` of all within :data:`START_BAND` of the first window's median (one dip and
    back is still flat); None otherwise (or too short to say)."""
    wins = _windows(run)
    if len(wins) < DEGRADE_WINDOWS // 2:
        return None
    m0 = wins[0][2]
    near = [abs(w[2] - m0) <= START_BAND * m0 for w in wins]
    return m0 if m0 > 0 and near[-1] and sum(near) >= FLAT_SHARE * len(near) else None


#: The share of windows a flat loss keeps within its band.
FLAT_SHARE = 0.8
#: How close to its first window's median the loss stays while it sits at its start.
START_BAND = 0.03
#: A run that lowered its loss by less than this share of its start did not learn (digits: a net
#: that learns goes from 2.3 to under 0.5 in a few hundred steps; a deep plain net stuck at
#: chance stays within 10% of 2.3).
NOT_LEARNED = 0.2
#: The share of its start the loss stays within, everywhere, in a run that never learned.
NO_PROGRESS = 0.02
#: The first three windows must have lowered the loss by this share of its start.
STALL_EARLY = 0.1
#: The second half's progress (its best against the first half's best) below this share of what
#: the run gained overall: flat.
STALL_FLAT = 0.02
#: A stalled end still above the promised floor by this share of the promised drop: far above.
STALL_KEPT = 0.5


#: A loss jump: a finite loss above :data:`JUMP_RATIO` times the median of the
#: :data:`JUMP_WINDOW` finite losses before it ...
JUMP_RATIO = 3.0
JUMP_WINDOW = 20
#: ... and above that median by this share of the run's starting loss (the median of its first
#: five), so that a loss near zero bouncing between 0.001 and 0.005 is no jump.
JUMP_FLOOR = 0.05
#: Jumps on this many steps make the loss erratic. Measured on the diagnosis corpus: healthy MLP,
#: CNN, LSTM and GPT runs have 0 or 1; an MLP under Adam at LR 0.03-0.05 (loss ending near 0.02,
#: no gradient event) has 22-32.
ERRATIC_MIN_JUMPS = 8


def _loss_jumps(run: RunLog) -> list[int]:
    """The steps at which the loss jumped (:data:`JUMP_RATIO` over its recent median, by more
    than :data:`JUMP_FLOOR` of the starting loss) when there are at least
    :data:`ERRATIC_MIN_JUMPS` of them, ascending; else []. A loss that keeps bouncing far above
    its own level while the gradients stay calm is the noise of steps too large for the loss
    to settle."""
    pts = _losses(run)
    if len(pts) < DEGRADE_MIN_STEPS:
        return []
    start = statistics.median(v for _, v in pts[:5])
    if not start > 0:
        return []
    jumps = []
    for i in range(JUMP_WINDOW, len(pts)):
        med = statistics.median(v for _, v in pts[i - JUMP_WINDOW : i])
        step, v = pts[i]
        if v > JUMP_RATIO * med and v - med > JUMP_FLOOR * start:
            jumps.append(step)
    return jumps if len(jumps) >= ERRATIC_MIN_JUMPS else []


def _is_transformer(run: RunLog) -> bool:
    types = [t for t in run.meta.get("layer_types") or [] if isinstance(t, str)]
    names = [n for n in run.meta.get("layers") or [] if isinstance(n, str)]
    return any("Attention" in t or "Transformer" in t for t in types) or any(
        "attn" in n.lower() or "attention" in n.lower() for n in names
    )


def _span(w: tuple[int, int, float, list[float]]) -> str:
    return f"steps {w[0]}-{w[1]}"


@register
def loss_degradation(run: RunLog) -> Finding | None:
    """The loss ended well above the best it reached (it climbed, or rose and stalled there), or
    stalled far above what its own early trend promised."""
    d = _degradation(run)
    if d is None:
        st = _stall(run)
        return _stall_finding(run, st) if st is not None else None
    first, best, last = d["first"], d["best"], d["last"]
    climbed_from_start = d["gain"] == 0.0
    gave = f"{d['rise'] / d['gain']:.0%} of its progress" if d["gain"] > 0 else "more than 5%"
    trouble = _trouble(run)
    evidence = [
        f"median loss {_g(first[2])} at the start ({_span(first)}), best {_g(best[2])} "
        f"({_span(best)}), {_g(last[2])} at the end ({_span(last)})",
        f"the end is {_g(d['rise'])} above the best: "
        + (
            "the loss never went below its start and climbed"
            if climbed_from_start
            else f"the run gave back {gave}"
        ),
        (
            _trouble_text(trouble)
            if trouble
            else "no spike or non-finite event: the loss degraded quietly"
        ),
    ]
    lrs = [v for v in (_num(s.get("lr")) for s in run.steps) if v is not None]
    lr = statistics.median(lrs) if lrs else None
    if lr is not None:
        evidence.append(f"learning rate {_g(lr)}")
    target = f" (from {_g(lr)} to {lr / 3:.2g} or {lr / 10:.2g})" if lr is not None else ""
    advice = [
        f"Lower the learning rate by 3-10x{target}: a loss that rises after reaching its best, "
        "with the gradients looking calm, is the classic sign of an LR the run cannot hold.",
        "Warm the learning rate up over the first few hundred to few thousand steps and decay "
        "it afterwards (linear warmup + cosine), e.g. LinearLR then CosineAnnealingLR.",
    ]
    if _is_transformer(run):
        advice.append(
            "In a transformer, attention logits that grow without bound make the loss stall "
            "or climb without any NaN: normalize queries and keys (qk-layernorm, e.g. the "
            "gpt model's qk_layernorm=True) or cap them with gradguard's qk_clip; add a small "
            "z-loss on the output logits (Wortsman et al. 2023)."
        )
    advice.append(
        "Keep the best checkpoint (the loss was lowest around step "
        f"{best[0]}-{best[1]}), and compare with a run at a lower LR to confirm."
    )
    return Finding(
        cause="loss_degradation",
        title="Loss degraded: " + ("it climbed" if climbed_from_start else "it rose from its best"),
        summary=(
            f"The loss ended at {_g(last[2])}, well above the {_g(best[2])} it had reached by "
            f"step {best[1]}: the run stopped learning and got worse"
            + (", without any event." if not trouble else ".")
        ),
        evidence=evidence,
        advice=advice,
        severity="high" if not trouble else "medium",
        step=best[1],
    )


def _stall_finding(run: RunLog, st: dict[str, Any]) -> Finding:
    first, early, last = st["first"], st["early"], st["last"]
    trouble = _trouble(run)
    floor = st["floor"]
    promise = (
        f"a floor near {_g(floor)}" if math.isfinite(floor) and floor > 0 else "no slowing down"
    )
    evidence = [
        f"median loss {_g(first[2])} at the start ({_span(first)}), {_g(early[2])} by "
        f"{_span(early)}: the early trend promised {promise}",
        f"from step {st['half'][0]} on it gained {_g(max(st['progress'], 0.0))}: flat, ending at "
        f"{_g(last[2])} ({_span(last)})",
        (
            _trouble_text(trouble)
            if trouble
            else "no spike or non-finite event: the loss stalled quietly"
        ),
    ]
    advice = [
        "Look at the other findings first (dead units, attention logits, the LR): a loss that "
        "stops falling far above its trend is usually units that died, logits that saturated, or "
        "an LR too high for the loss to settle (try it 3-10x lower) or decayed too early.",
        "If this is the data's floor (label noise, an irreducible error), the finding does not "
        "apply: compare with a run at a lower LR or a longer warmup to confirm.",
    ]
    if _is_transformer(run):
        advice.insert(
            1,
            "In a transformer, attention logits that grow without bound make the loss stall "
            "without any NaN: qk-layernorm or gradguard's qk_clip; a small z-loss on the output "
            "logits (Wortsman et al. 2023).",
        )
    return Finding(
        cause="loss_degradation",
        title="Loss stalled far above its early trend",
        summary=(
            f"The loss stopped falling at {_g(last[2])}, far above where its early trend was "
            "heading: the run stopped learning" + (", without any event." if not trouble else ".")
        ),
        evidence=evidence,
        advice=advice,
        severity="medium",
        step=st["half"][0],
    )
