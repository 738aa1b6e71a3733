"""Telemetry: what a Guard with ``log_dir`` records, from the statistics it already computed.

Per step: the global norm before and after mitigation, per-layer gradient norms (from the
per-parameter norms of the one fused pass: no second pass over the gradients), what each policy did,
the loss, the LR, the input batch's mean/std/absmax, the AMP scale; on sampled steps the per-layer
update/weight ratio and the spectral radius of recurrent weights. Events (``events.py``) are
detected on every step; the file keeps a bounded record:

* every step for the first 1000, then every 10th to 10 000, every 100th to 100 000, ... (``every``
  = ``"auto"``; an int keeps every n-th step), so a long run's file grows with log(steps);
* the ``context`` steps before each event and after it, exactly, whatever the sampling.

Nothing here blocks training: the step's numbers are gathered into one small device vector and
copied to the host without waiting (``non_blocking``, with a CUDA event); the copy is read a step
later, when it has long landed. Records are buffered and written in whole lines, flushed on every
event and on ``close()``. TensorBoard event files (``RUN_DIR/tb``) get the same kept steps.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
import types
import warnings
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..stats import foreach_norms
from .events import EventDetector
from .records import VERSION, RecordWriter, event_counts

if TYPE_CHECKING:
    from ..guard import Guard
    from ..policies.base import StepContext
    from ..report import StepReport
    from ..stats import GradStats

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
    for name, w in module.named_parameters(recurse=False):
        if not name.startswith("weight_hh"):
            continue
        w = w.detach().float().cpu()
        h = w.shape[1]
        for block in w.split(h, dim=0):
            if block.shape[0] == h:
                worst = max(worst, float(torch.linalg.eigvals(block).abs().max()))
    return worst


def _keep_auto(step: int) -> bool:
    if step < 1000:
        return True
    stride = 10 ** (int(math.log10(step)) - 2)
    return step % stride == 0


class _Pending:
    """One step's numbers on their way to the host."""

    __slots__ = ("event", "fields", "host", "vector")

    def __init__(self, vector: Tensor, fields: dict[str, Any]):
        self.fields = fields
        if vector.device.type == "cuda":
            # Into pinned memory: a copy to pageable memory would block until the GPU is done.
            self.host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
            self.host.copy_(vector, non_blocking=True)
            self.event = torch.cuda.Event()
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


