"""ZClip (Kumar et al. 2025; bluorion-com/ZClip ``zclip/zclip.py`` v1.0.0), written from the
definition, on Python floats.

Warmup: collect the first ``warmup`` norms (clipping only to ``max_norm`` if given); then
``mu = mean(buffer)``, ``var = population variance(buffer)``.
After warmup: ``z = (g - mu) / (sqrt(var) + eps)``; if ``z > zt`` the adaptive threshold is
``(mu + zt * sigma / (z / zt)) * clip_factor`` (or ``mu`` with clip_option="mean"), else no adaptive
clip. ``max_norm`` caps the threshold. The EMA is updated with the new mu:
``mu <- a*mu + (1-a)*x; var <- a*var + (1-a)*(x - mu)^2``, where ``x`` is the (uncapped) adaptive
threshold if the z-score fired, else the raw norm; ``skip_update_on_spike`` leaves the EMA alone on
a spike. The gradient is scaled by ``thr / (norm + 1e-6)`` only when ``norm > thr``.

A non-finite norm is modelled as a skipped step: nothing is clipped and no state changes.
Independent of gradguard.
"""

from __future__ import annotations

import math


class ZClipReference:
    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        max_norm: float | None = None,
        eps: float = 1e-6,
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ):
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.warmup = warmup
        self.max_norm = max_norm
        self.eps = eps
        self.clip_option = clip_option
        self.clip_factor = clip_factor
        self.skip_update_on_spike = skip_update_on_spike
        self.buffer: list[float] = []
        self.initialized = False
        self.mean: float | None = None
        self.var: float | None = None
        self.last_z: float | None = None  # z-score of the last post-warmup step (for tests)

    def step(self, norm: float) -> tuple[float, float, bool]:
        """Feed one global norm; return (threshold, clip coefficient, z-spike).

        threshold is inf when nothing clips; coefficient 1.0 when norm <= threshold.
        For a non-finite norm: (nan, nan, False) and no state changes.
        """
        self.last_z = None
        if not math.isfinite(norm):
            return math.nan, math.nan, False

        if not self.initialized:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup:
                n = len(self.buffer)
                self.mean = sum(self.buffer) / n
                self.var = sum((b - self.mean) ** 2 for b in self.buffer) / n
                self.initialized = True
                self.buffer = []
            thr = self.max_norm if self.max_norm is not None else math.inf
            return thr, self._coef(norm, thr), False

        std = math.sqrt(self.var)
        z = (norm - self.mean) / (std + self.eps)
        self.last_z = z
        spike = z > self.z_thresh
        adaptive = None
        if spike:
            if self.clip_option == "mean":
                adaptive = self.mean
            else:
                eta = z / self.z_thresh
                adaptive = (self.mean + self.z_thresh * std / eta) * self.clip_factor
        thr = adaptive if adaptive is not None else math.inf
        if self.max_norm is not None:
            thr = min(thr, self.max_norm)

        if not (spike and self.skip_update_on_spike):
            x = adaptive if spike else norm
            new_mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - new_mean) ** 2
            self.mean = new_mean
        return thr, self._coef(norm, thr), spike

    @staticmethod
    def _coef(norm: float, thr: float) -> float:
        return thr / (norm + 1e-6) if norm > thr else 1.0
