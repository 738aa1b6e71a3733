"""ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"; reference
bluorion-com/ZClip ``zclip/zclip.py`` v1.0.0)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..errors import SpecError
from .base import Policy, StepContext, check_keys, check_number, check_numbers, refuse_state
from .clip import NORM_EPS, _check_positive
from .registry import register


@register
class zclip(Policy):
    """Clip a global-norm spike detected by its z-score against an EMA of recent norms.

    Warmup: the first ``warmup`` finite norms are collected (clipped only by ``max_norm`` if given);
    then ``mu`` = their mean and ``var`` = their population variance. After warmup, with
    ``z = (g - mu) / (sqrt(var) + eps)``: if ``z > z_thresh`` the norm is clipped to
    ``mu + z_thresh**2 * sigma / z`` (``clip_option="adaptive_scaling"``, times ``clip_factor``) or to
    ``mu`` (``clip_option="mean"``); ``max_norm``, when set, caps the threshold. Then
    ``mu <- alpha*mu + (1-alpha)*x`` and ``var <- alpha*var + (1-alpha)*(x - mu)**2`` with the new
    ``mu``, where ``x`` is the threshold if the z-score clipped, else the raw norm
    (``skip_update_on_spike`` leaves the EMA alone on a spike). Scaling uses torch's
    ``max / (norm + 1e-6)``.

    Defaults are the paper's (``alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6``). ZClip v1.0.0
    defaults ``max_grad_norm=1.0`` (code and README) and clips every warmup step to it; here
    ``max_norm`` defaults to None, on purpose: an absolute threshold is what an untuned chain must
    not have (a model whose healthy norm is 4 would be clipped on every warmup step). Pass
    ``max_norm=1.0`` for the reference's warmup. In warmup the reference also scales a norm equal
    to ``max_norm`` by ``1/(1+1e-6)`` (``clip_grad_norm_``); here only a norm above it is scaled.

    Better than the reference: non-finite norms never enter the statistics; the norm is accumulated
    in float32 whatever the gradient dtype; no ``.item()`` sync (when the Guard already read the
    norm to the host for another policy, the arithmetic runs on Python floats instead of tiny
    device kernels, with the same result).
    """

    name = "zclip"
    nonnegative = frozenset({"buffer", "mean", "var"})

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        max_norm: float | None = None,
        eps: float = 1e-6,
        clip_option: Literal["adaptive_scaling", "mean"] = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ):
        super().__init__()
        if not 0.0 < alpha < 1.0:
            raise SpecError(f"alpha must be in (0, 1), got {alpha!r}")
        _check_positive(self.name, "z_thresh", z_thresh)
        _check_positive(self.name, "max_norm", max_norm, allow_none=True)
        _check_positive(self.name, "eps", eps)
        _check_positive(self.name, "clip_factor", clip_factor)
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise SpecError(f"warmup must be an integer >= 1, got {warmup!r}")
        if clip_option not in ("adaptive_scaling", "mean"):
            raise SpecError(
                f"clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}"
            )
        self.alpha = float(alpha)
        self.z_thresh = float(z_thresh)
        self.warmup = warmup
        self.max_norm = None if max_norm is None else float(max_norm)
        self.eps = float(eps)
        self.clip_option = clip_option
        self.clip_factor = float(clip_factor)
        self.skip_update_on_spike = bool(skip_update_on_spike)
        # Plain floats: the state is 4 numbers plus the warmup buffer. Kept as Python floats on the
        # host path and as 0-dim tensors on the device path (converted on first use).
        self.state = {"buffer": [], "mean": 0.0, "var": 0.0, "initialized": False}

    # ----- host path: Python floats --------------------------------------------------------------
    def _host(self, x: float) -> tuple[float, bool]:
        """Return (threshold, z-spike) for norm ``x``; update the state."""
        st = self._as_host_state()
        if not math.isfinite(x):
            return math.inf, False
        if not st["initialized"]:
            st["buffer"].append(x)
            if len(st["buffer"]) >= self.warmup:
                buf = st["buffer"]
                mean = sum(buf) / len(buf)
                st["mean"] = mean
                st["var"] = sum((b - mean) ** 2 for b in buf) / len(buf)
                st["initialized"] = True
                st["buffer"] = []
            return (self.max_norm if self.max_norm is not None else math.inf), False
        std = st["var"] ** 0.5
        z = (x - st["mean"]) / (std + self.eps)
        spike = z > self.z_thresh
        clip_val = self._threshold_float(st["mean"], std, z) if spike else x
        thr = clip_val if spike else math.inf
        if self.max_norm is not None:
            thr = min(thr, self.max_norm)
        if not (spike and self.skip_update_on_spike):
            mean = self.alpha * st["mean"] + (1 - self.alpha) * clip_val
            st["var"] = self.alpha * st["var"] + (1 - self.alpha) * (clip_val - mean) ** 2
            st["mean"] = mean
        return thr, spike

    def _threshold_float(self, mean: float, std: float, z: float) -> float:
        if self.clip_option == "mean":
            return mean
        return (mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor

    # ----- device path: 0-dim tensors, no sync -----------------------------------------------------
    def _device(self, x: Tensor) -> tuple[Tensor, Tensor]:
        st = self._as_device_state(x.device)
        finite = torch.isfinite(x)
        init = st["initialized"]
        # Warmup: record finite norms in the buffer.
        warm = finite & ~init
        # index_select/scatter with a device index: indexing by a 0-dim tensor would sync.
        slot = st["n"].clamp(max=self.warmup - 1).reshape(1)
        current = st["buffer"].index_select(0, slot)
        st["buffer"] = st["buffer"].scatter(0, slot, torch.where(warm, x, current).reshape(1))
        n = st["n"] + warm.long()
        just_ready = warm & (n >= self.warmup)
        buf_mean = st["buffer"].mean()
        buf_var = (st["buffer"] - buf_mean).square().mean()
        # After warmup: z-score, threshold, EMA.
        mean, var = st["mean"], st["var"]
        std = var.sqrt()
        z = (x - mean) / (std + self.eps)
        spike = init & finite & (z > self.z_thresh)
        if self.clip_option == "mean":
            adaptive = mean
        else:
            adaptive = (mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor
        clip_val = torch.where(spike, adaptive, x)
        update = init & finite
        if self.skip_update_on_spike:
            update = update & ~spike
        new_mean = self.alpha * mean + (1 - self.alpha) * clip_val
        new_var = self.alpha * var + (1 - self.alpha) * (clip_val - new_mean).square()
        st["mean"] = torch.where(update, new_mean, torch.where(just_ready, buf_mean, mean))
        st["var"] = torch.where(update, new_var, torch.where(just_ready, buf_var, var))
        st["initialized"] = init | just_ready
        st["n"] = n
        thr = torch.where(spike, adaptive, torch.full_like(x, math.inf))
        if self.max_norm is not None:
            thr = thr.clamp(max=self.max_norm)
        return thr, spike

    # ----- state representation -----------------------------------------------------------------
    def _as_host_state(self) -> dict:
        st = self.state
        if isinstance(st["mean"], Tensor):
            init = bool(st["initialized"])
            n = int(st["n"])
            self.state = st = {
                "buffer": [] if init else st["buffer"][:n].tolist(),
                "mean": float(st["mean"]),
                "var": float(st["var"]),
                "initialized": init,
            }
        return st

    def _as_device_state(self, device: torch.device) -> dict:
        st = self.state
        if not isinstance(st["mean"], Tensor) or st["mean"].device != device:
            st = self._as_host_state()
            buf = torch.zeros(self.warmup, device=device)
            if st["buffer"]:
                buf[: len(st["buffer"])] = torch.tensor(st["buffer"], device=device)
            n = len(st["buffer"]) if not st["initialized"] else self.warmup
            self.state = st = {
                "buffer": buf,
                "mean": torch.tensor(st["mean"], device=device),
                "var": torch.tensor(st["var"], device=device),
                "initialized": torch.tensor(st["initialized"], device=device),
                "n": torch.tensor(n, device=device),
            }
        return st

    def state_dict(self) -> dict:
        # Saved in the host form: portable across devices and between the two paths.
        return dict(self._as_host_state(), buffer=list(self._as_host_state()["buffer"]))

    def check_state(self, state) -> None:
        """The host form: ``mean`` and ``var`` finite and >= 0 (a NaN mean would let every spike
        through unclipped), ``initialized`` a bool, ``buffer`` fewer than ``warmup`` finite norms
        (none once initialized)."""
        check_keys(self.name, state, ("buffer", "mean", "var", "initialized"))
        for key in ("mean", "var"):
            check_number(self.name, key, state[key], nonneg=True)
        init = state["initialized"]
        if not isinstance(init, bool):
            refuse_state(self.name, "initialized", init, "it must be True or False")
        check_numbers(self.name, "buffer", state["buffer"], nonneg=True, max_length=self.warmup - 1)
        if init and len(state["buffer"]):
            refuse_state(
                self.name,
                "buffer",
                state["buffer"],
                "the warmup buffer must be empty once initialized=True",
            )

    def load_state_dict(self, state: dict) -> None:
        missing = {"buffer", "mean", "var", "initialized"} - set(state)
        if missing:
            raise KeyError(f"zclip: state is missing {sorted(missing)}")
        self.state = {
            "buffer": [float(b) for b in state["buffer"]],
            "mean": float(state["mean"]),
            "var": float(state["var"]),
            "initialized": bool(state["initialized"]),
        }

    # ----- the step ---------------------------------------------------------------------------------
    def apply(self, ctx: StepContext) -> None:
        stats = ctx.stats
        if not stats.grads:
            return
        if ctx.host is not None and not stats.modified:
            # The Guard already read the raw norm to the host: do the scalar math in Python, and
            # touch the gradients only when there is something to clip.
            norm = ctx.host.norm
            thr, spike = self._host(norm)
            if math.isfinite(norm) and norm > thr:
                stats.scale_(thr / (norm + NORM_EPS))
                ctx.record(self.name, True)
            ctx.metrics["zclip.threshold"] = thr
            if spike:
                ctx.metrics["zclip.spike"] = 1.0
            return
        x = stats.norm_after
        thr, spike = self._device(x)
        coef = torch.where(x > thr, thr / (x + NORM_EPS), torch.ones_like(x))
        stats.scale_(coef)
        ctx.record(self.name, coef < 1.0)
        ctx.metrics["zclip.threshold"] = thr
