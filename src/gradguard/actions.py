"""What the Guard does to the model and the optimizer when a policy decides it.

Policies decide; the Guard acts. A policy that wants a snapshot loaded, moment buffers zeroed, a
gradient left out of the step or weight rows rescaled says so on the
:class:`~gradguard.policies.StepContext` (or in its
:class:`~gradguard.policies.UpdateDecision`), and the Guard calls these functions: the only
places that change the optimizer's state or the parameters on a policy's behalf.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ._lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

    from .policies.base import RowScale
    from .stats import GradStats


def moment_keys(
    optimizer: torch.optim.Optimizer, param: Tensor, reset_step: bool = True
) -> list[str]:
    """The keys :func:`reset_param_state_` would reset for ``param``, changing nothing: every
    floating state tensor shaped like the parameter, and ``step`` with ``reset_step``."""
    state = optimizer.state.get(param)
    if not state:
        return []
    return [
        key
        for key, val in state.items()
        if (isinstance(val, torch.Tensor) and val.shape == param.shape and val.is_floating_point())
        or (key == "step" and reset_step)
    ]


def reset_param_state_(
    optimizer: torch.optim.Optimizer, param: Tensor, reset_step: bool = True
) -> list[str]:
    """Zero every moment buffer the optimizer keeps for ``param``, in place; return the keys reset.

    A moment buffer is any state tensor shaped like the parameter (Adam/AdamW ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``; SGD ``momentum_buffer``; RMSprop ``square_avg``; ...). With
    ``reset_step``, a ``step`` counter is zeroed too, so Adam's bias correction restarts and the
    first update after the reset is an ordinary first Adam step, not one inflated by the stale
    correction (SPAM keeps the step and ramps the LR back instead). Tensors are zeroed in place, so
    fused/capturable optimizers keep their buffers.
    """
    keys = moment_keys(optimizer, param, reset_step)
    state = optimizer.state.get(param, {})
    for key in keys:
        val = state[key]
        if isinstance(val, torch.Tensor):
            val.zero_()
        else:
            state[key] = 0
    return keys


def drop_grads_(stats: GradStats, positions: Sequence[int]) -> None:
    """Leave the gradients at ``positions`` (in ``stats.grads``) out of this step: set to ``None``
    (every torch optimizer then leaves the parameter, its state and its step count alone), and
    zero in the per-parameter norms the later policies read."""
    if not positions:
        return
    for k in positions:
        stats.layout.params[stats.param_index[k]].grad = None
    keep = torch.ones(len(stats.grads), dtype=stats.dtype, device=stats.device)
    keep[torch.as_tensor(list(positions), device=stats.device)] = 0.0
    stats.set_param_norms(stats.param_norms * keep)


def scale_rows_(scales: Iterable[RowScale]) -> None:
    """Apply post-step row scalings in place (``qk_clip``'s per-head factors): each parameter's
    rows times their factors, computed in the factors' precision and stored in the parameter's."""
    with torch.no_grad():
        for rs in scales:
            p = rs.param
            f = rs.factors.to(device=p.device)
            p.mul_(f.view(-1, *([1] * (p.dim() - 1))))
