"""ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"; reference
bluorion-com/ZClip ``zclip/zclip.py`` v1.0.0)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from ..errors import SpecError
from .base import check_keys, check_number, check_numbers, refuse_state
from .clip import NORM_EPS, _check_positive
from .registry import register
from .rule import (
    Decision,
    Field,
    RuleInputs,
    RulePolicy,
    initial_host_state,
)
from .xp import ArrayNamespace

#: The longest warmup: its norms are held in a fixed buffer (1M slots = 8 MB on the host).
MAX_WARMUP = 1_000_000


@register
class zclip(RulePolicy):
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
    device kernels, with the same result). The update is :func:`zclip_update`, written once for
    that host path, the device path and Keras.

    Metrics, on every path: ``zclip.threshold`` (the threshold in force, +inf when none) and
    ``zclip.spike`` (1.0 on a step whose z-score fired, else 0.0).
    """

    name = "zclip"
    host_path = True
    metrics = ("zclip.threshold", "zclip.spike")
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
        if not isinstance(warmup, int) or isinstance(warmup, bool) or not 1 <= warmup <= MAX_WARMUP:
            raise SpecError(
                f"warmup must be an integer in [1, {MAX_WARMUP}], got {warmup!r} (the warmup norms "
                "are held in a buffer of that many slots; the paper uses 25)"
            )
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
        # The state is 4 numbers plus the warmup buffer (see ``fields``): Python numbers on the host
        # path, tensors on the device path (converted when a path first meets the other's state).
        self.state = initial_host_state(self.fields())

    # ----- the rule, written once (host floats, torch tensors, keras.ops) ---------------------------
    def fields(self, n_layers: int = 0) -> dict[str, Field]:
        # ``buffer`` holds the warmup norms in its first ``n`` slots; ``n`` stops at ``warmup``.
        return {
            "buffer": Field((self.warmup,)),
            "n": Field(kind="int"),
            "mean": Field(),
            "var": Field(),
            "initialized": Field(kind="bool"),
        }

    def decide(
        self, xp: ArrayNamespace, state: Mapping[str, Any], inputs: RuleInputs
    ) -> tuple[dict[str, Any], Decision]:
        x = inputs.norm
        new, thr, spike = zclip_update(xp, self, state, x)
        coef = xp.where(x > thr, thr / (x + NORM_EPS), 1.0)
        metrics = {"zclip.threshold": thr, "zclip.spike": xp.as_float(spike)}
        return new, Decision(scale=coef, acted=coef < 1.0, metrics=metrics)

    # ----- state representation -----------------------------------------------------------------
    def _saved(self) -> dict[str, Any]:
        """The saved form: the warmup norms so far (none once initialized), mean, var, flag."""
        st = self._as_host_state()
        init = st["initialized"]
        return {
            "buffer": [] if init else list(st["buffer"][: st["n"]]),
            "mean": st["mean"],
            "var": st["var"],
            "initialized": init,
        }

    def state_dict(self) -> dict[str, Any]:
        # Saved in the host form: portable across devices and between the two paths.
        return self._saved()

    def check_state(self, state: Any) -> None:
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"buffer", "mean", "var", "initialized"} - set(state)
        if missing:
            raise KeyError(f"zclip: state is missing {sorted(missing)}")
        self.state = self._unsaved(state)

    def _unsaved(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The saved form as the in-memory host state (the buffer padded to ``warmup`` slots)."""
        buf = [float(b) for b in state["buffer"]]
        init = bool(state["initialized"])
        return {
            "buffer": buf + [0.0] * (self.warmup - len(buf)),
            "n": self.warmup if init else len(buf),
            "mean": float(state["mean"]),
            "var": float(state["var"]),
            "initialized": init,
        }


def zclip_update(
    xp: ArrayNamespace, p: zclip, state: Mapping[str, Any], x: Any
) -> tuple[dict[str, Any], Any, Any]:
    """ZClip's update for global norm ``x``: ``(new state, threshold, z-spike)``. Pure, and written
    once for every path: ``xp`` is :data:`~gradguard.policies.xp.HOST` (Python floats),
    :data:`~gradguard.policies.xp.TORCH` or Keras's namespace; ``p`` holds the parameters.

    Every branch is a ``where``: a non-finite ``x`` changes nothing; during warmup a finite ``x``
    fills the next buffer slot, and the ``warmup``-th sets ``mean`` and ``var`` to the buffer's
    moments; after it, the z-score decides the spike, the threshold and the EMA update.
    """
    finite = xp.isfinite(x)
    init = state["initialized"]
    # Warmup: record finite norms in the buffer.
    warm = xp.logical_and(finite, xp.logical_not(init))
    n = state["n"]
    buffer = xp.put(state["buffer"], xp.minimum(n, p.warmup - 1), x, warm)
    n = n + xp.as_int(warm)
    just_ready = xp.logical_and(warm, n >= p.warmup)
    buf_mean, buf_var = xp.moments(buffer, used=just_ready)
    # After warmup: z-score, threshold, EMA.
    mean, var = state["mean"], state["var"]
    std = xp.sqrt(var)
    z = (x - mean) / (std + p.eps)
    spike = xp.logical_and(xp.logical_and(init, finite), z > p.z_thresh)
    if p.clip_option == "mean":
        adaptive = mean
    else:
        # z > z_thresh > 0 wherever the adaptive value is used; elsewhere 1 keeps the unused
        # branch finite (on the host a zero z would raise).
        z_used = xp.where(spike, z, 1.0)
        adaptive = (mean + (p.z_thresh * std) / (z_used / p.z_thresh)) * p.clip_factor
    clip_val = xp.where(spike, adaptive, x)
    update = xp.logical_and(init, finite)
    if p.skip_update_on_spike:
        update = xp.logical_and(update, xp.logical_not(spike))
    new_mean = p.alpha * mean + (1 - p.alpha) * clip_val
    dev = clip_val - new_mean
    new_var = p.alpha * var + (1 - p.alpha) * (dev * dev)
    new_state = {
        "buffer": buffer,
        "n": n,
        "mean": xp.where(update, new_mean, xp.where(just_ready, buf_mean, mean)),
        "var": xp.where(update, new_var, xp.where(just_ready, buf_var, var)),
        "initialized": xp.logical_or(init, just_ready),
    }
    thr = xp.where(spike, adaptive, math.inf)
    if p.max_norm is not None:
        thr = xp.minimum(thr, p.max_norm)
    return new_state, thr, spike