class Telemetry:
    """Records a Guard's steps to ``log_dir`` (``telemetry.jsonl`` + TensorBoard in ``tb/``).

    Made by ``Guard(..., log_dir=DIR)``; pass ``Guard(..., telemetry=Telemetry(DIR, ...))`` to
    change its settings.

    Args:
        log_dir: the run folder (created if missing; appended to if it exists).
        every: ``"auto"`` (see the module doc) or keep every n-th step.
        context: steps kept exactly before and after each event.
        update_every: sample the update/weight ratio every n steps (it needs a copy of the weights
            before the step: one clone of the parameters, freed after the step).
        radius_every: sample recurrent spectral radii every n steps (and on events' steps).
        tensorboard: write TensorBoard event files (``None``: if tensorboard is installed).
        watch_inputs: record mean/std/absmax of the model's first input (a forward pre-hook).
        detector: the :class:`EventDetector` (default settings if None).
    """

    def __init__(
        self,
        log_dir,
        *,
        every: int | str = "auto",
        context: int = 32,
        update_every: int = 10,
        radius_every: int = 100,
        tensorboard: bool | None = None,
        watch_inputs: bool = True,
        detector: EventDetector | None = None,
    ):
        if every != "auto" and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ValueError(f"every must be 'auto' or a positive int, got {every!r}")
        for name, v in (
            ("context", context),
            ("update_every", update_every),
            ("radius_every", radius_every),
        ):
            if not isinstance(v, int) or v < (0 if name == "context" else 1):
                raise ValueError(
                    f"{name} must be a {'non-negative' if name == 'context' else 'positive'} int, got {v!r}"
                )
        self.writer = RecordWriter(log_dir)
        self.dir = self.writer.dir
        self.every = every
        self.context = context
        self.update_every = update_every
        self.radius_every = radius_every
        self.watch_inputs = watch_inputs
        self._want_tb = tensorboard
        self._tb = None
        self.detector = detector
        self._guard: weakref.ref | None = None
        self._pending: deque[_Pending] = deque()
        self._recent: deque[dict[str, Any]] = deque(maxlen=context + 1)  # + the current step
        self._written: set[int] = set()  # steps written, among the recent ones
        self._after_event = 0
        self._input: Tensor | None = None
        self._hook = None
        self._before: list[Tensor] | None = None
        self._recurrent: list[tuple[int, nn.RNNBase]] = []
        self.events: list[dict[str, Any]] = []
        self._event_counts: dict[str, int] = {}
        self.localizations: list[dict[str, Any]] = []
        self._steps_seen = 0
        self._clipped_recent: deque[bool] = deque(maxlen=100)
        self._closed = False
        self._started = False

    # ----- binding --------------------------------------------------------------------------------
    def bind(self, guard: Guard) -> None:
        """Attach to a Guard (the Guard calls this). The meta record is written at the first step,
        once the first forward pass has shown the order of the layers."""
        self._guard = weakref.ref(guard)
        layout = guard.layout
        model = guard.model
        layout.watch_forward_order()
        if model is not None:
            by_name = dict(model.named_modules())
            self._recurrent = [
                (i, m)
                for i, name in enumerate(layout.layer_names)
                if isinstance(m := by_name.get("" if name == "(root)" else name), nn.RNNBase)
            ]
            if self.watch_inputs:
                self._hook = model.register_forward_pre_hook(self._on_input)

    def _start(self, guard: Guard) -> None:
        layout, model = guard.layout, guard.model
        if self.detector is None:
            self.detector = EventDetector(layout.layer_names, self._forward_order(guard))
        types = []
        by_name = dict(model.named_modules()) if model is not None else {}
        for name in layout.layer_names:
            m = by_name.get("" if name == "(root)" else name)
            types.append(type(m).__name__ if m is not None else "Parameter")
        counts = [0] * len(layout.layer_names)
        for p, li in zip(layout.params, layout.layer_of, strict=True):
            counts[li] += p.numel()
        self.writer.write(
            {
                "type": "meta",
                "version": VERSION,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "gradguard": _version(),
                "torch": torch.__version__,
                "policy": guard.spec,
                "layers": list(layout.layer_names),
                "layer_types": types,
                "layer_params": counts,
                "forward_order": self._forward_order(guard),
                "normalization": _has_normalization(model),
                "recurrent": [layout.layer_names[i] for i, _ in self._recurrent],
                "amp": guard.scaler is not None,
                "sampling": {
                    "every": self.every,
                    "context": self.context,
                    "update_every": self.update_every,
                },
            },
            flush=True,
        )
        if self._want_tb is not False:
            try:
                _tensorboard_without_tensorflow()
                from torch.utils.tensorboard import SummaryWriter

                # A deep queue: add_scalar never blocks on the writer thread (flushed on events and close).
                self._tb = SummaryWriter(str(self.dir / "tb"), max_queue=100_000, flush_secs=60)
            except ImportError:
                if self._want_tb:
                    raise
                warnings.warn(
                    "tensorboard is not installed: telemetry goes to telemetry.jsonl only "
                    "(pip install tensorboard for TensorBoard files)",
                    stacklevel=3,
                )

    @staticmethod
    def _forward_order(guard: Guard) -> list[int]:
        return list(dict.fromkeys(guard.layout.forward_order))

    def _on_input(self, _module: nn.Module, args: tuple) -> None:
        for a in args:
            if isinstance(a, Tensor) and a.is_floating_point() and a.numel() > 0:
                x = a.detach().float()
                self._input = torch.stack(
                    [x.mean(), x.std() if x.numel() > 1 else x.new_zeros(()), x.abs().max()]
                )
                return

    # ----- per step (called by the Guard) -----------------------------------------------------------
    def wants_update_ratio(self, step: int) -> bool:
        return step % self.update_every == 0

    def before_update(self, stats: GradStats) -> None:
        """Keep the weights as they are before the optimizer step (sampled steps only)."""
        self._before = [p.detach().clone() for p in stats.layout.params]

    def after_step(
        self,
        guard: Guard,
        ctx: StepContext,
        stats: GradStats,
        report: StepReport,
        stepped: bool,
        localization: dict[str, Any] | None = None,
    ) -> None:
        if self._closed:
            return
        if not self._started:
            self._start(guard)
            self._started = True
        step = ctx.step
        L = stats.num_layers
        device = stats.norm.device
        parts: list[Tensor] = [
            stats.norm.reshape(1).float(),
            stats.norm_after.reshape(1).float() if stepped else torch.zeros(1, device=device),
        ]
        fields: dict[str, Any] = {
            "step": step,
            "skipped": not stepped,
            "skip_reason": ctx.skip_reason,
            "rolled_back": ctx.rollback,
            "n_layers": L,
        }
        loss = ctx.loss
        if isinstance(loss, Tensor):
            parts.append(loss.detach().float().reshape(1).to(device))
            fields["loss_in_vector"] = True
        else:
            fields["loss"] = ctx.host.loss if ctx.host is not None else None
        lr = guard.optimizer.param_groups[0]["lr"] if guard.optimizer.param_groups else None
        if isinstance(lr, Tensor):
            parts.append(lr.detach().float().reshape(1).to(device) * ctx.lr_scale)
            fields["lr_in_vector"] = True
        else:
            fields["lr"] = None if lr is None else float(lr) * ctx.lr_scale
        # Which policies acted: device bools go into the vector, host bools stay here.
        names, flags, host_acted = [], [], []
        for name, acted in ctx.acted.items():
            if isinstance(acted, Tensor):
                names.append(name)
                flags.append(acted.reshape(1).float().to(device))
            elif acted:
                host_acted.append(name)
        fields["acted_names"] = names
        fields["host_acted"] = host_acted
        fields["clip_kinds"] = {n for n, k in guard._kinds.items() if k == "clip"}
        parts.extend(flags)
        if L:
            parts.append(stats.raw_layer_norms)
            fields["has_after"] = stats.modified and stepped
            if fields["has_after"]:
                parts.append(stats.layer_norms())
        if self._before is not None:
            if stepped:
                with torch.no_grad():
                    params = [p.detach() for p in stats.layout.params]
                    delta = torch._foreach_sub(params, self._before)
                    d_norms = torch.stack([n.to(device) for n in foreach_norms(delta)])
                    w_norms = torch.stack([n.to(device) for n in foreach_norms(self._before)])
                ids = stats.layout.index_tensor(stats.layout.layer_of, device)
                d_layer = torch.zeros(L, device=device).index_add_(0, ids, d_norms.square()).sqrt()
                w_layer = torch.zeros(L, device=device).index_add_(0, ids, w_norms.square()).sqrt()
                parts.extend([d_layer, w_layer])
                fields["has_update"] = True
            self._before = None
        if self._input is not None:
            parts.append(self._input.to(device))
            fields["has_input"] = True
            self._input = None
        if guard.scaler is not None:
            fields["amp_scale"] = guard.scaler.get_scale() if ctx.host is not None else None
        if self._recurrent and (step % self.radius_every == 0 or not stepped):
            fields["radius"] = {
                guard.layout.layer_names[i]: spectral_radius(m) for i, m in self._recurrent
            }
        # Policy metrics (thresholds, ...): device values ride in the vector, floats stay here.
        fields["metric_names"] = []
        fields["metrics"] = {}
        for k, val in ctx.metrics.items():
            if isinstance(val, Tensor) and val.numel() == 1:
                fields["metric_names"].append(k)
                parts.append(val.detach().float().reshape(1).to(device))
            elif isinstance(val, (int, float)):
                fields["metrics"][k] = float(val)
        if localization is not None:
            fields["localization"] = localization
        self._pending.append(_Pending(torch.cat(parts), fields))
        # Process what has landed; keep at most one step in flight.
        while self._pending and (len(self._pending) > 1 or self._pending[0].ready()):
            self._process(self._pending.popleft())

    # ----- host side ------------------------------------------------------------------------------
    def _process(self, pending: _Pending) -> None:
        f = pending.fields
        v = pending.values()
        pos = 0

        def take(n: int) -> list[float]:
            nonlocal pos
            out = v[pos : pos + n]
            pos += n
            return out

        norm, norm_after = take(2)
        loss = take(1)[0] if f.get("loss_in_vector") else f.get("loss")
        lr = take(1)[0] if f.get("lr_in_vector") else f.get("lr")
        acted = list(f["host_acted"])
        for name, flag in zip(f["acted_names"], take(len(f["acted_names"])), strict=True):
            if flag:
                acted.append(name)
        L = f["n_layers"]
        layer_norms = take(L) if L else []
        layer_after = take(L) if f.get("has_after") else None
        update_ratio = weight_norms = None
        if f.get("has_update"):
            d, w = take(L), take(L)
            update_ratio = [di / wi if wi > 0 else None for di, wi in zip(d, w, strict=True)]
            weight_norms = w
        inp = None
        if f.get("has_input"):
            mean, std, absmax = take(3)
            inp = {"mean": mean, "std": std, "absmax": absmax}
        metrics = dict(f["metrics"])
        metrics.update(zip(f["metric_names"], take(len(f["metric_names"])), strict=True))
        rec = {
            "type": "step",
            "step": f["step"],
            "loss": loss,
            "lr": lr,
            "grad_norm": norm,
            "grad_norm_after": norm_after,
            "clipped": any(a in f["clip_kinds"] for a in acted) and not f["skipped"],
            "skipped": f["skipped"],
            "skip_reason": f["skip_reason"],
            "rolled_back": f["rolled_back"],
            "actions": acted,
            "layer_norms": layer_norms,
            "layer_norms_after": layer_after,
            "weight_norms": weight_norms,
            "update_ratio": update_ratio,
            "nonfinite_layers": [i for i, x in enumerate(layer_norms) if not math.isfinite(x)],
            "input": inp,
            "amp_scale": f.get("amp_scale"),
            "radius": f.get("radius"),
            "metrics": metrics,
        }
        self._steps_seen += 1
        self._clipped_recent.append(rec["clipped"])
        assert self.detector is not None
        events = self.detector.observe(rec)
        localization = f.get("localization")
        if localization is None and rec["nonfinite_layers"]:
            guard = self._guard() if self._guard is not None else None
            meta = {
                "layers": self.detector.layers,
                "forward_order": self._forward_order(guard) if guard is not None else [],
            }
            from .localize import localize_static

            localization = localize_static(rec, meta)
        self._recent.append(rec)
        if events or localization is not None:
            self._write_context()
            self._write_step(rec)
            for e in events:
                if localization is not None and e["kind"] in ("nonfinite_grad", "nonfinite_loss"):
                    e["detail"]["origin"] = localization.get("origin")
                self._record_event(e)
            if localization is not None:
                self.localizations.append(localization)
                self.writer.write(localization)
            self.writer.flush()
            self._after_event = self.context
        elif self._after_event > 0 or self._keep(rec["step"]):
            self._write_step(rec)
        if self._after_event > 0 and not (events or localization is not None):
            self._after_event -= 1

    def _keep(self, step: int) -> bool:
        return _keep_auto(step) if self.every == "auto" else step % int(self.every) == 0

    def _write_context(self) -> None:
        for r in list(self._recent)[:-1]:
            self._write_step(r)

    def _write_step(self, rec: dict[str, Any]) -> None:
        step = rec["step"]
        if step in self._written:
            return
        self.writer.write(rec)
        self._written.add(step)
        if len(self._written) > 4 * (self.context + 1):  # only recent steps can come up again
            oldest = self._recent[0]["step"] if self._recent else step
            self._written = {s for s in self._written if s >= oldest}
        if self._tb is not None:
            self._tb_step(rec)

    def _record_event(self, e: dict[str, Any]) -> None:
        self._event_counts[e["kind"]] = self._event_counts.get(e["kind"], 0) + 1
        if len(self.events) < 10_000:  # in memory; every event is in the file
            self.events.append(e)
        self.writer.write(e)
        if self._tb is not None:
            self._tb.add_text(
                "events",
                f"step {e['step']}: {e['kind']} {', '.join(e['layers'][:5])} ({e['action']})",
                e["step"],
            )

    def _tb_step(self, rec: dict[str, Any]) -> None:
        tb, s = self._tb, rec["step"]
        for tag, val in (
            ("grad_norm/pre_clip", rec["grad_norm"]),
            ("grad_norm/post_clip", rec["grad_norm_after"]),
            ("loss", rec["loss"]),
            ("lr", rec["lr"]),
            ("clip_rate/last_100", sum(self._clipped_recent) / max(len(self._clipped_recent), 1)),
        ):
            if val is not None and math.isfinite(val):
                tb.add_scalar(tag, val, s)
        # Per-layer series every 10th kept step (and around events): TensorBoard's writer costs
        # ~0.2 ms per scalar, so a tag per layer per step would cost more than the step itself.
        if s % 10 and not self._after_event:
            return
        names = self.detector.layers if self.detector is not None else []
        if len(names) <= 64:
            for name, val in zip(names, rec["layer_norms"], strict=False):
                if math.isfinite(val):
                    tb.add_scalar(f"layer_grad_norm/{name}", val, s)
            for name, val in zip(names, rec["update_ratio"] or [], strict=False):
                if val is not None and math.isfinite(val):
                    tb.add_scalar(f"update_ratio/{name}", val, s)
        finite = [x for x in rec["layer_norms"] if math.isfinite(x) and x > 0]
        if finite:
            tb.add_histogram("layer_grad_norm_log10", torch.tensor(finite).log10(), s)

    # ----- reading and closing --------------------------------------------------------------------
    def drain(self) -> None:
        """Process every step still on its way to the host (waits for their copies)."""
        while self._pending:
            self._process(self._pending.popleft())

    def flush(self) -> None:
        self.drain()
        self.writer.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self, counters: dict[str, int] | None = None) -> None:
        if self._closed:
            return
        if not self._started:  # no step was taken: nothing to record
            self.writer.close()
            if self._hook is not None:
                self._hook.remove()
            self._closed = True
            return
        self.drain()
        # The last steps are always kept: the report shows how the run ended.
        for r in list(self._recent)[len(self._recent) - self.context :]:
            self._write_step(r)
        self.writer.write(
            {
                "type": "end",
                "step": self._steps_seen,
                "counters": counters or {},
                "events": dict(self._event_counts),
            }
        )
        self.writer.close()
        if self._tb is not None:
            self._tb.close()
        if self._hook is not None:
            self._hook.remove()
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def event_counts(self) -> dict[str, int]:
        self.drain()
        return dict(self._event_counts) if self._event_counts else event_counts(self.events)


def _version() -> str:
    from .. import __version__

    return __version__


def _tensorboard_without_tensorflow() -> None:
    """Have TensorBoard's writer use its own TF stub even where TensorFlow is installed.

    ``torch.utils.tensorboard`` resolves TensorBoard's TF-like API on import, and that imports all
    of TensorFlow when it is installed (about 5 s and a page of logs per process, for event files
    the stub writes identically). TensorBoard's documented switch is the presence of the module
    ``tensorboard.compat.notf``. Left alone where TensorFlow is already loaded (a Keras run)."""
    if "tensorflow" in sys.modules or "tensorboard.compat.notf" in sys.modules:
        return
    sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")
