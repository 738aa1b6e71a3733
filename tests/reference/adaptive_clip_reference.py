"""adaptive_clip written from its definition (docs/policies.md), on Python floats with
``statistics.median``. Independent of gradguard.

Window: the logs of the last ``window`` norms as they entered. Threshold: ``+inf`` before any norm;
else ``exp(m + clamp(z * 1.4826 * d, log(min_factor), log(max_factor)))`` with ``m`` the median
and ``d`` the median absolute deviation of the window. A finite norm > 0 is clipped to the
threshold when above it (factor ``thr / (norm + 1e-6)``) and enters the window as
``log(min(norm, exp(m) * min_factor))`` (itself before any norm). Zero or non-finite: nothing.
A norm above that threshold is a spike: for the next ``hold`` usable norms the threshold is
``exp(m)`` instead; each spike restarts the count.
"""

from __future__ import annotations

import math
import statistics
from collections import deque


class AdaptiveClipReference:
    def __init__(self, z=3.0, min_factor=2.5, max_factor=8.0, window=64, hold=0):
        self.z, self.min_factor, self.max_factor = z, min_factor, max_factor
        self.hold, self.tight = hold, 0
        self.logs: deque[float] = deque(maxlen=window)

    def loose(self) -> float:
        if not self.logs:
            return math.inf
        m = statistics.median(self.logs)
        d = statistics.median(abs(v - m) for v in self.logs)
        spread = min(max(self.z * 1.4826 * d, math.log(self.min_factor)), math.log(self.max_factor))
        return math.exp(m + spread)

    def step(self, norm: float) -> tuple[float, float]:
        """(threshold, coefficient) for this norm; updates the window."""
        loose = self.loose()
        thr = math.exp(statistics.median(self.logs)) if self.tight and self.logs else loose
        if not (math.isfinite(norm) and norm > 0):
            return thr, 1.0
        coef = thr / (norm + 1e-6) if norm > thr else 1.0
        self.tight = self.hold if norm > loose else max(0, self.tight - 1)
        cap = math.exp(statistics.median(self.logs)) * self.min_factor if self.logs else math.inf
        self.logs.append(math.log(min(norm, cap)))
        return thr, coef
