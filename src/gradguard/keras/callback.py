"""``GuardTelemetry``: a Keras callback that writes a :class:`GuardedOptimizer`'s steps in the
Guard's telemetry format (``RUN_DIR/telemetry.jsonl``, :mod:`gradguard.diagnose.records`), so that
``gradguard report RUN_DIR`` renders a Keras run as it renders a torch one.

    model.fit(x, y, callbacks=[GuardTelemetry("runs/keras")])
    # gradguard report runs/keras

A thin adapter: after each batch it reads the step's numbers the optimizer kept in its ``last_*``
variables (per-variable norms before and after the policies, the decision, the LR), sums them per
layer, and hands them to the torch :class:`~gradguard.diagnose.Telemetry`'s host half, which
detects the events, locates where a NaN started, keeps the context around events and writes the
records. In a custom training loop call :meth:`GuardTelemetry.record` after each
``optimizer.apply`` and :meth:`GuardTelemetry.close` at the end.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from typing import Any

import keras
import numpy as np

from ..diagnose.events import EventDetector
from ..diagnose.localize import localize_static
from ..diagnose.records import VERSION
from ..diagnose.telemetry import Telemetry
from ..errors import ConfigError
from .optimizer import GuardedOptimizer, _np


class _HostStep:
    """One step's numbers, already on the host (what ``Telemetry`` expects of a pending step)."""

    __slots__ = ("_values", "fields")

    def __init__(self, values: list[float], fields: dict[str, Any]):
        self._values = values
        self.fields = fields

    def ready(self) -> bool:
        return True

    def values(self) -> list[float]:
        return self._values


