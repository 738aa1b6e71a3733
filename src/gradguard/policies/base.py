"""What a policy is: state plus one ``apply`` per optimizer step.

A policy reads the step's :class:`~gradguard.stats.GradStats` (and, when it declares
``needs_host``, the few host-side values the Guard reads in its single sync), mutates the gradients
only through the stats' in-place operations, and records what it did on the :class:`StepContext`:
whether it acted (a bool or a 0-dim bool tensor, so clipping stays sync-free), the layers involved,
a few named metrics, and requests to skip the step, roll back, or scale the LR.

Policies compose in a chain, in order: each sees the gradients as the previous ones left them.
State is plain data (floats, ints, tensors, lists) and round-trips through ``state_dict``.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..layout import ParamLayout
from ..specgrammar import format_value as _fmt
from ..stats import GradStats


@dataclass
class HostView:
    """Values read to the host once per step (the Guard's single sync), before any policy runs."""

    norm: float
    finite: bool
    loss: float | None
    param_norms: list[float] | None = None


@dataclass
class StepContext:
    """Everything one step's policies read and decide."""

    step: int
    stats: GradStats
    optimizer: torch.optim.Optimizer
    loss: Tensor | None = None
    host: HostView | None = None
    skip: bool = False
    skip_reason: str | None = None
    #: fp16 overflow seen by the GradScaler: its skip, not an incident of the Guard's.
    amp_overflow: bool = False
    rollback: bool = False
    lr_scale: float = 1.0
    acted: dict[str, Tensor | bool] = field(default_factory=dict)
    layers: dict[str, Tensor | list[int]] = field(default_factory=dict)
    metrics: dict[str, Tensor | float] = field(default_factory=dict)

    def record(
        self, policy: str, acted: Tensor | bool, layers: Tensor | list[int] | None = None
    ) -> None:
        """Note that ``policy`` acted (or may have: a tensor flag is read lazily, never synced here).

        ``layers`` is either a list of layer indices or a bool mask over layers.
        """
        prev = self.acted.get(policy)
        if prev is None:
            self.acted[policy] = acted
        elif isinstance(prev, Tensor) or isinstance(acted, Tensor):
            self.acted[policy] = torch.as_tensor(prev) | torch.as_tensor(acted)
        else:
            self.acted[policy] = prev or acted
        if layers is not None:
            self.layers[policy] = layers

    def request_skip(self, reason: str) -> None:
        if not self.skip:
            self.skip, self.skip_reason = True, reason

    @property
    def event(self) -> bool:
        """Whether this step already counts as an incident (a skip or rollback; an AMP overflow is
        the scaler's normal operation, not one)."""
        return self.rollback or (self.skip and self.skip_reason != "amp_overflow")


class Policy:
    """Base class of every mitigation policy.

    Subclasses set ``name`` (the registry and spec name), may set the ``needs_*`` flags, keep their
    mutable state in ``self.state`` (a dict of plain data and tensors), and implement ``apply``.
    Constructor arguments are the spec parameters; the first one is what ``name:value`` sets.
    """

    name: ClassVar[str] = ""
    #: Needs host-side values (global norm, finiteness, loss) this step: costs the Guard's one sync.
    needs_host: ClassVar[bool] = False
    #: Also needs each parameter's gradient norm on the host (read in the same transfer).
    needs_host_param_norms: ClassVar[bool] = False
    #: Reads the loss: ``guard.step(loss=...)`` must be given.
    needs_loss: ClassVar[bool] = False
    #: "clip": changes gradients; "reset": changes optimizer state before the step; "skip": may
    #: cancel the step; "react": responds to the incidents of the policies before it.
    kind: ClassVar[str] = "clip"

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def bind(self, layout: ParamLayout, optimizer: torch.optim.Optimizer) -> None:
        """Called once by the Guard before the first step: see the parameters and optimizer."""

    def apply(self, ctx: StepContext) -> None:
        raise NotImplementedError

    def after_step(self, ctx: StepContext, stepped: bool) -> None:
        """Called after the optimizer step (or the skip): e.g. to take a snapshot."""

    # ----- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            k: (v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v))
            for k, v in self.state.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.state) - set(state)
        if missing:
            raise KeyError(
                f"{self.name}: state is missing {sorted(missing)}; was it saved by another policy?"
            )
        for k, v in state.items():
            cur = self.state.get(k)
            if isinstance(cur, Tensor) and isinstance(v, Tensor):
                self.state[k] = v.to(device=cur.device, dtype=cur.dtype).clone()
            else:
                self.state[k] = copy.deepcopy(v)

    # ----- description ----------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        sig = inspect.signature(type(self).__init__)
        return {n: getattr(self, n) for n in sig.parameters if n != "self" and hasattr(self, n)}

    def spec(self) -> str:
        """The spec string that rebuilds this policy (``name:key=value,...``)."""
        args = ",".join(f"{k}={_fmt(v)}" for k, v in self.params().items())
        return f"{self.name}:{args}" if args else self.name

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
