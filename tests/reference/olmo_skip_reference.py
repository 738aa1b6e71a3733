"""OLMo-core's ``SkipStepOptimizer`` decision, as its source defines it (olmo_core/optim/skip_step_
optimizer.py): the current value is appended first; the check runs once the list holds
``max(2, R // 2)`` values counting it; mean and sample std are over the previous values (at most
``R``); skip when ``value - mean > sigma * std`` fails to hold as ``<=``. Every value enters the
list, spikes and NaN included."""

from __future__ import annotations

import math


def olmo_skips(values: list[float], window: int = 128, sigma: float = 6.0) -> list[bool]:
    hist: list[float] = []
    out = []
    for v in values:
        hist.append(v)
        hist = hist[-(window + 1) :]
        if len(hist) < max(2, window // 2):
            out.append(False)
            continue
        prev = hist[:-1]
        mean = sum(prev) / len(prev)
        std = math.sqrt(sum((x - mean) ** 2 for x in prev) / (len(prev) - 1))
        within = (v - mean) <= sigma * std  # False for NaN, as torch's comparison
        out.append(not within)
    return out
