"""A skip decided on the device: the optimizer's step multiplied by a 0/1 flag, no host read.

Every Guard that can skip reads one value to the host per step to decide it (``if not finite:
skip``); on an accelerator that read waits for the whole backward pass. OLMo-core's
``SkipStepAdamW`` avoids it with a device ``step_factor`` that multiplies the update, the moment
updates and the step count; torchtitan fails fast with ``_assert_async`` instead.

torch's fused optimizers already take such a factor: the ``found_inf`` tensor ``GradScaler``
hands them (``optimizer.found_inf``, read by ``Adam``, ``AdamW``, ``SGD`` and ``Adagrad`` when
``fused=True``). Where it is 1 their kernels leave every parameter and moment untouched and take
back the step count they added: a bit-identical skip; where it is 0 the step is torch's own. So
the Guard passes its device skip flag there (:func:`step_with_skip_flag`) rather than keeping an
optimizer of its own.

One caveat, from torch's fused SGD: a first step with momentum creates its momentum buffers
uninitialized and relies on the kernel to fill them, which it does not do on a skipped step. So
the flag is used only once every parameter has optimizer state (:func:`states_ready`); until
then the Guard decides the skip on the host, as without it (one read, on the first step).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ._lazy import torch
from .errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

#: The torch optimizers whose fused step reads ``found_inf`` (and ``grad_scale``).
FACTOR_OPTIMIZERS = ("Adam", "AdamW", "SGD", "Adagrad")


def check_factor_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise a ConfigError unless ``optimizer`` is a torch optimizer whose fused step takes a
    device skip flag (:data:`FACTOR_OPTIMIZERS`, every param group ``fused=True``)."""
    kind = type(optimizer)
    name = kind.__name__
    known = kind.__module__.startswith("torch.optim") and name in FACTOR_OPTIMIZERS
    if not known:
        raise ConfigError(
            f"sync_free needs a fused torch optimizer whose step takes a device skip flag "
            f"(torch.optim.{', torch.optim.'.join(FACTOR_OPTIMIZERS)} with fused=True); "
            f"{kind.__module__}.{name} does not take one. Use one of those, or drop sync_free "
            "(the Guard then decides a skip with one host read per step)"
        )
    unfused = [i for i, g in enumerate(optimizer.param_groups) if not g.get("fused")]
    if unfused:
        raise ConfigError(
            f"sync_free needs the fused step: param group(s) {unfused} of this {name} are not "
            f"fused; build it with torch.optim.{name}(..., fused=True)"
        )


def states_ready(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> bool:
    """Whether every parameter that has a gradient also has optimizer state already (after its
    first step), so that a skipped fused step leaves nothing uninitialized."""
    state = optimizer.state
    return all(p in state and len(state[p]) > 0 for p in params if p.grad is not None)


def step_with_skip_flag(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """``optimizer.step()`` with the update cancelled on the device where ``skip`` (a 0-dim bool
    or 0/1 tensor) holds: parameters, moments and step counts then stay bit-identical."""
    optimizer.grad_scale = None  # type: ignore[attr-defined]  # read by torch's fused step
    optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale  # type: ignore[attr-defined]
        del optimizer.found_inf  # type: ignore[attr-defined]
