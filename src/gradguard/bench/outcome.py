"""A run's outcome: ``trained``, ``diverged`` (it blew up) or ``did_not_learn`` (it ended at
chance with calm gradient norms and a loss that never rose). The one rule, for the result rows
:func:`gradguard.bench.train.run_result` writes and for rows stored before it wrote an outcome.

A run **diverged** when its loss or weights went non-finite, its final training loss ended above
:data:`LOSS_BLOWUP` x its first, the Guard halted it (``stalled``, ``rollback_exhausted``,
``integrity``, ...), or it ended at chance *with evidence of a blow-up*:

- ``grad_norm_spike``: its largest finite pre-clip gradient norm exceeded :data:`NORM_SPIKE` x
  its median one (a dead network after one huge step: the norms fell from the spike to a trickle);
- ``loss_spike``: its training loss, averaged over :data:`LOSS_WINDOW` steps, rose above
  :data:`LOSS_RISE` x its first window's mean (the run was knocked back to chance).

A run at chance with neither **did not learn**: too small an LR or too few steps, a model that
cannot fit; not an instability, so not a divergence (its ``diverged_reason`` is still
``at_chance``). The thresholds sit between the two kinds: a run that makes no progress at all
keeps its norms within 2x of their median and its 10-step loss within 10% of its start. In the
stored bench suites the runs at chance below the norm threshold split cleanly on the loss: a rise
of at least 2.2x (an LR burst, a run knocked back) or at most 1.45x; their norms reached up to 74x
their median, so the norm threshold is the one with less room. A trained run can exceed both (its loss falls,
so its early norms dwarf its median; an injected fault spikes them), but only a run at chance is
judged by them (docs/bench.md, "Outcomes").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: A run whose final training loss exceeds this multiple of its first loss has diverged.
LOSS_BLOWUP = 10.0
#: A run at chance whose largest finite gradient norm exceeds this multiple of its median has
#: blown up (diverged), not merely failed to learn.
NORM_SPIKE = 100.0
#: A run at chance whose windowed training loss rose above this multiple of its first window's
#: mean has blown up (diverged), not merely failed to learn.
LOSS_RISE = 2.0
#: Steps averaged for :data:`LOSS_RISE`: a single noisy batch is not a rise.
LOSS_WINDOW = 10

#: The ``diverged_reason`` of a run that ended at chance (did not learn, unless it blew up).
AT_CHANCE = "at_chance"
OUTCOMES = ("trained", "diverged", "did_not_learn")


def loss_levels(losses: Sequence[float | None]) -> tuple[float, float]:
    """``(initial, peak)``: the mean of the first :data:`LOSS_WINDOW` finite training losses and
    the highest mean over :data:`LOSS_WINDOW` consecutive finite ones (fewer when the run has
    fewer); NaN when none is finite."""
    finite = [float(v) for v in losses if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    w = min(LOSS_WINDOW, len(finite))
    window = sum(finite[:w])
    initial = peak = window / w
    for i in range(w, len(finite)):
        window += finite[i] - finite[i - w]
        peak = max(peak, window / w)
    return initial, peak


def blowup_evidence(
    max_grad_norm: float | None,
    median_grad_norm: float | None,
    initial_loss: float | None = None,
    peak_loss: float | None = None,
) -> str | None:
    """Why a run that ended at chance counts as blown up (``grad_norm_spike``, ``loss_spike``),
    or None: calm norms and no loss rise, it did not learn. Missing or NaN figures are no
    evidence."""
    mx, med = _num(max_grad_norm), _num(median_grad_norm)
    if mx > NORM_SPIKE * med:  # False when either is NaN
        return "grad_norm_spike"
    if _num(peak_loss) > LOSS_RISE * _num(initial_loss):
        return "loss_spike"
    return None


def outcome_of(result: Mapping[str, Any], steps: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The outcome of a stored result row. A row with ``outcome`` has it; an older row (stored
    before outcomes) is read from ``diverged`` and ``diverged_reason``: ``at_chance`` is
    ``did_not_learn`` unless :func:`blowup_evidence` holds for its norms and, when its step
    records ``steps`` are given, its loss (such a row carries no loss levels)."""
    if result.get("outcome") in OUTCOMES:
        return result["outcome"]
    reason = result.get("diverged_reason")
    if reason == AT_CHANCE:
        initial = result.get("initial_train_loss")
        peak = result.get("peak_train_loss")
        if (initial is None or peak is None) and steps is not None:
            initial, peak = loss_levels([s.get("loss") for s in steps])
        evidence = blowup_evidence(
            result.get("max_grad_norm"), result.get("median_grad_norm"), initial, peak
        )
        return "diverged" if evidence else "did_not_learn"
    if reason is not None or result.get("diverged"):
        return "diverged"
    return "trained"


def failed(result: Mapping[str, Any]) -> bool:
    """Whether a run did not train: it diverged or did not learn (old rows too). What the
    advisor counts against a policy: neither reaches the target."""
    return bool(
        result.get("diverged")
        or result.get("did_not_learn")
        or result.get("diverged_reason") is not None
    )


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan
