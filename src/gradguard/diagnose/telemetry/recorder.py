"""The :class:`Telemetry` recorder: binds to a Guard, collects each step (``collect``), reads it
back on the host (``host``), detects events, keeps the sampled steps and each event's context
(``sampling``), and writes them to ``telemetry.jsonl`` and TensorBoard (``tensorboard``)."""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..events import EventDetector
from ..records import RecordWriter, event_counts
from .collect import (
    DeadUnitMeter,
    QuietSite,
    StepVector,
    _Pending,
    input_stats,
    meta_record,
    output_stats,
    spectral_radius,
    unit_params,
)
from .host import PendingStep, step_record
from .sampling import ContextWindow
from .tensorboard import open_tensorboard, tb_event, tb_step

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from ...attention import LogitMeter
    from ...guard import Guard
    from ...policies.base import StepContext
    from ...report import StepReport
    from ...stats import GradStats


class Telemetry:
    """Records a Guard's steps to ``log_dir`` (``telemetry.jsonl`` + TensorBoard in ``tb/``).

    Made by ``Guard(..., log_dir=DIR)``; pass ``Guard(..., telemetry=Telemetry(DIR, ...))`` to
    change its settings.

    Args:
        log_dir: the run folder (created if missing; appended to if it exists).
        every: ``"auto"`` (see the module doc) or keep every n-th step.
        context: steps kept exactly before and after each event.
        update_every: sample the update/weight ratio every n steps and on each of the first n
            (it needs a copy of the weights before the step: one clone of the parameters, freed
            after the step), and on the same steps the dead units and the attention modules' max
            logits (measured in the forward before those steps only: one extra ``q @ k^T`` per
            attention call, as ``qk_clip`` measures them).
        dead_window: the dead units of a sample are the share of each layer's units whose
            gradient was all zero on every one of the last ``dead_window`` steps up to it
            (at most ``update_every``; a :class:`DeadUnitMeter` reads those steps' gradients,
            one ``abs().amax`` per matrix): a unit silent on one batch by chance is not dead.
        radius_every: sample recurrent spectral radii every n steps (and on events' steps).
        tensorboard: write TensorBoard event files (``None``: if tensorboard is installed).
        watch_inputs: record mean/std/absmax of the model's first input (a forward pre-hook).
        watch_outputs: record absmax and logz (the mean logsumexp over the last dimension) of
            the model's output logits (a forward hook; one extra pass over the logits).
        detector: the :class:`EventDetector` (default settings if None).
    """

    def __init__(
        self,
        log_dir,
        *,
        every: int | str = "auto",
        context: int = 32,
        update_every: int = 10,
        dead_window: int = 5,
        radius_every: int = 100,
        tensorboard: bool | None = None,
        watch_inputs: bool = True,
        watch_outputs: bool = True,
        detector: EventDetector | None = None,
    ):
        _check_settings(every, context, update_every, radius_every, dead_window)
        self.writer = RecordWriter(log_dir)
        self.dir = self.writer.dir
        self.every = every
        self.context = context
        self.update_every = update_every
        self.dead_window = min(dead_window, update_every)
        self.radius_every = radius_every
        self.watch_inputs = watch_inputs
        self.watch_outputs = watch_outputs
        self._want_tb = tensorboard
        self._tb = None
        self.detector = detector
        self._guard: weakref.ref | None = None
        self._pending: deque[_Pending] = deque()
        self._window = ContextWindow(every, context)
        self._input: Tensor | None = None
        self._input_batch: int | None = None
        self._hooks: list[RemovableHandle] = []
        self._logits: Tensor | None = None
        self._before: list[Tensor] | None = None
        self._dead: DeadUnitMeter | None = None
        self._meter: LogitMeter | None = None
        self._recurrent: list[tuple[int, nn.RNNBase]] = []
        self._radius: dict[str, float] | None = None  # measured before this step's update
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
        units = unit_params(layout, model)
        self._dead = DeadUnitMeter(units) if any(units) else None
        if model is not None:
            by_name = dict(model.named_modules())
            self._recurrent = [
                (i, m)
                for i, name in enumerate(layout.layer_names)
                if isinstance(m := by_name.get("" if name == "(root)" else name), nn.RNNBase)
            ]
            if self.watch_inputs:
                self._hooks.append(model.register_forward_pre_hook(self._on_input))
            if self.watch_outputs:
                self._hooks.append(model.register_forward_hook(self._on_output))
            self._meter = _attention_meter(model, self._measures_next)

    def _start(self, guard: Guard) -> None:
        layout = guard.layout
        if self.detector is None:
            self.detector = EventDetector(layout.layer_names, self._forward_order(guard))
        sampling = {
            "every": self.every,
            "context": self.context,
            "update_every": self.update_every,
            "dead_window": self.dead_window,
        }
        recurrent = [layout.layer_names[i] for i, _ in self._recurrent]
        attention = [s.name for s in self._meter.sites] if self._meter is not None else []
        meta = meta_record(guard, self._forward_order(guard), recurrent, sampling, attention)
        self.writer.write(meta, flush=True)
        if self._want_tb is not False:
            self._tb = open_tensorboard(self.dir / "tb", required=bool(self._want_tb), stacklevel=3)

    @staticmethod
    def _forward_order(guard: Guard) -> list[int]:
        return list(dict.fromkeys(guard.layout.forward_order))

    def _on_input(self, _module: nn.Module, args: tuple) -> None:
        found = input_stats(args)
        if found is not None:
            self._input, self._input_batch = found

    def _on_output(self, _module: nn.Module, _args: tuple, out: Any) -> None:
        # The forward the next step trains on; an evaluation under no_grad does not count.
        if not torch.is_grad_enabled():
            return
        try:
            found = output_stats(out)
        except Exception:  # an output dtype torch cannot reduce: no record, training goes on
            return
        if found is not None:
            self._logits = found

    def _measures_next(self) -> bool:
        """Whether the attention logits of a forward are measured: it feeds the Guard's next step
        (the index its ``_step`` holds until that step is taken), and that step is sampled."""
        guard = self._guard() if self._guard is not None else None
        return guard is not None and not self._closed and self.samples(guard._step)

    # ----- per step (called by the Guard) -----------------------------------------------------------
    def wants_update_ratio(self, step: int) -> bool:
        """Whether :meth:`before_update` is wanted before ``step``'s update: on the sampled steps
        (:meth:`samples`) and where the recurrent radius is due (measured before the update)."""
        return self.samples(step) or self._radius_due(step)

    def samples(self, step: int) -> bool:
        """Whether ``step`` is sampled (update/weight ratio, dead units, attention logits): every
        ``update_every``-th step, and every one of the first ``update_every`` steps: a run that
        blows up in its first steps (too high an LR) is then judged on several samples."""
        return step < self.update_every or step % self.update_every == 0

    def _radius_due(self, step: int) -> bool:
        return bool(self._recurrent) and step % self.radius_every == 0

    def _counts_dead(self, step: int) -> bool:
        """Whether ``step``'s gradients enter the dead units: the ``dead_window`` steps up to and
        including each sampled step."""
        return self.samples(step) or (-step) % self.update_every < self.dead_window

    def before_update(self, stats: GradStats) -> None:
        """Before the optimizer step: keep the weights as they are (sampled steps), and measure
        the recurrent radii (their steps): the radius the step's gradient went through, not one
        its update made (a first update too large for the weights sets any radius)."""
        guard = self._guard() if self._guard is not None else None
        step = guard._step if guard is not None else 0
        if self.samples(step):
            self._before = [p.detach().clone() for p in stats.layout.params]
        if self._radius_due(step):
            self._radius = self._radii(guard)

    def _radii(self, guard: Guard | None) -> dict[str, float]:
        names = guard.layout.layer_names if guard is not None else []
        return {names[i]: spectral_radius(m) for i, m in self._recurrent}

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
        vec = StepVector(ctx, stats, stepped)
        # The report's reason: a sync_free step's is read off its device flags (the telemetry
        # reads the step anyway).
        vec.fields["skip_reason"] = report.skip_reason
        vec.add_loss(ctx)
        vec.add_lr(guard, ctx)
        vec.add_actions(guard, ctx)
        vec.add_layer_norms(stats, stepped)
        if self._before is not None:
            if stepped:
                vec.add_update(stats, self._before)
            self._before = None
        if self._input is not None:
            vec.add_input(self._input, self._input_batch)
            self._input = None
        if self._dead is not None:
            # the gradients the optimizer applied (a skipped step's are not), in the window
            if stepped and self._counts_dead(ctx.step):
                self._dead.observe(stats)
            if self.samples(ctx.step):
                dead = self._dead.read(guard.layout, stats.device)
                if dead is not None:
                    vec.add_dead_units(*dead)
        if self._logits is not None:
            vec.add_logits(self._logits)
            self._logits = None
        if self._meter is not None:
            if self.samples(ctx.step):
                vec.add_attention(self._meter.sites)
            self._meter.reset()
        if guard.scaler is not None:
            vec.fields["amp_scale"] = guard.scaler.get_scale() if ctx.host is not None else None
        if self._recurrent and (ctx.step % self.radius_every == 0 or not stepped):
            # Measured before the update where it was due (a skipped step's weights are as they
            # were before it).
            vec.fields["radius"] = self._radius if self._radius is not None else self._radii(guard)
        self._radius = None
        vec.add_metrics(ctx)
        if localization is not None:
            vec.fields["localization"] = localization
        vec.fields["rerun"] = report.rerun_detail
        self._pending.append(vec.send())
        # Process what has landed; keep at most one step in flight.
        while self._pending and (len(self._pending) > 1 or self._pending[0].ready()):
            self._process(self._pending.popleft())

    # ----- host side ------------------------------------------------------------------------------
    def _process(self, pending: PendingStep) -> None:
        rec = step_record(pending)
        self._steps_seen += 1
        self._clipped_recent.append(rec["clipped"])
        assert self.detector is not None
        events = self.detector.observe(rec)
        localization = pending.fields.get("localization")
        if localization is None and rec["nonfinite_layers"]:
            localization = self._localize(rec)
        self._window.push(rec)
        # A rerun step is kept whole (its attribution is the report's sentence).
        incident = bool(events) or localization is not None or rec["rerun"] is not None
        if incident:
            self._write_incident(rec, events, localization)
        elif self._window.keeps(rec["step"]):
            self._write_step(rec)
        self._window.tick(incident)

    def _localize(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """Where a non-finite gradient starts, from the step alone (no replay)."""
        assert self.detector is not None
        guard = self._guard() if self._guard is not None else None
        meta = {
            "layers": self.detector.layers,
            "forward_order": self._forward_order(guard) if guard is not None else [],
        }
        from ..localize import localize_static

        return localize_static(rec, meta)

    def _write_incident(
        self, rec: dict[str, Any], events: list[dict[str, Any]], localization: dict | None
    ) -> None:
        """An event or a localization: the context before, the step, its events, flushed."""
        for r in self._window.before_current():
            self._write_step(r)
        self._write_step(rec)
        for e in events:
            if localization is not None and e["kind"] in ("nonfinite_grad", "nonfinite_loss"):
                e["detail"]["origin"] = localization.get("origin")
            self._record_event(e)
        if localization is not None:
            self.localizations.append(localization)
            self.writer.write(localization)
        self.writer.flush()
        self._window.event()

    def _write_step(self, rec: dict[str, Any]) -> None:
        if not self._window.claim(rec["step"]):
            return
        self.writer.write(rec)
        if self._tb is not None:
            layers = self.detector.layers if self.detector is not None else []
            clip_rate = sum(self._clipped_recent) / max(len(self._clipped_recent), 1)
            tb_step(self._tb, rec, layers, clip_rate, dense=self._window.after_event > 0)

    def _record_event(self, e: dict[str, Any]) -> None:
        self._event_counts[e["kind"]] = self._event_counts.get(e["kind"], 0) + 1
        if len(self.events) < 10_000:  # in memory; every event is in the file
            self.events.append(e)
        self.writer.write(e)
        if self._tb is not None:
            tb_event(self._tb, e)

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
            self._release()
            self._closed = True
            return
        self.drain()
        # The last steps are always kept: the report shows how the run ended.
        for r in self._window.last():
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
        self._release()
        self._closed = True

    def _release(self) -> None:
        """Remove the hooks on the model (inputs, outputs, attention)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._meter is not None:
            self._meter.close()
            self._meter = None

    @property
    def closed(self) -> bool:
        return self._closed

    def event_counts(self) -> dict[str, int]:
        self.drain()
        return dict(self._event_counts) if self._event_counts else event_counts(self.events)


def _attention_meter(model: nn.Module, when: Callable[[], bool]) -> LogitMeter | None:
    """A meter of the model's attention logits (:mod:`gradguard.attention`), measuring the
    forwards ``when`` allows; None when the model has no attention it finds, or finding it
    failed: telemetry never breaks training."""
    from ...attention import LogitMeter, find_attention  # torch's function modes: on use

    try:
        sites = [QuietSite.of(s) for s in find_attention(model)]
        return LogitMeter(sites, when=when) if sites else None
    except Exception:
        return None


def _check_settings(
    every: Any, context: Any, update_every: Any, radius_every: Any, dead_window: Any
) -> None:
    if every != "auto" and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise ValueError(f"every must be 'auto' or a positive int, got {every!r}")
    for name, v in (
        ("context", context),
        ("update_every", update_every),
        ("radius_every", radius_every),
        ("dead_window", dead_window),
    ):
        if not isinstance(v, int) or v < (0 if name == "context" else 1):
            raise ValueError(
                f"{name} must be a {'non-negative' if name == 'context' else 'positive'} int, got {v!r}"
            )
