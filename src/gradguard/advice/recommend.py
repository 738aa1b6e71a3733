"""Score the candidates from their runs and choose one.

Evidence per candidate (one table row): divergences at each stress level over the seeds, the
stability margin (the highest stress level up to which every seed trained at every level), the
score at the user's LR (test metric, or the final training loss without one), the final
training loss, the Guard's overhead and how often it intervened.

The choice, in order:

1. **trains at the user's LR**: no seed diverged, ended at chance or raised at x1 (a run that
   did not learn fails as one that blew up does: neither reaches the target). If no candidate
   does, the one that failed least is named, with the advice to lower the LR;
2. **as good as the best there**: the score at x1 no worse than the best eligible candidate's by
   more than the noise: one standard error of the difference of the two means over the seeds
   (the seed-to-seed variance is the median over the eligible candidates: two seeds say little
   about one policy's spread, a dozen policies' together say more), at least :data:`REL_TOLERANCE` of the best (half an accuracy point at 95%; 2% of a loss) and at
   most :data:`MAX_TOLERANCE` (two points; 8% of a loss); and, among those, a final training
   loss no worse than the lowest one's by more than its noise (at least :data:`LOSS_TOLERANCE`
   of it): a score at its ceiling (accuracy 1.0) cannot tell a policy that converged from one
   still on its way, and the slow one is the one an unseen seed leaves short. A policy that
   survives 10x the LR but learns worse at the LR you train with is not the answer;
3. **the widest stability margin**: survives the highest stress LR in every seed;
4. then the better score at x1, then the lower final training loss (at a score's ceiling the
   loss still tells a run that converged from one on its way, as in step 2; and unlike the
   overhead it is measured the same on every machine), then the lower overhead, then the
   shorter chain.

The other candidates are ranked after it by the same steps (outside the band: by score, then
margin), so the table reads best first.

Step 2 sits before 3 because a mitigation is chosen for the LR you train at; the margin then
decides among the ones that train equally well there, which is what "safer" buys.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..bench.outcome import failed
from .candidates import Candidate

#: Relative score tolerance of step 2, at least and at most, by ``higher_is_better`` (True: e.g.
#: accuracy; False: e.g. a loss): scores closer than the seeds' noise are not told apart, but
#: never more than this far.
REL_TOLERANCE = {True: 0.005, False: 0.02}
MAX_TOLERANCE = {True: 0.02, False: 0.08}
#: Step 2's final-loss check, relative to the lowest loss among the candidates as good by score:
#: a training loss 1.5x another's is a slower policy, not noise.
LOSS_TOLERANCE = 0.5


@dataclass
class Evidence:
    """One candidate's row of the evidence table."""

    name: str
    spec: str
    runs: dict[str, list[int]]  # "x3" -> [diverged, did not learn or raised, runs]
    margin: float | None  # stress factor; None: diverged at the user's LR
    margin_lr: float | None
    score: float  # mean over seeds at x1 (test metric, or final train loss)
    score_std: float
    score_n: int  # seeds behind the score
    final_loss: float
    final_loss_std: float
    overhead: float  # share of training time in Guard.step(), mean at x1
    clipped: float  # share of steps clipped at x1
    skipped: float  # share of steps skipped (or rolled back) at x1
    reasons: list[str] = field(
        default_factory=list
    )  # why runs failed: "x3 seed 1: nonfinite_weights", "x1 seed 0: at_chance"
    eligible: bool = False
    in_band: bool = False
    rank: int = 0
    # What kept this row out of the band of the best (step 1 or 2), in words; "" when in it:
    # "diverged or did not learn in 1/2 seeds at your LR", "final training loss 0.0755, above ..."
    excluded: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def gather(
    cands: Sequence[Candidate],
    levels: Sequence[float],
    seeds: int,
    lr: float,
    cell: Callable[[str, float, int], Mapping[str, Any] | None],
    use_metric: bool,
) -> list[Evidence]:
    """The evidence rows. ``cell(spec, level, seed)`` gives the run's database row (``status``,
    ``result``, ``error``) or None if it was not run."""
    return [_evidence(c, levels, seeds, lr, cell, use_metric) for c in cands]


def _evidence(
    c: Candidate,
    levels: Sequence[float],
    seeds: int,
    lr: float,
    cell: Callable[[str, float, int], Mapping[str, Any] | None],
    use_metric: bool,
) -> Evidence:
    """One candidate's evidence row: its failures at each level, the highest level up to which
    every run trained (its margin), and its figures at x1."""
    runs: dict[str, list[int]] = {}
    reasons: list[str] = []
    margin: float | None = None
    broken = False
    at_x1: list[Mapping[str, Any]] = []  # the results of the runs done at the user's LR
    for level in sorted(levels):
        bad = total = 0
        for seed in range(seeds):
            r = cell(c.spec, level, seed)
            if r is None:
                continue
            total += 1
            why = _failure(r, level, seed)
            if why is not None:
                bad += 1
                reasons.append(why)
            if math.isclose(level, 1.0) and r.get("status") == "done":
                at_x1.append(r.get("result") or {})
        runs[f"x{level:g}"] = [bad, total]
        if total and not bad and not broken:
            margin = level
        elif total:
            broken = True
    scores = [
        _num(res.get("test_metric") if use_metric else res.get("final_train_loss")) for res in at_x1
    ]
    losses = [_num(res.get("final_train_loss")) for res in at_x1]
    over = [0.0 if c.spec == "none" else _num(res.get("guard_share")) for res in at_x1]
    clip, skip = _intervention_rates(at_x1)
    score, score_std = _mean_std(scores)
    return Evidence(
        name=c.name,
        spec=c.spec,
        runs=runs,
        margin=margin if margin is not None and margin >= 1.0 - 1e-9 else None,
        margin_lr=float(f"{lr * margin:.6g}") if margin is not None else None,
        score=score,
        score_std=score_std,
        score_n=sum(math.isfinite(x) for x in scores),
        final_loss=_mean_std(losses)[0],
        final_loss_std=_mean_std(losses)[1],
        overhead=_mean_std(over)[0],
        clipped=_mean_std(clip)[0],
        skipped=_mean_std(skip)[0],
        reasons=reasons,
    )


