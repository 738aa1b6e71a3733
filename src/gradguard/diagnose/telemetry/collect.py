"""Telemetry during the step, on the device: the step's numbers gathered into one small vector
(``StepVector``), copied to the host without waiting (``_Pending``), and what is read from the model
itself (the meta record, normalization layers, recurrent spectral radii, input and output
statistics, dead units, attention logits).

The vector's layout is written by :class:`StepVector` and read back, in the same order, by
:func:`gradguard.diagnose.telemetry.host.step_record`; the host ``fields`` say which parts it holds.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ...attention import AttentionSite
from ...stats import foreach_norms, layer_norms_from
from ..records import VERSION

if TYPE_CHECKING:
    from ...guard import Guard
    from ...layout import ParamLayout
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
            # max |x| in one reduction, without an |x| copy of the batch (as output_stats).
            absmax = torch.linalg.vector_norm(x, ord=float("inf"))
            stats = torch.stack([x.mean(), x.std() if x.numel() > 1 else x.new_zeros(()), absmax])
            return stats, int(a.shape[0]) if a.dim() > 0 else 1
    return None


#: Elements of the logits turned to float32 at once for ``logz`` (64 MiB): a large vocabulary's
#: logits are measured a block of rows at a time, never copied whole.
_LOGZ_BLOCK = 1 << 24


def output_logits(out: Any) -> Tensor | None:
    """The logits in a forward's output: the output if it is a floating-point tensor, else the
    ``logits`` of a Hugging Face-style output (``ModelOutput``'s attribute, a dict's key), else
    the first floating-point tensor of a tuple or list; None if there is none."""
    if isinstance(out, Tensor):
        return out if out.is_floating_point() else None
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if isinstance(logits, Tensor):
        return logits if logits.is_floating_point() else None
    if isinstance(out, (tuple, list)):
        return next((t for t in out if isinstance(t, Tensor) and t.is_floating_point()), None)
    return None


def output_stats(out: Any) -> Tensor | None:
    """``[absmax]`` or ``[absmax, logz, mean]`` of a forward's logits (:func:`output_logits`),
    float32 on their device, without a sync: ``logz`` is the mean over the rows of ``logsumexp``
    over the last dimension (what the z-loss squares: Wortsman et al. 2023, "Small-scale proxies
    for large-scale Transformer training instabilities"), ``mean`` the mean logit (the logits'
    common mode, which the softmax loss cannot see: output-logit divergence moves it); both left
    out when that dimension has fewer than 2 entries (a regression output). None when the output
    holds no logits."""
    x = output_logits(out)
    if x is None or x.numel() == 0:
        return None
    with torch.no_grad():
        x = x.detach()
        # max |x| in one reduction, exact in any dtype, without an |x| copy of the logits.
        absmax = torch.linalg.vector_norm(x, ord=float("inf")).float()
        if x.dim() == 0 or x.shape[-1] < 2:
            return absmax.reshape(1)
        rows = x.reshape(-1, x.shape[-1])
        step = max(1, _LOGZ_BLOCK // rows.shape[1])
        if rows.shape[0] <= step:
            logz = torch.logsumexp(rows.float(), dim=-1).mean()
        else:
            sums = [
                torch.logsumexp(rows[i : i + step].float(), dim=-1).sum()
                for i in range(0, rows.shape[0], step)
            ]
            logz = torch.stack(sums).sum() / rows.shape[0]
        mean = x.mean(dtype=torch.float32)  # accumulated in float32, no float32 copy
        return torch.stack([absmax, logz, mean])


_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def unit_params(layout: ParamLayout, model: nn.Module | None) -> list[bool]:
    """Per parameter of ``layout``: whether its rows (dim 0) are units whose gradient
    ``dead_units`` checks: a parameter of 2 or more dimensions (a Linear's output features, a
    Conv's output channels, an RNN's gate units) of a layer that is not an embedding (whose rows
    are tokens)."""
    by_name = dict(model.named_modules()) if model is not None else {}
    out = []
    for p, li in zip(layout.params, layout.layer_of, strict=True):
        name = layout.layer_names[li]
        m = by_name.get("" if name == "(root)" else name)
        out.append(p.dim() >= 2 and not isinstance(m, _EMBEDDINGS))
    return out


class DeadUnitMeter:
    """Which unit rows (:func:`unit_params`) got a nonzero gradient on any step since the last
    reading, on the device (no sync).

    A unit counts as dead only if its gradient row was exactly zero on every batch observed since
    the previous reading (the telemetry's ``dead_window`` steps): one batch of 64 inputs
    leaves a rarely active ReLU unit silent by chance, and a per-batch share reads such a layer as
    mostly dead when a few hundred inputs show it is not. Gradients as the optimizer will see
    them: clipping scales them but keeps their zeros. Sparse gradients and parameters without one
    are left out; a step the Guard skipped is not observed (its gradients are not applied).
    """

    def __init__(self, units: Sequence[bool]):
        self.units = list(units)
        self._alive: dict[int, Tensor] = {}  # parameter index -> per row: largest |grad| seen
        self.batches = 0

    def observe(self, stats: GradStats) -> None:
        """OR this step's nonzero rows into what has been seen since the last reading."""
        with torch.no_grad():
            for g, i in zip(stats.grads, stats.param_index, strict=True):
                if not self.units[i] or g.layout != torch.strided or g.dim() < 2:
                    continue
                # Each row's largest |grad| (zero exactly when the row is; NaN counts as alive),
                # kept as a running max: one inf-norm reduction, no |grad| copy (``any`` costs
                # twice as much on a CPU).
                now = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), ord=float("inf"), dim=1)
                seen = self._alive.get(i)
                if seen is None or seen.shape != now.shape or seen.device != now.device:
                    self._alive[i] = now
                else:
                    torch.maximum(seen, now, out=seen)
        self.batches += 1

    def read(self, layout: ParamLayout, device: torch.device) -> tuple[Tensor, list[int]] | None:
        """Per layer, how many unit rows had an all-zero gradient on every observed step, on
        ``device``, and how many unit rows it has (host ints: 0 for a layer without units); then
        start over. None when nothing was observed or no layer has units."""
        alive, self._alive, self.batches = self._alive, {}, 0
        if not alive:
            return None
        n_layers = len(layout.layer_names)
        rows = [0] * n_layers
        layers: list[int] = []
        sizes: list[int] = []
        flags: list[Tensor] = []
        for i in sorted(alive):
            li = layout.layer_of[i]
            rows[li] += alive[i].numel()
            layers.append(li)
            sizes.append(alive[i].numel())
            flags.append(alive[i].eq(0).to(device))  # dead: no nonzero gradient seen
        with torch.no_grad():
            # Each row's layer, from cached per-parameter index tensors (no host-to-device copy).
            row_layer = torch.repeat_interleave(
                layout.index_tensor(layers, device),
                layout.index_tensor(sizes, device),
                output_size=sum(sizes),  # known on the host: no sync
            )
            dead = torch.cat(flags).float()
            counts = torch.zeros(n_layers, device=device).index_add_(0, row_layer, dead)
        return counts, rows


