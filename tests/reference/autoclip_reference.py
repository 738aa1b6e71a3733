"""AutoClip (Seetharaman et al. 2020; pseeth/autoclip semantics), written from the definition.

Keep every global gradient norm seen so far (the current one included) in a plain Python list;
the threshold is ``numpy.percentile(history, p)`` (linear interpolation); the gradient is then
clipped the way ``torch.nn.utils.clip_grad_norm_`` does: ``coef = min(1, thr / (norm + 1e-6))``.

``window=N`` keeps only the last N norms. A non-finite norm is modelled as a skipped step: it never
enters the history and nothing is clipped. Independent of gradguard.
"""

from __future__ import annotations

import math

import numpy as np


class AutoClipReference:
    def __init__(self, percentile: float = 10.0, window: int | None = None):
        self.percentile = percentile
        self.window = window
        self.history: list[float] = []

    def step(self, norm: float) -> tuple[float, float]:
        """Feed one global norm; return (threshold, clip coefficient).

        For a non-finite norm: (nan, nan) and the history is left alone (the step is skipped).
        """
        if not math.isfinite(norm):
            return math.nan, math.nan
        self.history.append(float(norm))
        if self.window is not None:
            self.history = self.history[-self.window :]
        thr = float(np.percentile(self.history, self.percentile))
        coef = min(1.0, thr / (norm + 1e-6))
        return thr, coef
