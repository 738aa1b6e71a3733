"""AdaGC ("AdaGC: Improving Training Stability for Large Language Model Pretraining", arXiv
2502.11034), as ``pytorch-optimizer``'s ``AdaGC`` optimizer (v4.1.0,
``pytorch_optimizer/optimizer/adagc.py``) clips its gradients: a global clip while it warms up,
then a per-tensor clip relative to an EMA of each tensor's own clipped norm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import SpecError
from ..stats import norm_dtype
from .base import Policy, StepContext, check_keys, check_number, check_tensor, refuse_state
from .clip import _check_positive
from .registry import register

if TYPE_CHECKING:
    from ..layout import ParamLayout


@register
class adagc(Policy):
    """Adaptive per-tensor gradient clipping (AdaGC), the rule of pytorch-optimizer's ``AdaGC``.

    With ``t`` this policy's step (1 on the first step it clips), per gradient tensor ``g``:

    - Warmup, ``t < warmup_steps`` (and, later, a tensor's first step with a gradient): a global
      clip, ``g <- g * min(lambda_abs / (||G|| + eps), 1)`` with ``||G||`` the global norm, and
      ``gamma <- ||g||`` clipped (its first step) or ``min(gamma, ||g|| clipped)``: the smallest
      clipped norm of the warmup, as the reference initialises it.
    - After: ``h = min(lambda_rel * max(gamma, eps) / max(||g||, eps), 1)``, ``g <- h g`` and
      ``gamma <- beta * gamma + (1 - beta) * ||h g||``, the EMA of the tensor's clipped norms.

    Defaults are pytorch-optimizer's (``lambda_abs=1.0, lambda_rel=1.05, beta=0.98,
    warmup_steps=100, eps=1e-8``); as there, the global clip runs on steps
    ``1 .. warmup_steps - 1`` and the per-tensor clip from step ``warmup_steps`` on.

    ``Guard(model, torch.optim.Adam(..., weight_decay=0), "adagc")`` takes the same steps as
    ``pytorch_optimizer.AdaGC(..., weight_decay=0)`` with the same ``lr``, ``betas`` and ``eps``
    (AdaGC's Adam update is torch's: the same bias corrections, ``eps`` added after the square
    root); ``torch.optim.AdamW(..., weight_decay=wd)`` matches AdaGC's default decoupled decay
    (``weight_decouple=True, fixed_decay=False``), which does not touch the gradients. Tested
    against the package (``tests/policies/test_adagc.py``). Where they differ:

    - AdaGC's ``eps`` serves both the clip and Adam's denominator; here it is the clip's only:
      give the optimizer the same ``eps`` (both default to 1e-8).
    - AdaGC's coupled decay (``weight_decouple=False``) adds ``wd * p`` to the gradient *before*
      it clips; ``torch.optim.Adam(weight_decay=wd)`` adds it after the Guard clipped, so those
      runs differ, as do ``fixed_decay=True`` (no torch optimizer decays by ``wd`` unscaled).
    - The clipped norms are the measured norms times their factors (the Guard's statistics; no
      second pass over the gradients), where AdaGC re-measures the clipped gradient: the same
      number up to float rounding.
    - AdaGC's Adam counts bias-correction steps per parameter group, torch's Adam per parameter:
      a parameter that misses a gradient on some step (frozen for a while, or used only later)
      is updated with another bias correction there. Its clip is the same (tested against a
      twin of the rule).
    - ``eps`` must be > 0 (AdaGC accepts 0, which makes a zero gradient's factor 0/0).
    - A gradient with a non-finite norm (reaching here only with ``check_finite=False``) is
      scaled like the others but never enters ``gamma``; in AdaGC it poisons it for good.
    - The step counts the steps this policy clipped: a step the Guard skipped (a NaN) is no step
      here, as it is none of the optimizer's. Parameter groups share one count (AdaGC keeps one
      per group, the same unless a group is added during training).

    Per-tensor norms come from the Guard's fused statistics pass (sharded DTensor gradients
    included), so the policy costs one vectorized update and no host sync. It sees the gradients
    as the policies before it left them.

    State: ``step`` and, per parameter, ``gamma`` and ``seen`` (whether it has had a gradient).
    Metrics: ``adagc.warmup`` (1.0 on a step of the global clip, else 0.0) and ``adagc.clipped``
    (how many tensors were scaled down this step).
    """

    name = "adagc"
    keras_refusal = (
        "its state is one clipped-norm EMA per variable with a per-variable warmup, which has no "
        "Keras twin yet (the torch policy is the one tested against pytorch-optimizer's AdaGC); "
        "in Keras clip per layer with clip_layerwise:factor=... or globally with adaptive_clip"
    )
    nonnegative = frozenset({"step", "gamma"})

    def __init__(
        self,
        lambda_abs: float = 1.0,
        lambda_rel: float = 1.05,
        beta: float = 0.98,
        warmup_steps: int = 100,
        eps: float = 1e-8,
    ):
        super().__init__()
        _check_positive(self.name, "lambda_abs", lambda_abs)
        _check_positive(self.name, "lambda_rel", lambda_rel)
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta < 1.0:
            raise SpecError(f"beta must be in [0, 1), got {beta!r} (e.g. adagc:beta=0.98)")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise SpecError(
                f"warmup_steps must be an integer >= 0, got {warmup_steps!r} "
                "(e.g. adagc:warmup_steps=100)"
            )
        _check_positive(self.name, "eps", eps)
        self.lambda_abs = float(lambda_abs)
        self.lambda_rel = float(lambda_rel)
        self.beta = float(beta)
        self.warmup_steps = warmup_steps
        self.eps = float(eps)

    def bind(self, layout: ParamLayout, optimizer: torch.optim.Optimizer) -> None:
        if "gamma" not in self.state:
            params = layout.params
            dev = params[0].device if params else torch.device("cpu")
            # The norms' dtype (float64 when any gradient is float64), as GradStats holds them.
            dt = max((norm_dtype(p.dtype) for p in params), key=lambda d: d.itemsize, default=None)
            n = len(params)
            self.state = {
                "step": 0,
                "gamma": torch.zeros(n, dtype=dt or torch.float32, device=dev),
                "seen": torch.zeros(n, dtype=torch.bool, device=dev),
            }

    def apply(self, ctx: StepContext) -> None:
        stats = ctx.stats
        if not stats.grads:
            return
        st = self.state
        if st["gamma"].device != stats.device:
            st["gamma"] = st["gamma"].to(stats.device)
            st["seen"] = st["seen"].to(stats.device)
        full = len(stats.param_index) == st["gamma"].numel()
        idx = None if full else stats.layout.index_tensor(stats.param_index, stats.device)
        gamma_all, seen_all = st["gamma"], st["seen"]
        gamma = (gamma_all if idx is None else gamma_all.index_select(0, idx)).to(stats.dtype)
        seen = seen_all if idx is None else seen_all.index_select(0, idx)
        norms = stats.param_norms  # as the policies before this one left them
        t = st["step"] + 1
        in_warmup = t < self.warmup_steps

        # The reference's expressions, op for op (``scalar / tensor`` is torch's reciprocal-mul).
        warm_scale = torch.clamp(self.lambda_abs / (stats.norm_after + self.eps), max=1.0)
        rel = (self.lambda_rel * gamma.clamp_min(self.eps) / norms.clamp_min(self.eps)).clamp_max(
            1.0
        )
        warm = torch.ones_like(seen) if in_warmup else ~seen
        factor = torch.where(warm, warm_scale, rel)
        after = norms * factor
        new_gamma = torch.where(
            warm,
            torch.where(seen, torch.minimum(gamma, after), after),
            torch.lerp(gamma, after, 1.0 - self.beta),
        )
        ok = torch.isfinite(after)
        new_gamma = torch.where(ok, new_gamma, gamma).to(gamma_all.dtype)
        new_seen = seen | ok
        if idx is None:
            st["gamma"], st["seen"] = new_gamma, new_seen
        else:
            st["gamma"] = gamma_all.index_put((idx,), new_gamma)
            st["seen"] = seen_all.index_put((idx,), new_seen)
        st["step"] = t

        stats.scale_params_(factor)
        clipped = factor < 1.0
        layer_mask = (
            torch.zeros(stats.num_layers, device=stats.device).index_add_(
                0, stats.layer_ids, clipped.float()
            )
            > 0
        )
        ctx.record(self.name, clipped.any(), layer_mask)
        ctx.metrics["adagc.warmup"] = 1.0 if in_warmup else 0.0
        ctx.metrics["adagc.clipped"] = clipped.sum().float()

    # ----- state ---------------------------------------------------------------------------------
    def check_state(self, state: Any) -> None:
        """``step`` an integer >= 0; ``gamma`` one finite norm >= 0 per parameter (a NaN would
        make every later factor NaN); ``seen`` one bool per parameter."""
        check_keys(self.name, state, ("step", "gamma", "seen"))
        check_number(self.name, "step", state["step"], integer=True, nonneg=True)
        check_tensor(self.name, "gamma", state["gamma"], like=self.state.get("gamma"), nonneg=True)
        check_tensor(self.name, "seen", state["seen"], like=self.state.get("seen"))
        if state["seen"].dtype != torch.bool:
            refuse_state(self.name, "seen", state["seen"], "it must be a bool tensor")