class GuardTelemetry(keras.callbacks.Callback):
    """Record a :class:`GuardedOptimizer`'s telemetry to ``log_dir`` for ``gradguard report``.

    Args:
        log_dir: the run folder (created if missing; appended to if it exists).
        optimizer: the GuardedOptimizer; default: the model's optimizer (``model.fit``). Give it
            in a custom training loop.
        every, context, update_every: as for :class:`gradguard.diagnose.Telemetry` (which steps
            are kept, how many around each event, how often the update/weight ratio is sampled).
        tensorboard: also write TensorBoard files in ``log_dir/tb`` (off: Keras has its own
            ``keras.callbacks.TensorBoard``).
        detector: an :class:`~gradguard.diagnose.EventDetector` with non-default settings.

    The loss recorded for a step is that batch's loss, recovered from the model's running loss
    mean (``model.fit`` only); after a non-finite batch the running mean stays non-finite for the
    rest of the epoch, and those batches' losses are recorded as unknown (null).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        optimizer: GuardedOptimizer | None = None,
        *,
        every: int | str = "auto",
        context: int = 32,
        update_every: int = 10,
        tensorboard: bool = False,
        detector: EventDetector | None = None,
    ):
        super().__init__()
        if optimizer is not None and not isinstance(optimizer, GuardedOptimizer):
            raise ConfigError(
                f"GuardTelemetry records a GuardedOptimizer, got {type(optimizer).__name__}"
            )
        try:
            self.telemetry = Telemetry(
                log_dir,
                every=every,
                context=context,
                update_every=update_every,
                tensorboard=tensorboard,
                watch_inputs=False,
                detector=detector,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.log_dir = self.telemetry.dir
        self._optimizer = optimizer
        self._last_step = -1
        self._loss_prev = (0.0, 0.0)  # the running loss mean's (total, count) after the last batch
        self._before: list[np.ndarray] | None = None
        self._meta: dict[str, Any] | None = None

    # ----- Keras hooks ----------------------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        opt = self._find_optimizer()
        if self.telemetry.closed:  # a second fit() on the same callback: append to the run
            self.telemetry = Telemetry(
                self.log_dir,
                every=self.telemetry.every,
                context=self.telemetry.context,
                update_every=self.telemetry.update_every,
                tensorboard=self.telemetry._want_tb,
                watch_inputs=False,
            )
            self._meta = None
        if opt.built:
            self._sample_weights(opt, self._last_step + 1)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._loss_prev = (0.0, 0.0)  # fit() resets its running metrics at each epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.record(loss=self._batch_loss())

    def on_train_end(self, logs: dict | None = None) -> None:
        self.close()

    # ----- recording --------------------------------------------------------------------------------
    def record(self, loss: float | None = None) -> None:
        """Record the optimizer's last step (once; a call without a new step does nothing).
        ``loss``: the step's loss, if known."""
        opt = self._find_optimizer()
        info = opt.last_step()
        if info is None or info["step"] == self._last_step:
            return
        self._last_step = step = info["step"]
        t = self.telemetry
        layout = opt.layout
        assert layout is not None
        if self._meta is None:
            self._start(opt)
            assert self._meta is not None  # _start sets it
        n_layers = len(layout.layer_names)
        layer_norms = _per_layer(info["var_norms"], layout.layer_of, n_layers)
        stepped = not info["skipped"]
        has_after = stepped and any(p.kind == "clip" for p in opt.policies)
        values = [info["grad_norm"], info["grad_norm_after"], *layer_norms]
        if has_after:
            values.extend(_per_layer(info["var_norms_after"], layout.layer_of, n_layers))
        has_update = False
        if self._before is not None:
            if stepped:
                after = _weights(opt)
                d = _per_layer(
                    [_l2(a - b) for a, b in zip(after, self._before, strict=True)],
                    layout.layer_of,
                    n_layers,
                )
                w = _per_layer([_l2(b) for b in self._before], layout.layer_of, n_layers)
                values.extend([*d, *w])
                has_update = True
            self._before = None
        if loss is not None and not isinstance(loss, (int, float)):
            loss = float(_np(loss))
        fields: dict[str, Any] = {
            "step": step,
            "skipped": info["skipped"],
            "skip_reason": info["skip_reason"],
            "rolled_back": False,
            "n_layers": n_layers,
            "loss": loss,
            "lr": info["lr"],
            "acted_names": [],
            "host_acted": list(info["acted"]),
            "clip_kinds": {p.name for p in opt.policies if p.kind == "clip"},
            "has_after": has_after,
            "has_update": has_update,
            "metric_names": [],
            "metrics": dict(info["metrics"]),
        }
        nonfinite = [i for i, x in enumerate(layer_norms) if not math.isfinite(x)]
        if nonfinite or (loss is not None and not math.isfinite(loss)):
            rec = {"step": step, "nonfinite_layers": nonfinite, "loss": loss}
            fields["localization"] = localize_static(rec, self._meta)
        # The torch Telemetry's host half: events, localization, context and sampling, records.
        t._process(_HostStep([float(v) for v in values], fields))
        self._sample_weights(opt, step + 1)

    def close(self) -> None:
        """Write the end record (with the optimizer's counters) and close the file. Idempotent."""
        if self.telemetry.closed:
            return
        opt = self._optimizer or getattr(self._model_or_none(), "optimizer", None)
        counters = opt.counters if isinstance(opt, GuardedOptimizer) else {}
        self.telemetry.close(counters)

    def __enter__(self) -> GuardTelemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- helpers ----------------------------------------------------------------------------------
    def _model_or_none(self) -> Any:
        try:
            return self.model
        except AttributeError:
            return None

    def _find_optimizer(self) -> GuardedOptimizer:
        opt = self._optimizer
        if opt is None:
            model = self._model_or_none()
            opt = getattr(model, "optimizer", None)
            # mixed_float16 wraps the GuardedOptimizer in a LossScaleOptimizer.
            opt = (
                getattr(opt, "inner_optimizer", opt)
                if not isinstance(opt, GuardedOptimizer)
                else opt
            )
            if not isinstance(opt, GuardedOptimizer):
                raise ConfigError(
                    "GuardTelemetry needs a GuardedOptimizer: compile the model with "
                    "optimizer=GuardedOptimizer(...), or pass optimizer= in a custom loop"
                )
            self._optimizer = opt
        return opt

    def _batch_loss(self) -> float | None:
        """This batch's loss from the running mean's total and count (weighted by batch size)."""
        tracker = getattr(self._model_or_none(), "_loss_tracker", None)
        if tracker is None or not hasattr(tracker, "total") or not hasattr(tracker, "count"):
            return None
        total = float(_np(tracker.total))
        count = float(_np(tracker.count))
        prev_total, prev_count = self._loss_prev
        if count < prev_count:  # reset since the last batch
            prev_total, prev_count = 0.0, 0.0
        self._loss_prev = (total, count)
        if count <= prev_count:
            return None
        if not math.isfinite(prev_total):
            return None  # an earlier batch of this epoch was non-finite: this one is unknown
        return (total - prev_total) / (count - prev_count)

    def _sample_weights(self, opt: GuardedOptimizer, next_step: int) -> None:
        """Keep the weights before a step whose update/weight ratio is sampled."""
        if self.telemetry.samples(next_step):
            self._before = _weights(opt)

    def _start(self, opt: GuardedOptimizer) -> None:
        layout = opt.layout
        assert layout is not None
        model = self._model_or_none()
        owners = _layer_owners(model, opt)
        types = []
        for li in range(len(layout.layer_names)):
            first = next(i for i, lo in enumerate(layout.layer_of) if lo == li)
            types.append(owners.get(first, "Variable"))
        counts = [0] * len(layout.layer_names)
        for size, li in zip(layout.sizes, layout.layer_of, strict=True):
            counts[li] += size
        # Sequential and functional models list their variables in layer order, which is the
        # forward order; a subclassed model's order is its creation order: unknown.
        ordered = type(model).__name__ in ("Sequential", "Functional")
        forward_order = list(range(len(layout.layer_names))) if ordered else []
        from .._version import __version__

        self._meta = meta = {
            "type": "meta",
            "version": VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "gradguard": __version__,
            "torch": _torch_version(),
            "framework": "keras",
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
            "policy": opt.spec,
            "layers": list(layout.layer_names),
            "layer_types": types,
            "layer_params": counts,
            "forward_order": forward_order,
            "normalization": any("Normalization" in t for t in types),
            "recurrent": [
                n for n, t in zip(layout.layer_names, types, strict=True) if _is_recurrent(t)
            ],
            "amp": False,
            "sampling": {
                "every": self.telemetry.every,
                "context": self.telemetry.context,
                "update_every": self.telemetry.update_every,
            },
        }
        t = self.telemetry
        t.writer.write(meta, flush=True)
        if t.detector is None:
            t.detector = EventDetector(layout.layer_names, forward_order)
        t._started = True


def _per_layer(values: Any, layer_of: tuple[int, ...], n_layers: int) -> list[float]:
    sq = [0.0] * n_layers
    for v, li in zip(values, layer_of, strict=True):
        sq[li] += float(v) ** 2
    return [math.sqrt(s) for s in sq]


def _l2(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(a, dtype=np.float64))))


def _weights(opt: GuardedOptimizer) -> list[np.ndarray]:
    return [_np(v) for v in opt._trainable_variables]


def _layer_owners(model: Any, opt: GuardedOptimizer) -> dict[int, str]:
    """Layout index -> class name of the innermost layer that owns the variable."""
    if model is None or not hasattr(model, "_flatten_layers"):
        return {}
    index = {id(v): i for i, v in enumerate(opt._trainable_variables)}
    out: dict[int, str] = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for v in getattr(layer, "trainable_variables", []):
            i = index.get(id(v))
            if i is not None:
                out[i] = type(layer).__name__  # visited outer first: the innermost wins
    return out


def _is_recurrent(layer_type: str) -> bool:
    return any(k in layer_type for k in ("RNN", "LSTM", "GRU"))


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    return torch.__version__
