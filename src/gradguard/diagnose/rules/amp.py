"""``fp16_overflow``: fp16 loss scaling keeps overflowing or its scale collapses."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from ..records import RunLog
from .base import Finding, _forward_order, _g, _layer, _list, _num, _step
from .registry import register

#: fp16 loss scaling (GradScaler defaults: growth_interval=2000, backoff 0.5) expects about one
#: overflow per 2000 steps once the scale has settled; more than 5% of steps is a persistent one.
AMP_OVERFLOW_RATE = 0.05
AMP_MIN_OVERFLOWS = 3
#: A scale below 1 means the values overflow fp16 even unscaled: no loss scaling can fix that.
AMP_SCALE_FLOOR = 1.0
#: "Falling steadily": over the second half of the run the scale never grew and fell by 2^8.
AMP_FALL_LOG2 = 8


@dataclass
class _Overflows:
    """The run's fp16 overflow steps, and those left once the scale's first calibration is done."""

    over: list[int]
    n_steps: int
    calibration: int
    counted: list[int]
    rate: float


@dataclass
class _Scales:
    """The loss scale over the run: each (step, scale), the lowest, and how it ended."""

    scales: list[tuple[int, float]]
    low: tuple[int, float] | None
    below_one: bool
    half: list[tuple[int, float]]
    falling: bool


@register
def fp16_overflow(run: RunLog) -> Finding | None:
    """fp16 loss scaling that keeps overflowing, or whose scale collapses."""
    if not run.meta.get("amp"):
        return None
    steps = [s for s in run.steps if _step(s) is not None]
    ov = _overflows(run, steps)
    sc = _scales(steps)
    frequent = len(ov.counted) >= AMP_MIN_OVERFLOWS and ov.rate > AMP_OVERFLOW_RATE
    if not (frequent or sc.below_one or sc.falling):
        return None
    culprits = _culprits(run, steps, ov.over)
    layer = culprits.most_common(1)[0][0] if culprits else None
    low = cast("tuple[int, float]", sc.low)  # read only if below_one, which needs a low
    return Finding(
        cause="fp16_overflow",
        title="fp16 overflow",
        summary=(
            "fp16 overflows: "
            + (
                f"the loss scale collapsed to {_g(low[1])}, so the values overflow fp16 even unscaled."
                if sc.below_one
                else "the gradients keep overflowing fp16's range ("
                f"{ov.rate:.0%} of steps), so loss scaling skips steps and backs off."
            )
        ),
        evidence=_evidence(ov, sc, layer, culprits),
        advice=_advice(layer, sc.below_one),
        severity="high" if sc.below_one or sc.falling else "medium",
        step=ov.counted[0] if ov.counted else (low[0] if low else None),
        layers=[layer] if layer else [],
    )


def _overflows(run: RunLog, steps: list[dict[str, Any]]) -> _Overflows:
    over = sorted(
        {e["step"] for e in run.events if e.get("kind") == "amp_overflow" and _step(e) is not None}
    )
    n_steps = max(
        len(steps),
        (_step(run.end) or 0) if isinstance(run.end, Mapping) else 0,
        (max(over) + 1) if over else 0,
    )
    # GradScaler starts at 2^16 and backs off on the first steps until it fits: not a problem.
    start = steps[0]["step"] if steps else 0
    calibration = 0
    while calibration < len(over) and over[calibration] == start + calibration:
        calibration += 1
    counted = over[calibration:]
    rate = len(counted) / n_steps if n_steps else 0.0
    return _Overflows(over, n_steps, calibration, counted, rate)


def _scales(steps: list[dict[str, Any]]) -> _Scales:
    scales = [
        (s["step"], v) for s in steps if (v := _num(s.get("amp_scale"))) is not None and v > 0
    ]
    low = min(scales, key=lambda t: t[1]) if scales else None
    below_one = low is not None and low[1] < AMP_SCALE_FLOOR
    half = scales[len(scales) // 2 :]
    falling = (
        len(half) >= 2
        and all(b[1] <= a[1] for a, b in itertools.pairwise(half))
        and math.log2(half[0][1] / half[-1][1]) >= AMP_FALL_LOG2
    )
    return _Scales(scales, low, below_one, half, falling)


def _culprits(run: RunLog, steps: list[dict[str, Any]], over: list[int]) -> Counter[str]:
    """Which layer overflows: the events' most implicated layer, else the static origin of each
    overflow step (the non-finite layer nearest the output); plus the localizations' origins."""
    culprits: Counter[str] = Counter()
    for e in run.events:
        if e.get("kind") == "amp_overflow" and _list(e.get("layers")):
            culprits[str(e["layers"][0])] += 1
    if not culprits:
        rank = {li: r for r, li in enumerate(_forward_order(run))}
        for s in steps:
            bad = [i for i in _list(s.get("nonfinite_layers")) if isinstance(i, int)]
            if s["step"] in set(over) and bad:
                culprits[_layer(run, max(bad, key=lambda i: rank.get(i, i)))] += 1
    for loc in run.localizations:
        if loc.get("step") in set(over) and loc.get("origin"):
            culprits[str(loc["origin"])] += 1
    return culprits


def _evidence(ov: _Overflows, sc: _Scales, layer: str | None, culprits: Counter[str]) -> list[str]:
    evidence = []
    if ov.over:
        evidence.append(
            f"{len(ov.over)} fp16 overflows in {ov.n_steps} steps"
            + (
                f" ({ov.calibration} while the scale calibrated at the start)"
                if ov.calibration
                else ""
            )
            + f"; {len(ov.counted)} after that, {ov.rate:.1%} of steps"
        )
    if sc.scales:
        low = sc.low
        assert low is not None
        evidence.append(
            f"loss scale {_g(sc.scales[0][1])} at step {sc.scales[0][0]}, lowest {_g(low[1])} at "
            f"step {low[0]}, last {_g(sc.scales[-1][1])}"
        )
    if sc.falling:
        evidence.append(
            f"the scale only fell over the second half of the run (by 2^{math.log2(sc.half[0][1] / sc.half[-1][1]):.0f})"
        )
    if layer is not None:
        evidence.append(f"overflowing layer: {layer} ({culprits[layer]} of the overflows)")
    return evidence


def _advice(layer: str | None, below_one: bool) -> list[str]:
    advice = [
        "Use bf16 autocast (torch.autocast(device_type='cuda', dtype=torch.bfloat16)) where the "
        "GPU supports it (Ampere or newer): bf16 has fp32's exponent range, so it does not "
        "overflow and needs no GradScaler.",
        "Staying on fp16: keep GradScaler's defaults (init_scale=2**16, growth_interval=2000) "
        "and pass it to the Guard (Guard(..., scaler=scaler)) so it unscales before clipping."
        + (
            " A scale below 1 means values overflow even unscaled: no loss scaling fixes that;"
            " the values themselves must shrink."
            if below_one
            else ""
        ),
        "Scale the loss down (a mean rather than a sum over tokens/pixels) and lower the LR.",
    ]
    if layer is not None:
        advice.insert(
            1,
            f"Run {layer} in fp32 (wrap it in torch.autocast(device_type='cuda', enabled=False) "
            "and cast its input with .float()), or add normalization before it.",
        )
    return advice
