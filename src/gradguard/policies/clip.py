"""Fixed-threshold clipping: by global norm, by value, and per layer."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._lazy import np, torch
from ..errors import ConfigError, SpecError
from ..stats import exact_norms, scaled_l2, stacked_norms
from .base import Policy, StepContext
from .registry import register
from .rule import Decision, Field, RuleInputs, RulePolicy, initial_torch_state
from .xp import ArrayNamespace

if TYPE_CHECKING:
    from ..layout import ParamLayout

#: torch's clip_grad_norm_ adds this to the norm before dividing; kept identical for equivalence.
NORM_EPS = 1e-6


def _check_positive(policy: str, name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        value is None
        or not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise SpecError(
            f"{name} must be a finite number > 0, got {value!r} (e.g. {policy}:{name}=1.0)"
        )


@register
class clip_norm(Policy):
    """Clip by global norm: ``g <- g * min(1, max_norm / (||g|| + 1e-6))``.

    The same result as ``torch.nn.utils.clip_grad_norm_`` (same norm, same epsilon, same clamp), with
    no host sync: the factor is a device scalar applied with ``_foreach_mul_``. ``norm_type`` other
    than 2 costs one more pass over the gradients (the statistics hold L2 norms).

    Default ``max_norm=1.0`` is the value most large-model recipes use (GPT-2/3, LLaMA, OLMo).
    """

    name = "clip_norm"

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0):
        super().__init__()
        _check_positive(self.name, "max_norm", max_norm)
        if not (norm_type == math.inf or (isinstance(norm_type, (int, float)) and norm_type > 0)):
            raise SpecError(f"norm_type must be > 0 or inf, got {norm_type!r}")
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)

    def apply(self, ctx: StepContext) -> None:
        stats = ctx.stats
        if not stats.grads:
            return
        if self.norm_type == 2.0 and ctx.host is not None and not stats.modified:
            # The Guard already read the norm: decide on the host and leave an unclipped gradient
            # untouched. The factor is computed in the norm's dtype exactly as torch computes it
            # (``max_norm * reciprocal(norm + 1e-6)``), so the result stays bit-identical.
            f = np.float64 if stats.dtype == torch.float64 else np.float32
            coef: torch.Tensor | float = float(
                f(1.0) / (f(ctx.host.norm) + f(NORM_EPS)) * f(self.max_norm)
            )
            if coef < 1.0:
                stats.scale_(coef)
            ctx.record(self.name, coef < 1.0)
            return
        if self.norm_type == 2.0:
            total = stats.norm_after
        else:
            per = stacked_norms(stats.grads, stats.device, stats.dtype, self.norm_type)
            total = torch.linalg.vector_norm(per, self.norm_type)
            if ctx.host is not None and ctx.host.finite and not math.isfinite(float(total)):
                # |g|^p overflowed while every element is finite (the Guard's read says so):
                # re-measure exactly (scaled, float64) rather than clip to zero. A rare step; the
                # read is one more sync, on a chain that already syncs.
                exact = exact_norms(stats.grads, stats.device, self.norm_type)
                total = scaled_l2(exact, self.norm_type)
        # clamp instead of `if total > max_norm`: a Python branch on a device value is a host sync.
        coef = torch.clamp(self.max_norm / (total + NORM_EPS), max=1.0)
        stats.scale_(coef)
        ctx.record(self.name, coef < 1.0)


@register
class clip_value(Policy):
    """Clip every gradient element to ``[-limit, limit]`` (``torch.nn.utils.clip_grad_value_``).

    Elementwise clipping changes the direction of the gradient; prefer ``clip_norm`` unless you
    want exactly this. The norms after clipping are re-measured (one more pass).
    """

    name = "clip_value"

    def __init__(self, limit: float = 1.0):
        super().__init__()
        _check_positive(self.name, "limit", limit)
        self.limit = float(limit)

    def bind(self, layout: ParamLayout, optimizer: torch.optim.Optimizer) -> None:
        complex_ = [n for n, p in zip(layout.names, layout.params, strict=True) if p.is_complex()]
        if complex_:
            raise ConfigError(
                f"clip_value cannot clip complex gradients ({', '.join(complex_[:3])}): an "
                "elementwise clamp is undefined for complex numbers (torch's clip_grad_value_ "
                "refuses them too); use clip_norm or agc"
            )

    def apply(self, ctx: StepContext) -> None:
        stats = ctx.stats
        if not stats.grads:
            return
        before = stats.param_norms
        stats.clamp_(self.limit)
        # A clamp that changed anything lowered some tensor's norm.
        changed = stats.param_norms < before
        ctx.record(self.name, changed.any(), stats.layer_norms(changed.float()) > 0)


@register
class clip_layerwise(RulePolicy):
    """Clip each layer's gradient (the params one module owns) against its own threshold.

    The "layered" mitigation for large models: a layer whose gradient explodes is scaled down
    without shrinking the healthy layers, which a global clip would do.

    Threshold per layer: ``max_norm`` (fixed), or ``factor`` times the layer's running norm (an
    exponential moving average with decay ``beta`` of its post-clip norm, bias-corrected), or the
    smaller of both. With ``factor`` the first ``warmup`` steps only measure. Sync-free.
    """

    name = "clip_layerwise"
    metrics = ()
    nonnegative = frozenset({"ema", "count"})

    def __init__(
        self,
        max_norm: float | None = None,
        factor: float | None = None,
        beta: float = 0.98,
        warmup: int = 25,
    ):
        super().__init__()
        if max_norm is None and factor is None:
            raise SpecError(
                "give max_norm (a fixed per-layer threshold) or factor (a multiple of the layer's running norm), e.g. clip_layerwise:factor=3"
            )
        _check_positive(self.name, "max_norm", max_norm, allow_none=True)
        _check_positive(self.name, "factor", factor, allow_none=True)
        if not 0.0 < beta < 1.0:
            raise SpecError(f"beta must be in (0, 1), got {beta!r}")
        if warmup < 1:
            raise SpecError(f"warmup must be >= 1, got {warmup!r}")
        self.max_norm = None if max_norm is None else float(max_norm)
        self.factor = None if factor is None else float(factor)
        self.beta = float(beta)
        self.warmup = int(warmup)

    def bind(self, layout: ParamLayout, optimizer: torch.optim.Optimizer) -> None:
        if "ema" not in self.state:
            dev = layout.params[0].device if layout.params else torch.device("cpu")
            self.state.update(initial_torch_state(self.fields(len(layout.layer_names)), dev))

    # The rule, written once for torch (the default device ``apply``) and Keras.
    def fields(self, n_layers: int) -> dict[str, Field]:
        return {"ema": Field((n_layers,)), "count": Field((n_layers,))}

    def decide(
        self, xp: ArrayNamespace, state: Mapping[str, Any], inputs: RuleInputs
    ) -> tuple[dict[str, Any], Decision]:
        norms = inputs.layer_norms
        ema, count = state["ema"], state["count"]
        thr = xp.full_like(norms, math.inf)
        if self.factor is not None:
            corrected = ema / (1.0 - xp.power(self.beta, xp.maximum(count, 1.0)))
            thr = xp.where(count >= self.warmup, self.factor * corrected, thr)
        if self.max_norm is not None:
            thr = xp.minimum(thr, self.max_norm)
        coef = xp.minimum(thr / (norms + NORM_EPS), 1.0)
        clipped = coef < 1.0
        new = {"ema": ema, "count": count}
        if self.factor is not None:
            # Track the norm the layer actually had after clipping; skip layers without a finite
            # gradient.
            after = norms * coef
            upd = xp.logical_and(inputs.layer_present, xp.isfinite(after))
            new = {
                "ema": xp.where(upd, self.beta * ema + (1 - self.beta) * after, ema),
                "count": count + xp.as_float(upd),
            }
        return new, Decision(layer_scale=coef, acted=xp.any(clipped), acted_layers=clipped)