def _failure(r: Mapping[str, Any], level: float, seed: int) -> str | None:
    """Why a run did not train (it raised, diverged or did not learn), or None if it trained."""
    res = r.get("result") or {}
    if r.get("status") != "done":
        err = (r.get("error") or "").strip().splitlines()
        return f"x{level:g} seed {seed}: raised {err[-1] if err else ''}".strip()
    if failed(res):  # diverged, or did not learn: neither trained
        return f"x{level:g} seed {seed}: {res.get('diverged_reason')}"
    return None


def _intervention_rates(results: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """Per run, the share of its steps clipped, and the share skipped or rolled back."""
    clip, skip = [], []
    for res in results:
        steps = max(1, int(res.get("steps_run") or 1))
        inter = res.get("interventions") or {}
        clip.append(inter.get("clipped", 0) / steps)
        skip.append((inter.get("skipped", 0) + inter.get("rolled_back", 0)) / steps)
    return clip, skip


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _chain_length(spec: str) -> int:
    return 0 if spec == "none" else spec.count("+") + 1


def _se(a_std: float, b_std: float, n_a: int, n_b: int) -> float:
    """Standard error of the difference of two means (0 for a mean of one seed)."""
    va = a_std**2 / n_a if n_a > 1 and math.isfinite(a_std) else 0.0
    vb = b_std**2 / n_b if n_b > 1 and math.isfinite(b_std) else 0.0
    return math.sqrt(va + vb)


def seed_std(rows: Sequence[Evidence]) -> float:
    """The score's seed-to-seed standard deviation: the median variance over the rows with 2+
    seeds (NaN if none has)."""
    variances = [r.score_std**2 for r in rows if r.score_n > 1 and math.isfinite(r.score_std)]
    return math.sqrt(statistics.median(variances)) if variances else math.nan


def tolerance(best: Evidence, r: Evidence, higher_is_better: bool, std: float = math.nan) -> float:
    """How far below ``best`` the score of ``r`` may be and still count as as good (step 2);
    ``std``: the pooled seed std (:func:`seed_std`), else each row's own."""
    if math.isfinite(std):
        se = _se(std, std, best.score_n, r.score_n)
    else:
        se = _se(best.score_std, r.score_std, best.score_n, r.score_n)
    scale = abs(best.score)
    low = REL_TOLERANCE[higher_is_better] * scale
    high = MAX_TOLERANCE[higher_is_better] * scale
    return min(max(se, low), high)


def loss_tolerance(best: Evidence, r: Evidence) -> float:
    """How far above ``best``'s final training loss that of ``r`` may be (step 2)."""
    se = _se(best.final_loss_std, r.final_loss_std, best.score_n, r.score_n)
    return max(se, LOSS_TOLERANCE * abs(best.final_loss))


def choose(
    rows: list[Evidence], higher_is_better: bool, use_loss: bool = True
) -> tuple[Evidence, bool]:
    """Rank the rows in place (``rank`` 1 = chosen) and return (the chosen row, whether it trains
    at the user's LR in every seed). ``use_loss``: apply step 2's final-loss check (off when the
    score is the final training loss already)."""
    sign = 1.0 if higher_is_better else -1.0

    def signed(r: Evidence) -> float:
        return sign * r.score if math.isfinite(r.score) else -math.inf

    for r in rows:
        n_bad, n = r.runs.get("x1", [0, 0])
        r.eligible = n > 0 and n_bad == 0 and math.isfinite(r.score)
        if not r.eligible:
            r.excluded = (
                f"diverged or did not learn in {n_bad}/{n} seeds at your LR"
                if n_bad
                else "no finished run with a score at your LR"
            )
    eligible = [r for r in rows if r.eligible]
    if eligible:
        top = max(eligible, key=signed)
        best = signed(top)
        std = seed_std(eligible)
        for r in eligible:
            r.in_band = best - signed(r) <= tolerance(top, r, higher_is_better, std) + 1e-12
            if not r.in_band:
                r.excluded = f"score outside the seeds' noise of the best, {top.score:.4g}"
        band = [r for r in eligible if r.in_band and math.isfinite(r.final_loss)]
        if band and use_loss:
            lowest = min(band, key=lambda r: r.final_loss)
            for r in band:
                r.in_band = r.final_loss - lowest.final_loss <= loss_tolerance(lowest, r) + 1e-12
                if not r.in_band:
                    r.excluded = (
                        f"final loss {r.final_loss:.3g}, above the noise of the lowest, "
                        f"{lowest.final_loss:.3g}"
                    )

    def key(r: Evidence):
        n_bad, n = r.runs.get("x1", [0, 0])
        margin = r.margin if r.margin is not None else 0.0
        return (
            r.eligible,
            r.in_band,
            margin if r.in_band else 0.0,  # the margin decides among the ones as good (step 3)
            -(n_bad / n) if n else -1.0,
            signed(r),
            margin,
            -(r.final_loss if use_loss and math.isfinite(r.final_loss) else math.inf),
            -(r.overhead if math.isfinite(r.overhead) else 1.0),
            -_chain_length(r.spec),
        )

    for i, r in enumerate(sorted(rows, key=key, reverse=True), start=1):
        r.rank = i
    chosen = min(rows, key=lambda r: r.rank)
    return chosen, chosen.eligible