class QuietSite(AttentionSite):
    """An attention site the telemetry measures: a measurement that fails (a head count the
    logits do not match) is dropped instead of raising inside the model's forward: telemetry
    never breaks training (``qk_clip``'s own sites raise, with the fix)."""

    def record(self, per_head: Tensor) -> None:
        try:
            super().record(per_head)
        except Exception:
            self.max_logit = None

    @classmethod
    def of(cls, site: AttentionSite) -> QuietSite:
        return cls(
            site.name, site.module, site.heads, site.kv_heads, site.q, site.q_rows, site.k,
            site.k_rows, site.q_bias, site.k_bias, how=site.how,
        )  # fmt: skip


def meta_record(
    guard: Guard,
    forward_order: list[int],
    recurrent: list[str],
    sampling: dict[str, Any],
    attention: list[str] | None = None,
) -> dict[str, Any]:
    """The run's ``meta`` record: versions, policy, layers (names, types, parameter counts,
    forward order), normalization, recurrent layers, attention modules, AMP and the sampling
    settings."""
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
        "attention": list(attention or []),
        "amp": guard.scaler is not None,
        "sampling": sampling,
    }


class StepVector:
    """One step's device numbers, gathered into one vector (one copy to the host), and the host
    ``fields`` that say which parts it holds and carry the numbers already on the host.

    Parts, in order: the global norm before and after mitigation; the loss and the LR when they
    are tensors; a flag per policy whose "acted" is a tensor; the per-layer norms, before and (if
    modified) after mitigation; the per-layer update and weight norms (sampled steps); the input's
    mean/std/absmax; the per-layer count of dead unit rows (sampled steps); the output logits'
    absmax (and logz); each attention module's max logit (sampled steps); the policies' tensor
    metrics.
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

    def add_dead_units(self, counts: Tensor, rows: list[int]) -> None:
        """Per layer, the unit rows with an all-zero gradient (device) and the unit rows (host)."""
        self.parts.append(counts.to(self.device))
        self.fields["dead_rows"] = rows

    def add_logits(self, stats: Tensor) -> None:
        """The output's ``[absmax]`` or ``[absmax, logz, mean]`` (:func:`output_stats`)."""
        self.parts.append(stats.to(self.device))
        self.fields["logits_n"] = stats.numel()  # from the shape: no sync

    def add_attention(self, sites: Sequence[AttentionSite]) -> None:
        """The largest logit over the heads of each site measured since its last reset."""
        names, maxima = [], []
        for site in sites:
            if site.max_logit is not None:
                names.append(site.name)
                maxima.append(site.max_logit.amax().float().reshape(1).to(self.device))
        if names:
            self.parts.extend(maxima)
            self.fields["attn_names"] = names

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
