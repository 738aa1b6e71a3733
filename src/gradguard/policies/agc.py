"""Adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image Recognition
Without Normalization", NFNets)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import ConfigError
from ..stats import unit_norms
from .base import Policy, StepContext
from .clip import _check_positive
from .registry import register
from .xp import TORCH, ArrayNamespace

if TYPE_CHECKING:
    from ..layout import ParamLayout


def unit_factors(xp: ArrayNamespace, p: agc, w_norm: Any, g_norm: Any) -> tuple[Any, Any]:
    """AGC's rule per unit, written once (torch and ``keras.ops``): ``(factor, clipped)`` for
    weight norms ``w_norm`` and gradient norms ``g_norm``: where ``g_norm > clipping *
    max(w_norm, eps)`` the factor brings the unit down to it, elsewhere it is 1."""
    max_norm = xp.maximum(w_norm, p.eps) * p.clipping
    clip = g_norm > max_norm
    return xp.where(clip, max_norm / xp.maximum(g_norm, 1e-6), 1.0), clip


@register
class agc(Policy):
    """Unit-wise adaptive gradient clipping.

    Per unit: ``max = clipping * max(||W||_unit, eps)``; where ``||g||_unit > max``,
    ``g <- g * max / max(||g||_unit, 1e-6)``. Defaults ``clipping=0.01, eps=1e-3`` are the paper's
    (0.01 for batch size 4096; it recommends larger values for smaller batches).

    The output head is left unclipped, as in the paper; it is found from the model (the last layer
    its forward pass runs), not from registration order. ``exclude`` adds glob patterns over
    parameter or layer names; ``exclude_head=false`` clips the head too.
    """

    name = "agc"

    def __init__(
        self,
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude: tuple[str, ...] = (),
        exclude_head: bool = True,
    ):
        super().__init__()
        _check_positive(self.name, "clipping", clipping)
        _check_positive(self.name, "eps", eps)
        self.clipping = float(clipping)
        self.eps = float(eps)
        self.exclude = tuple(exclude)
        self.exclude_head = bool(exclude_head)
        self._excluded: set[int] | None = None
        self._layout: ParamLayout | None = None

    def bind(self, layout: ParamLayout, optimizer: torch.optim.Optimizer) -> None:
        self._layout = layout
        if self.exclude_head:
            layout.watch_forward_order()

    def excluded_params(self) -> set[int]:
        """Indices (in the layout) of the parameters AGC leaves alone."""
        if self._excluded is None:
            layout = self._layout
            assert layout is not None  # set by bind()
            excl = set(layout.select(self.exclude)) if self.exclude else set()
            if self.exclude_head:
                head = layout.head_layer()
                if head is not None:
                    excl |= set(layout.params_of_layers([head]))
            self._excluded = excl
        return self._excluded

    def apply(self, ctx: StepContext) -> None:
        stats = ctx.stats
        if not stats.grads:
            return
        if stats.sharding is not None:
            raise ConfigError(
                "agc needs each unit's whole row of weights and gradient; with sharded (FSDP2/DTensor) "
                "parameters use clip_norm, zclip or autoclip, which are exact across shards"
            )
        # The decision: one factor per unit (row) of each gradient AGC clips; the stats apply it.
        excluded = self.excluded_params()
        factors: dict[int, torch.Tensor] = {}
        g_norms: dict[int, torch.Tensor] = {}
        acted: list[torch.Tensor] = []
        for k, (g, i) in enumerate(zip(stats.grads, stats.param_index, strict=True)):
            if i in excluded:
                continue
            g_norms[k] = unit_norms(g)
            factors[k], clip = unit_factors(
                TORCH, self, unit_norms(stats.layout.params[i].detach()), g_norms[k]
            )
            acted.append(clip.any())
        if not factors:
            return
        stats.scale_units_(factors, g_norms)
        ks = stats.layout.index_tensor(list(factors), stats.device)
        mask = torch.zeros(len(stats.grads), dtype=torch.bool, device=stats.device).index_put(
            (ks,), torch.stack(acted).to(stats.device)
        )
        layer_mask = (
            torch.zeros(stats.num_layers, device=stats.device).index_add_(
                0, stats.layer_ids, mask.float()
            )
            > 0
        )
        ctx.record(self.name, mask.any(), layer_mask)
