"""The LR range probe: short unguarded runs over a geometric range of LRs around the user's.

It answers two questions before any policy is tried: where does training start to diverge
without a guard (the first LR of the range whose run diverged), and what do healthy gradient
norms look like (the norm distribution of the unguarded run at the highest LR, up to the
user's, that trained).

The clip threshold is a percentile (default p90) of that healthy run's gradient norms. When the
healthy run is the user's own LR, that is all. When the user's LR diverges and the healthy run
is at a lower LR ``lr_h``, the threshold is scaled by ``lr_h / lr``: clipping at
``p90 * lr_h / lr`` caps each SGD step ``lr * ||g||`` at the healthy run's p90 step
``lr_h * p90``, the largest step size seen to train (the norms of a lower-LR run, unscaled, would
let the user's LR take steps ``lr / lr_h`` times larger than any that trained).

Every probe run records the Guard's telemetry (a measuring-only Guard that trains exactly as the
bare optimizer does), for the diagnosis rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..bench.outcome import failed

#: LR factors of the probe, relative to the user's LR: a geometric range (about sqrt(10) apart)
#: from 10x below, where almost any setup trains, to 30x above, where most diverge.
PROBE_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
#: The clip threshold's percentile of the healthy run's gradient norms: clipping then touches the
#: largest 10% of a healthy run's steps, and caps every spike at a size healthy training reaches.
DEFAULT_PERCENTILE = 90.0
#: When no run up to the user's LR trained, the threshold comes from the lowest LR's first steps
#: (the first: at initialization, before any update could blow it up).
EARLY_STEPS = 1


def probe_factors(levels: Sequence[float]) -> tuple[float, ...]:
    """The probe's LR factors: :data:`PROBE_FACTORS` and every stress level."""
    return tuple(sorted(set(PROBE_FACTORS) | {float(x) for x in levels}))


def norm_percentile(norms: Sequence[float], percentile: float) -> float:
    """``numpy.percentile`` (linear interpolation) of the finite norms."""
    finite = [x for x in norms if math.isfinite(x)]
    if not finite:
        return math.nan
    return float(np.percentile(np.asarray(finite, dtype=np.float64), percentile))


@dataclass
class ProbeRow:
    """One unguarded probe run."""

    factor: float
    lr: float
    key: str
    status: str  # done | failed | missing
    diverged: bool  # did not train: diverged, did not learn (at chance), raised or not run
    reason: str | None
    steps_run: int
    final_loss: float
    metric: float
    norm_p50: float
    norm_p90: float
    norm_max: float
    error: str | None = None


@dataclass
class ProbeResult:
    """The probe's answer; ``threshold`` is ``percentile`` of ``norms`` (the finite gradient norms
    of the run ``source``: the run ``healthy``, or, when no run up to the user's LR trained, the
    first :data:`EARLY_STEPS` step(s) of the lowest LR's run) times ``scale`` (``source.lr / lr``, 1 when the source is the user's LR)."""

    rows: list[ProbeRow]
    diverges_at: float | None  # the lowest factor whose run diverged (None: none did)
    trains_up_to: float | None  # the highest factor below it (None: even the lowest diverged)
    healthy: ProbeRow | None
    source: ProbeRow | None  # the run the norms come from
    norms: list[float] = field(repr=False, default_factory=list)
    percentile: float = DEFAULT_PERCENTILE
    scale: float = 1.0
    threshold: float = math.nan

    def row(self, factor: float) -> ProbeRow | None:
        return next((r for r in self.rows if math.isclose(r.factor, factor)), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": [asdict(r) for r in self.rows],
            "diverges_at": self.diverges_at,
            "trains_up_to": self.trains_up_to,
            "threshold": {
                "value": self.threshold,
                "percentile": self.percentile,
                "scale": self.scale,
                "lr": self.source.lr if self.source else None,
                "factor": self.source.factor if self.source else None,
                "norms": len(self.norms),
                "healthy": self.healthy is not None,
            },
        }


