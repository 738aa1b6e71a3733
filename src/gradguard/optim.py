"""A guarded optimizer: the Guard behind the ``optimizer.step()`` interface.

For training loops you do not write yourself (Hugging Face ``Trainer``, Accelerate, any framework
that calls ``optimizer.step()``), hand the framework a :class:`GuardedOptimizer` instead of the
optimizer::

    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4), model=model)
    ...
    loss.backward()
    opt.step()            # measure, mitigate, then step or skip
    opt.last_report       # what the Guard did

It is a ``torch.optim.Optimizer`` (LR schedulers, ``GradScaler`` and Accelerate accept it) that
shares the wrapped optimizer's ``param_groups``, ``state`` and ``defaults``; its ``state_dict()``
is the wrapped optimizer's plus the Guard's state under ``"gradguard"``, so a framework that
checkpoints the optimizer checkpoints the Guard too, and resumes it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .guard import Guard
from .policies import Policy
from .report import StepReport

_STATE_KEY = "gradguard"


class GuardedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that each ``step()`` runs a :class:`~gradguard.Guard` first.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (built before wrapping, with all its params).
        model: the module being trained (names layers; ``rollback`` restores it). Optional.
        policy, scaler, check_finite, layer_stats, log_dir, telemetry: as for :class:`Guard`.
            Pass ``scaler`` only if this optimizer is stepped directly (the Guard then calls
            ``scaler.step``/``update``); if a framework calls ``scaler.step(guarded)`` itself, leave
            it out: the scaler unscales and skips overflowing steps before this ``step`` runs.

    ``step(closure)`` evaluates the closure (with grad enabled) and passes its loss to the Guard.
    ``last_report`` is the :class:`StepReport` of the last step; ``guard`` the Guard itself.
    """

    optimizer: torch.optim.Optimizer  # the wrapped one (set in __dict__ by __init__)

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        model: nn.Module | None = None,
        policy: str | Policy | Iterable[str | Policy] | None = "default",
        **guard_kwargs: Any,
    ):
        if isinstance(optimizer, GuardedOptimizer):
            raise ConfigError("this optimizer is already a GuardedOptimizer; wrap it only once")
        # Not Optimizer.__init__: the wrapper owns no parameters; everything is the wrapped one's.
        self.__dict__["optimizer"] = optimizer
        self.guard = Guard(model, optimizer, policy, **guard_kwargs)
        self.last_report: StepReport | None = None

    # The wrapped optimizer's containers, shared (not copied): schedulers and scalers that read or
    # write them through the wrapper act on the real optimizer, also after load_state_dict (which
    # replaces the wrapped optimizer's lists).
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the wrapper lacks (e.g. the hook registries, so that
        # register_step_pre_hook on the wrapper registers on the optimizer that really steps).
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ----- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        guard_loss = loss if isinstance(loss, (Tensor, int, float)) else None
        if isinstance(guard_loss, Tensor) and guard_loss.numel() != 1:
            guard_loss = None
        self.last_report = self.guard.step(guard_loss)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ConfigError(
            "a GuardedOptimizer guards the parameters its optimizer had when it was wrapped; "
            "add the param group to the optimizer before wrapping it"
        )

    # ----- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus the Guard's under ``"gradguard"`` (both load
        with ``torch.load(..., weights_only=True)``)."""
        sd = dict(self.optimizer.state_dict())
        sd[_STATE_KEY] = self.guard.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`, or a plain optimizer state dict (the
        Guard then starts fresh: its statistics warm up again). The Guard's part is checked before
        anything is loaded: one that does not fit leaves both the optimizer and the Guard as they
        were."""
        sd = dict(state_dict)
        guard_state = sd.pop(_STATE_KEY, None)
        if guard_state is not None:
            self.guard.check_state_dict(guard_state)
        self.optimizer.load_state_dict(sd)
        if guard_state is not None:
            self.guard.load_state_dict(guard_state)

    def close(self) -> None:
        """Finish the Guard's telemetry and release its policies' resources (see
        :meth:`Guard.close`)."""
        self.guard.close()

    def __repr__(self) -> str:
        return f"GuardedOptimizer({type(self.optimizer).__name__}, policy={self.guard.spec!r})"


def unwrap_guarded(optimizer: Any) -> GuardedOptimizer | None:
    """The :class:`GuardedOptimizer` inside a framework's optimizer wrappers (Accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), or None."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, GuardedOptimizer):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
    return None
