"""Adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image Recognition
Without Normalization", NFNets)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Policy, StepContext
from .clip import _check_positive
from .registry import register


def unit_norms(t: torch.Tensor) -> torch.Tensor:
    """Norm per output unit (row): reduce over every dim but 0; tensors of ndim <= 1 as a whole."""
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t, dtype=torch.float32).reshape(1)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), dtype=torch.float32)


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
        self._layout = None

    def bind(self, layout, optimizer) -> None:
        self._layout = layout
        if self.exclude_head:
            layout.watch_forward_order()

    def excluded_params(self) -> set[int]:
        """Indices (in the layout) of the parameters AGC leaves alone."""
        if self._excluded is None:
            layout = self._layout
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
        excluded = self.excluded_params()
        sq = stats.param_norms.square()
        new_sq: list[torch.Tensor] = []
        acted: list[torch.Tensor] = []
        ks: list[int] = []
        for k, (g, i) in enumerate(zip(stats.grads, stats.param_index, strict=True)):
            if i in excluded:
                continue
            w = stats.layout.params[i].detach()
            max_norm = unit_norms(w).clamp_(min=self.eps).mul_(self.clipping)
            g_norm = unit_norms(g)
            clip = g_norm > max_norm
            factor = torch.where(clip, max_norm / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
            g.mul_(
                factor.to(g.dtype).reshape((-1,) + (1,) * (g.ndim - 1))
                if g.ndim > 1
                else factor[0].to(g.dtype)
            )
            new_sq.append((g_norm * factor).square().sum())
            acted.append(clip.any())
            ks.append(k)
        if not ks:
            return
        idx = stats.layout.index_tensor(ks, stats.device)
        sq = sq.index_put((idx,), torch.stack(new_sq).to(stats.device))
        stats.set_param_norms(sq.sqrt())
        mask = torch.zeros(len(stats.grads), dtype=torch.bool, device=stats.device).index_put(
            (idx,), torch.stack(acted).to(stats.device)
        )
        layer_mask = (
            torch.zeros(stats.num_layers, device=stats.device).index_add_(
                0, stats.layer_ids, mask.float()
            )
            > 0
        )
        ctx.record(self.name, mask.any(), layer_mask)
