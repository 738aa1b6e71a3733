"""Telemetry during the step, on the device: the step's numbers gathered into one small vector
(``StepVector``), copied to the host without waiting (``_Pending``), and what is read from the model
itself (the meta record, normalization layers, recurrent spectral radii, input statistics).

The vector's layout is written by :class:`StepVector` and read back, in the same order, by
:func:`gradguard.diagnose.telemetry.host.step_record`; the host ``fields`` say which parts it holds.
"""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ...stats import foreach_norms, layer_norms_from
from ..records import VERSION

if TYPE_CHECKING:
    from ...guard import Guard
    from ...policies.base import StepContext
    from ...stats import GradStats

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


def _has_normalization(model: nn.Module | None) -> bool:
    if model is None:
        return False
    rms = getattr(nn, "RMSNorm", None)
    types = (*_NORM_TYPES, rms) if rms is not None else _NORM_TYPES
    return any(isinstance(m, types) or "norm" in type(m).__name__.lower() for m in model.modules())


def spectral_radius(module: nn.RNNBase) -> float:
    """Largest |eigenvalue| over the recurrent weight matrices of an ``nn.RNN``/``LSTM``/``GRU``
    (each gate's ``hidden x hidden`` block separately; the largest is returned). For a vanilla RNN
    a radius above 1 is necessary for the gradient to explode (Pascanu et al. 2013)."""
    worst = 0.0
    w: Tensor  # a Parameter, then its detached float copy
    for name, w in module.named_parameters(recurse=False):
        if not name.startswith("weight_hh"):
            continue
        w = w.detach().float().cpu()
        h = w.shape[1]
        for block in w.split(h, dim=0):
            if block.shape[0] == h:
                worst = max(worst, float(torch.linalg.eigvals(block).abs().max()))
    return worst


def input_stats(args: tuple) -> tuple[Tensor, int] | None:
    """``[mean, std, absmax]`` of the first non-empty floating-point tensor among a forward's
    inputs, on its device, and its leading dimension (the batch size, a host int read from the
    shape: no sync); None if there is none."""
    for a in args:
        if isinstance(a, Tensor) and a.is_floating_point() and a.numel() > 0:
            x = a.detach().float()
            stats = torch.stack(
                [x.mean(), x.std() if x.numel() > 1 else x.new_zeros(()), x.abs().max()]
            )
            return stats, int(a.shape[0]) if a.dim() > 0 else 1
    return None


def meta_record(
    guard: Guard, forward_order: list[int], recurrent: list[str], sampling: dict[str, Any]
) -> dict[str, Any]:
    """The run's ``meta`` record: versions, policy, layers (names, types, parameter counts,
    forward order), normalization, recurrent layers, AMP and the sampling settings."""
    layout, model = guard.layout, guard.model
    types = []
    by_name = dict(model.named_modules()) if model is not None else {}
    for name in layout.layer_names:
        m = by_name.get("" if name == "(root)" else name)
        types.append(type(m).__name__ if m is not None else "Parameter")
    counts = [0] * len(layout.layer_names)
    for p, li in zip(layout.params, layout.layer_of, strict=True):
        counts[li] += p.numel()
    return {
        "type": "meta",
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gradguard": _version(),
        "torch": torch.__version__,
        "policy": guard.spec,
        "layers": list(layout.layer_names),
        "layer_types": types,
        "layer_params": counts,
        "forward_order": forward_order,
        "normalization": _has_normalization(model),
        "recurrent": recurrent,
        "amp": guard.scaler is not None,
        "sampling": sampling,
    }