def analyze(
    entries: Sequence[tuple[float, float, str]],
    runs: Mapping[str, Mapping[str, Any]],
    steps_of: Callable[[str], list[dict[str, Any]]],
    percentile: float = DEFAULT_PERCENTILE,
    lr: float | None = None,
) -> ProbeResult:
    """The probe's answer from its runs.

    ``entries``: (factor, lr, run key) per probe run (``lr``: the user's, for the threshold's
    scale; default the factor-1 entry's); ``runs``: the database rows by key (done or
    failed); ``steps_of(key)``: a run's per-step metrics. A failed run counts as diverged, and so
    does one that did not learn (ended at chance with calm norms): neither is a run that trained.
    """
    rows: list[ProbeRow] = []
    norms_of: dict[str, list[float]] = {}
    for factor, run_lr, key in sorted(entries):
        row, finite = _probe_row(factor, run_lr, key, runs.get(key), steps_of)
        if finite is not None:
            norms_of[key] = finite
        rows.append(row)
    first_bad = next((r for r in rows if r.diverged), None)
    diverges_at = first_bad.factor if first_bad else None
    below = [r for r in rows if not r.diverged and (diverges_at is None or r.factor < diverges_at)]
    trains_up_to = max((r.factor for r in below), default=None)
    healthy, source, norms = _norm_source(rows, norms_of, steps_of)
    if lr is None:
        lr = next((x for f, x, _ in entries if math.isclose(f, 1.0)), None)
    scale = source.lr / lr if source is not None and lr and source.lr < lr else 1.0
    return ProbeResult(
        rows=rows,
        diverges_at=diverges_at,
        trains_up_to=trains_up_to,
        healthy=healthy,
        source=source,
        norms=norms,
        percentile=float(percentile),
        scale=scale,
        threshold=norm_percentile(norms, percentile) * scale,
    )


def _probe_row(
    factor: float,
    run_lr: float,
    key: str,
    run: Mapping[str, Any] | None,
    steps_of: Callable[[str], list[dict[str, Any]]],
) -> tuple[ProbeRow, list[float] | None]:
    """One probe run's row, and its finite gradient norms (None when it is not done)."""
    if run is None or run.get("status") not in ("done", "failed"):
        return ProbeRow(factor, run_lr, key, "missing", True, "not run", 0, *(math.nan,) * 5), None
    if run["status"] == "failed":
        first = (run.get("error") or "").strip().splitlines()
        row = ProbeRow(
            factor,
            run_lr,
            key,
            "failed",
            True,
            "raised",
            0,
            *(math.nan,) * 5,
            error=first[0] if first else "",
        )
        return row, None
    res = run["result"]
    norms = [s["grad_norm"] for s in steps_of(key)]
    finite = [x for x in norms if x is not None and math.isfinite(x)]
    row = ProbeRow(
        factor=factor,
        lr=run_lr,
        key=key,
        status="done",
        diverged=failed(res),
        reason=res.get("diverged_reason"),
        steps_run=int(res["steps_run"]),
        final_loss=_f(res.get("final_train_loss")),
        metric=_f(res.get("test_metric")),
        norm_p50=norm_percentile(finite, 50),
        norm_p90=norm_percentile(finite, 90),
        norm_max=max(finite) if finite else math.nan,
    )
    return row, finite


def _norm_source(
    rows: list[ProbeRow],
    norms_of: Mapping[str, list[float]],
    steps_of: Callable[[str], list[dict[str, Any]]],
) -> tuple[ProbeRow | None, ProbeRow | None, list[float]]:
    """The healthy run (the highest LR up to the user's that trained), the run the threshold's
    norms come from, and those norms."""
    healthy = max(
        (r for r in rows if not r.diverged and r.factor <= 1.0 + 1e-9),
        key=lambda r: r.factor,
        default=None,
    )
    source = healthy
    norms = norms_of.get(source.key, []) if source is not None else []
    if source is None:
        # Nothing up to the user's LR trained: the lowest LR's run, its first steps only (at
        # initialization, before it blew up), is the one measure of healthy norms there is.
        source = next((r for r in rows if r.status == "done" and norms_of.get(r.key)), None)
        if source is not None:
            early = [s["grad_norm"] for s in steps_of(source.key)][:EARLY_STEPS]
            norms = [x for x in early if x is not None and math.isfinite(x)]
    return healthy, source, norms


def _f(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan
