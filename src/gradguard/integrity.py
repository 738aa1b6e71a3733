"""Weight integrity: what a Guard checks around the optimizer step so that no non-finite weight or
optimizer state comes out of it by any path.

Before the step (host-side, free): the optimizer still holds the parameters the Guard was built
with, and its hyperparameters (LR, weight decay, momentum, betas, eps) are finite. After the step:
one fused norm pass over the weights and the optimizer state says whether everything is finite.
When it is not, :func:`explain_nonfinite` names the cause for the error message: a non-finite or
negative optimizer state, or an update that overflowed the weights' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._lazy import torch
from .errors import ConfigError, IntegrityError
from .layout import ParamLayout
from .stats import Sharding, all_finite

if TYPE_CHECKING:
    from torch import Tensor

#: Param-group hyperparameters that must be finite for any torch optimizer to step sanely.
CHECKED_HYPERPARAMETERS = ("lr", "weight_decay", "momentum", "dampening", "eps", "alpha", "betas")
#: Second-moment buffers that must also be non-negative (their square root is taken).
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta")
#: First-moment buffers: the running direction of the step (SGD/RMSprop ``momentum_buffer``,
#: Adam/AdamW/NAdam/RAdam/Adamax ``exp_avg``, also Lion's). The update of SGD with momentum is
#: ``lr * momentum_buffer``, of Adam ``lr * exp_avg_hat / (sqrt(exp_avg_sq_hat) + eps)``: linear
#: in the first moment, so scaling it by ``s`` is what the optimizer would hold had it taken a
#: step ``s`` times its own. (Lion steps by the sign of a mix of ``exp_avg`` and the gradient:
#: there scaling only weakens the remembered direction.)
FIRST_MOMENTS = ("momentum_buffer", "exp_avg")


def group_signature(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    """How many parameters each param group holds (cheap to compare every step)."""
    return tuple(len(g["params"]) for g in optimizer.param_groups)


def check_groups(optimizer: torch.optim.Optimizer, signature: tuple[int, ...]) -> None:
    """Refuse a step after ``add_param_group`` (or a changed group) the Guard does not know of."""
    now = group_signature(optimizer)
    if now != signature:
        raise ConfigError(
            f"the optimizer's param groups changed after the Guard was built ({len(signature)} "
            f"group(s) of {list(signature)} parameters then, {len(now)} of {list(now)} now): the "
            "Guard measures, clips and restores only the parameters it was built with. Build a new "
            "Guard after optimizer.add_param_group(...) (and load the old one's state_dict into it "
            "if the chain is unchanged)"
        )


def _finite_number(v: object) -> bool:
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu" or v.numel() != 1:
            return True  # reading it would cost a device sync; the post-step check covers it
        v = float(v)
    if isinstance(v, (tuple, list)):
        return all(_finite_number(x) for x in v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return math.isfinite(v)
    return True


def check_hyperparameters(optimizer: torch.optim.Optimizer, lr_scale: float) -> None:
    """Raise before the step if a param group's LR, weight decay, ... is NaN or infinite."""
    if not math.isfinite(lr_scale):
        raise IntegrityError(
            f"the chain asked for an LR scale of {lr_scale}: a policy's state is corrupted; "
            "reload a good Guard state or rebuild the Guard",
            "nonfinite_hyperparameter",
        )
    for gi, group in enumerate(optimizer.param_groups):
        for key in CHECKED_HYPERPARAMETERS:
            if key in group and not _finite_number(group[key]):
                raise IntegrityError(
                    f"param group {gi} has {key}={group[key]!r}: the step would write non-finite "
                    f"weights, so the Guard did not take it. Set a finite {key} (check the LR "
                    "scheduler and any code that writes optimizer.param_groups)",
                    "nonfinite_hyperparameter",
                )


def state_tensors(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor]:
    """Every floating-point state tensor the optimizer keeps for ``params`` (moments, buffers)."""
    out = []
    for p in params:
        for v in optimizer.state.get(p, {}).values():
            if (
                isinstance(v, torch.Tensor)
                and (v.is_floating_point() or v.is_complex())
                and v.numel()
            ):
                out.append(v)
    return out


def finite_after_step(
    layout: ParamLayout, optimizer: torch.optim.Optimizer, with_state: bool
) -> bool:
    """One fused pass: are every weight (and, ``with_state``, every optimizer state) finite?"""
    tensors = [p.detach() for p in layout.params]
    if with_state:
        tensors += state_tensors(optimizer, layout.params)
    # Sharded (FSDP2/DTensor) weights: each rank reads its shards, and the ranks agree on the
    # answer, so that all of them restore or raise together (one that raised alone would leave
    # the others waiting in the next collective).
    local, sharding = Sharding.split(tensors)
    finite = all_finite(local)
    if sharding is None:
        return finite
    flag = torch.tensor([0.0 if finite else 1.0], device=local[0].device if local else "cpu")
    return not bool(sharding.all_reduce_max(flag).item())


def explain_nonfinite(layout: ParamLayout, optimizer: torch.optim.Optimizer) -> tuple[str, str]:
    """(reason, sentence) naming what went non-finite in the step just taken, and why."""
    bad_weights = [n for n, p in zip(layout.names, layout.params, strict=True) if not _ok(p)]
    for name, p in zip(layout.names, layout.params, strict=True):
        for key, v in optimizer.state.get(p, {}).items():
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or not v.numel():
                continue
            if not _ok(v):
                return "nonfinite_state", (
                    f"the optimizer state {key!r} of parameter {name} holds NaN or Inf"
                    + (f" (weights now non-finite: {_few(bad_weights)})" if bad_weights else "")
                    + "; it was corrupted before this step or overflowed in it (load a good "
                    "checkpoint; clip the gradients so their square cannot overflow)"
                )
            if key in SECOND_MOMENTS and bool((v < 0).any()):
                return "nonfinite_state", (
                    f"the optimizer state {key!r} of parameter {name} holds negative values, so "
                    f"its square root is NaN (weights now non-finite: {_few(bad_weights)}); the "
                    "state was corrupted outside the optimizer (load a good checkpoint)"
                )
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in layout.params if not _ok(p)})
    return "nonfinite_weights", (
        f"the update overflowed the weights' dtype ({', '.join(dtypes)}) in {_few(bad_weights)}: "
        "gradients, LR and optimizer state were finite, the result was not (lower the LR, clip "
        "the gradients, or keep fp32 master weights)"
    )


def _ok(t: Tensor) -> bool:
    local, _ = Sharding.split([t.detach()])
    return all_finite(local)


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
