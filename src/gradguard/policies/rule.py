"""A policy written once: a pure decision from (statistics, state) to (new state, decision).

A :class:`RulePolicy` declares its state as a few fixed-shape :class:`Field`s and implements
:meth:`RulePolicy.decide` against an array namespace (:mod:`gradguard.policies.xp`). The same
function then serves the torch Guard's device path (tensors, sync-free: the default
:meth:`RulePolicy.apply`), a host path where a policy has one (Python floats, when the Guard has
already read the norm), and Keras, whose generic adapter builds one ``keras.Variable`` per field and
calls ``decide`` with ``keras.ops`` (``gradguard.keras.policies.RuleAdapter``). Adding such a policy
is one file, its reference twin and its contract test: nothing in the Keras package.

Like optax's ``update(updates, state) -> (updates, state)``: the rule only decides; the framework
applies the :class:`Decision` (scales the gradients, records the action, reports the metrics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from .._lazy import torch
from ..stats import GradStats
from .base import Policy, StepContext
from .xp import HOST, TORCH, ArrayNamespace

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Field:
    """One piece of a rule's state: its shape, kind and initial value. On the host a scalar is a
    Python number and a vector a list; on torch a tensor (``float`` in the default dtype, ``int``
    int64, ``bool``); in Keras a variable (``float`` float32; ``int`` and ``bool`` int32)."""

    shape: tuple[int, ...] = ()
    kind: Literal["float", "int", "bool"] = "float"
    init: float = 0


@dataclass
class Decision:
    """What a rule decided for one step; the framework applies it.

    ``scale``: one factor for every gradient; ``layer_scale``: one factor per layer (the layout's
    layers); ``skip``: cancel the step (a bool or a 0-dim bool array; a rule that skips declares
    ``needs_host``, so that the torch Guard runs it on the values it read: the skip must be known
    there), with ``skip_reason`` (e.g. ``"spike_grad_norm"``) as the step's skip reason;
    ``acted``: whether the policy acted (a bool or a 0-dim bool array); ``acted_layers``: a bool
    mask over the layers (or None); ``metrics``: named numbers for telemetry, the same keys on
    every path (the policy's ``metrics``); ``anomaly``: a spike the rule mitigated, an incident
    for ``lr_backoff`` (read on the host path and in Keras; on the sync-free device path no
    reacting policy runs, since they read the host).
    """

    scale: Any = None
    layer_scale: Any = None
    #: A factor on the LR of this step's update (``lr_backoff``): the framework multiplies it into
    #: the step's LR scale, applied around the optimizer's step only.
    lr_scale: Any = None
    skip: Any = False
    skip_reason: str | None = None
    acted: Any = False
    acted_layers: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    #: A finite spike the rule mitigated: an incident for the reacting policies (``lr_backoff``).
    anomaly: Any = False


class RuleInputs(Protocol):
    """The step's statistics a rule reads, as arrays of its namespace."""

    @property
    def norm(self) -> Any:
        """The global L2 gradient norm after the policies before this one."""
        ...

    @property
    def raw_norm(self) -> Any:
        """The global L2 gradient norm as the backward pass left it (before any policy)."""
        ...

    @property
    def loss(self) -> Any:
        """The step's loss, or None where it is not given (a step without ``loss=``; Keras, whose
        optimizer never sees it: see :attr:`RulePolicy.given_loss`)."""
        ...

    @property
    def step(self) -> Any:
        """The step's number (the Guard's count of steps, from 0)."""
        ...

    @property
    def incident(self) -> Any:
        """The policies before this one made the step a hard incident: a skip (not an AMP
        overflow), a rollback, an instability (``StepContext.hard_incident``)."""
        ...

    @property
    def anomaly(self) -> Any:
        """A policy before this one mitigated a finite spike (``StepContext.anomaly``)."""
        ...

    @property
    def layer_norms(self) -> Any:
        """The L2 norm of each layer's gradient (0 for a layer without one)."""
        ...

    @property
    def layer_present(self) -> Any:
        """Whether each layer has a gradient this step (a bool vector)."""
        ...


class HostInputs:
    """The host path's statistics: the global norm the Guard read, and the loss.

    ``norm`` is the norm after the earlier policies, known on the host only while none of them
    changed the gradients (None otherwise: reading it then is an error, since it would be a
    second host sync); ``raw_norm`` (by default ``norm``) is the norm the Guard read."""

    def __init__(
        self,
        norm: Any,
        *,
        raw_norm: Any = None,
        loss: Any = None,
        step: int = 0,
        incident: bool = False,
        anomaly: bool = False,
    ):
        self._norm = norm
        self.raw_norm = norm if raw_norm is None else raw_norm
        self.loss = loss
        self.step = step
        self.incident = incident
        self.anomaly = anomaly

    @classmethod
    def of(cls, ctx: StepContext) -> HostInputs:
        """The host values of a step: the Guard's one read (when it made one: ``raw_norm`` and
        ``loss`` are None otherwise), the step, and the incidents of the policies so far."""
        host = ctx.host
        modified = ctx.stats is not None and ctx.stats.modified
        norm = None if host is None or modified else host.norm
        return cls(
            norm,
            raw_norm=None if host is None else host.norm,
            loss=None if host is None else host.loss,
            step=ctx.step,
            incident=ctx.hard_incident,
            anomaly=ctx.anomaly,
        )

    @property
    def norm(self) -> Any:
        if self._norm is None:
            raise RuntimeError(
                "the norm after the earlier policies is not on the host (they changed the "
                "gradients): a host rule reads raw_norm"
            )
        return self._norm

    @property
    def layer_norms(self) -> Any:  # pragma: no cover - no host rule reads it
        raise NotImplementedError("the host path has only the global norm")

    @property
    def layer_present(self) -> Any:  # pragma: no cover
        raise NotImplementedError("the host path has only the global norm")


class TorchInputs:
    """A :class:`~gradguard.stats.GradStats` seen as rule inputs (each computed when first read).
    The device path gives no loss (a rule that reads it declares ``needs_host``)."""

    loss = None

    def __init__(self, stats: GradStats, ctx: StepContext | None = None):
        self.stats = stats
        self.step = 0 if ctx is None else ctx.step
        self.incident = False if ctx is None else ctx.hard_incident
        self.anomaly = False if ctx is None else ctx.anomaly

    @cached_property
    def norm(self) -> Tensor:
        return self.stats.norm_after

    @cached_property
    def raw_norm(self) -> Tensor:
        return self.stats.norm

    @cached_property
    def layer_norms(self) -> Tensor:
        return self.stats.layer_norms()

    @cached_property
    def layer_present(self) -> Tensor:
        stats = self.stats
        counts = torch.zeros(stats.num_layers, device=stats.device).index_add_(
            0, stats.layer_ids, torch.ones_like(stats.param_norms, dtype=torch.float32)
        )
        return counts > 0


# ----- the state on the host and on torch ---------------------------------------------------------
def _torch_dtype(kind: str) -> torch.dtype | None:
    """The dtype a ``kind`` field is held in on torch (None: torch's default float)."""
    return {"float": None, "int": torch.long, "bool": torch.bool}[kind]


_HOST_TYPES: dict[str, type] = {"float": float, "int": int, "bool": bool}


def initial_host_state(fields: Mapping[str, Field]) -> dict[str, Any]:
    """The fields' initial values as Python numbers (lists for vectors)."""
    out: dict[str, Any] = {}
    for k, f in fields.items():
        v = _HOST_TYPES[f.kind](f.init)
        out[k] = [v] * math.prod(f.shape) if f.shape else v
    return out


def initial_torch_state(fields: Mapping[str, Field], device: torch.device) -> dict[str, Tensor]:
    """The fields' initial values as tensors on ``device``."""
    return {
        k: torch.full(
            f.shape, f.init, dtype=_torch_dtype(f.kind) or torch.get_default_dtype(), device=device
        )
        for k, f in fields.items()
    }


def to_torch(
    fields: Mapping[str, Field], state: Mapping[str, Any], device: torch.device
) -> dict[str, Tensor]:
    """The state as tensors on ``device`` (tensors already there are kept as they are; the
    host-to-device copy happens once, when a host state first meets the device path)."""
    out = {}
    for k, f in fields.items():
        v = state[k]
        if isinstance(v, torch.Tensor):
            out[k] = v if v.device == device else v.to(device)
        else:
            out[k] = torch.tensor(v, dtype=_torch_dtype(f.kind), device=device)
    return out


def to_host(fields: Mapping[str, Field], state: Mapping[str, Any]) -> dict[str, Any]:
    """The state as Python numbers and lists (one read per tensor: only when a device state
    meets the host path or is saved)."""
    out = {}
    for k, f in fields.items():
        v = state[k]
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        cast = _HOST_TYPES[f.kind]
        out[k] = [cast(x) for x in v] if f.shape else cast(v)
    return out


def is_torch_state(state: Mapping[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in state.values())


# ----- the policy ------------------------------------------------------------------------------------
class RulePolicy(Policy):
    """A policy whose step is :meth:`decide`, written once against an array namespace.

    Subclasses set ``metrics`` (the names :meth:`decide` reports, the same on every path) and
    implement :meth:`fields` and :meth:`decide`. The default :meth:`apply` is the torch device
    path: the state moves to the gradients' device as tensors, ``decide`` runs on them with
    :data:`~gradguard.policies.xp.TORCH`, and the decision is applied with no host sync.
    """

    #: The metric keys :meth:`decide` reports.
    metrics: ClassVar[tuple[str, ...]] = ()

    def fields(self, n_layers: int) -> dict[str, Field]:
        """The state's fields for a model with ``n_layers`` layers."""
        raise NotImplementedError

    def decide(
        self, xp: ArrayNamespace, state: Mapping[str, Any], inputs: RuleInputs
    ) -> tuple[dict[str, Any], Decision]:
        """The new state (every field) and the decision; pure: ``state`` is not changed."""
        raise NotImplementedError

    #: The rule is scalar (it reads only the global norm), so it also runs on Python floats when
    #: the Guard has already read the raw norm to the host (the host path of :meth:`apply`).
    host_path: ClassVar[bool] = False

    #: The rule reads only what the Guard knows on the host without a read of its own (the step,
    #: the incidents of the policies before it, the loss where it was read): it always runs on
    #: Python numbers (``lr_backoff``), even in a sync-free chain.
    host_only: ClassVar[bool] = False

    #: Whether the framework running the rule gives it the step's loss: the torch Guard does (when
    #: the step has ``loss=``); the Keras adapter sets it False on its twin before reading the
    #: fields, since a Keras optimizer never sees the loss (a rule then keeps no state for it).
    given_loss: bool = True

    def without_loss(self) -> str | None:
        """Why this configuration cannot run where the loss is never given (Keras), naming what to
        use instead; None when it can (the default)."""
        return None

    def _as_host_state(self) -> dict[str, Any]:
        """The state as Python numbers (converted once when a device state meets the host path)."""
        if is_torch_state(self.state):
            self.state = to_host(self.fields(0), self.state)  # host path: scalar, no layers
        return self.state

    def spiked(self, ctx: StepContext) -> bool:
        """A rule that reports ``<name>.spike`` (``zclip``, ``adaptive_clip``) flagged this step
        when that metric is 1.0 on the host path (a device tensor there is not read: no sync)."""
        value = ctx.metrics.get(f"{self.name}.spike")
        return not isinstance(value, torch.Tensor) and value is not None and float(value) == 1.0

    def apply(self, ctx: StepContext) -> None:
        stats = ctx.stats
        if self.needs_host or self.host_only:
            # A rule whose decision the Guard must know on the host (a skip, an LR scale): it
            # runs on the values of the Guard's one read, whatever the earlier policies did.
            assert ctx.host is not None or not self.needs_host
            self._decide_on_host(ctx, HostInputs.of(ctx))
            return
        if not stats.grads:
            return
        if self.host_path and ctx.host is not None and not stats.modified:
            # The Guard already read the raw norm: the rule on Python floats, and the gradients
            # touched only when there is something to clip.
            self._decide_on_host(ctx, HostInputs.of(ctx))
            return
        # The device path: the same rule on tensors, sync-free.
        fields = self.fields(stats.num_layers)
        state = to_torch(fields, self.state, stats.device)
        self.state, decision = self.decide(TORCH, state, TorchInputs(stats, ctx))
        apply_decision(ctx, self.name, decision)

    def _decide_on_host(self, ctx: StepContext, inputs: HostInputs) -> None:
        """The rule on Python numbers, and its decision applied: a skip requested, the gradients
        scaled only when there is something to clip (and never a non-finite gradient)."""
        self.state, decision = self.decide(HOST, self._as_host_state(), inputs)
        if decision.skip:
            ctx.request_skip(decision.skip_reason or self.name)
            ctx.record(self.name, True)
        elif decision.acted and decision.scale is None:
            ctx.record(self.name, True)
        elif decision.acted and math.isfinite(inputs.raw_norm):
            ctx.stats.scale_(decision.scale)
            ctx.record(self.name, True)
        if decision.lr_scale is not None:
            ctx.lr_scale *= decision.lr_scale
        if decision.anomaly:
            ctx.anomaly = True
        ctx.metrics.update(decision.metrics)


def apply_decision(ctx: StepContext, name: str, decision: Decision) -> None:
    """Apply a decision on torch tensors: scale the gradients, record the action, the metrics.
    (A skip is decided on the host only: a rule that skips declares ``needs_host``.)"""
    if decision.skip is not False or decision.lr_scale is not None:
        raise TypeError(
            f"{name}: a rule that skips or scales the LR must declare needs_host or host_only "
            "(decided on the host)"
        )
    stats = ctx.stats
    if decision.scale is not None:
        stats.scale_(decision.scale)
    if decision.layer_scale is not None:
        stats.scale_params_(decision.layer_scale.index_select(0, stats.layer_ids))
    ctx.record(name, decision.acted, decision.acted_layers)
    ctx.metrics.update(decision.metrics)
    if decision.anomaly is True:
        ctx.anomaly = True