class StepVector:
    """One step's device numbers, gathered into one vector (one copy to the host), and the host
    ``fields`` that say which parts it holds and carry the numbers already on the host.

    Parts, in order: the global norm before and after mitigation; the loss and the LR when they
    are tensors; a flag per policy whose "acted" is a tensor; the per-layer norms, before and (if
    modified) after mitigation; the per-layer update and weight norms (sampled steps); the input's
    mean/std/absmax; the policies' tensor metrics.
    """

    def __init__(self, ctx: StepContext, stats: GradStats, stepped: bool):
        self.device = device = stats.norm.device
        self.parts: list[Tensor] = [
            stats.norm.reshape(1).float(),
            stats.norm_after.reshape(1).float() if stepped else torch.zeros(1, device=device),
        ]
        self.fields: dict[str, Any] = {
            "step": ctx.step,
            "skipped": not stepped,
            "skip_reason": ctx.skip_reason,
            "rolled_back": ctx.rollback,
            "n_layers": stats.num_layers,
        }

    def _scalar(self, value: Tensor) -> Tensor:
        return value.detach().float().reshape(1).to(self.device)

    def add_loss(self, ctx: StepContext) -> None:
        loss = ctx.loss
        if isinstance(loss, Tensor):
            self.parts.append(self._scalar(loss))
            self.fields["loss_in_vector"] = True
        else:
            self.fields["loss"] = ctx.host.loss if ctx.host is not None else None

    def add_lr(self, guard: Guard, ctx: StepContext) -> None:
        lr = guard.optimizer.param_groups[0]["lr"] if guard.optimizer.param_groups else None
        if isinstance(lr, Tensor):
            self.parts.append(self._scalar(lr) * ctx.lr_scale)
            self.fields["lr_in_vector"] = True
        else:
            self.fields["lr"] = None if lr is None else float(lr) * ctx.lr_scale

    def add_actions(self, guard: Guard, ctx: StepContext) -> None:
        """Which policies acted: device bools go into the vector, host bools stay in the fields."""
        names, flags, host_acted = [], [], []
        for name, acted in ctx.acted.items():
            if isinstance(acted, Tensor):
                names.append(name)
                flags.append(acted.reshape(1).float().to(self.device))
            elif acted:
                host_acted.append(name)
        self.fields["acted_names"] = names
        self.fields["host_acted"] = host_acted
        self.fields["clip_kinds"] = {n for n, k in guard.policy_kinds.items() if k == "clip"}
        self.parts.extend(flags)

    def add_layer_norms(self, stats: GradStats, stepped: bool) -> None:
        if stats.num_layers:
            self.parts.append(stats.raw_layer_norms)
            self.fields["has_after"] = stats.modified and stepped
            if self.fields["has_after"]:
                self.parts.append(stats.layer_norms())

    def add_update(self, stats: GradStats, before: list[Tensor]) -> None:
        """Per-layer norms of the step's update and of the weights before it (``before``)."""
        device, n_layers = self.device, stats.num_layers
        with torch.no_grad():
            params = [p.detach() for p in stats.layout.params]
            delta = torch._foreach_sub(params, before)
            d_norms = torch.stack([n.to(device) for n in foreach_norms(delta)])
            w_norms = torch.stack([n.to(device) for n in foreach_norms(before)])
        ids = stats.layout.index_tensor(stats.layout.layer_of, device)
        # Summed per layer as the gradients' are: no square overflows, however large the weights.
        d_layer = layer_norms_from(d_norms.float(), ids, n_layers)
        w_layer = layer_norms_from(w_norms.float(), ids, n_layers)
        self.parts.extend([d_layer, w_layer])
        self.fields["has_update"] = True

    def add_input(self, stats: Tensor, batch: int | None = None) -> None:
        self.parts.append(stats.to(self.device))
        self.fields["has_input"] = True
        self.fields["input_batch"] = batch

    def add_metrics(self, ctx: StepContext) -> None:
        """Policy metrics (thresholds, ...): device values ride in the vector, floats stay here."""
        self.fields["metric_names"] = []
        self.fields["metrics"] = {}
        for k, val in ctx.metrics.items():
            if isinstance(val, Tensor) and val.numel() == 1:
                self.fields["metric_names"].append(k)
                self.parts.append(self._scalar(val))
            elif isinstance(val, (int, float)):
                self.fields["metrics"][k] = float(val)

    def send(self) -> _Pending:
        """The vector on its way to the host."""
        return _Pending(torch.cat(self.parts), self.fields)


class _Pending:
    """One step's numbers on their way to the host."""

    __slots__ = ("event", "fields", "host", "vector")

    def __init__(self, vector: Tensor, fields: dict[str, Any]):
        self.fields = fields
        if vector.device.type == "cuda":
            # Into pinned memory: a copy to pageable memory would block until the GPU is done.
            self.host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
            self.host.copy_(vector, non_blocking=True)
            self.event: torch.cuda.Event | None = torch.cuda.Event()
            self.event.record()
        else:
            self.host = vector if vector.device.type == "cpu" else vector.cpu()
            self.event = None

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def values(self) -> list[float]:
        if self.event is not None and not self.event.query():
            self.event.synchronize()  # waits for this copy only, not for later work
        return self.host.tolist()


def _version() -> str:
    from ..._version import __version__

    return __version__
