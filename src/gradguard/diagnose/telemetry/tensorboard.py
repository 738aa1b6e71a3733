"""Telemetry's TensorBoard writer (``RUN_DIR/tb``): the kept steps' scalars, per-layer series and
histograms, and the events as text. The JSONL writer is :class:`~gradguard.diagnose.records.RecordWriter`."""

from __future__ import annotations

import math
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch


def open_tensorboard(log_dir: Path, *, required: bool, stacklevel: int = 2) -> Any | None:
    """A ``SummaryWriter`` on ``log_dir``, or None (with a warning) when tensorboard is not
    installed; ``required`` raises the ImportError instead."""
    try:
        _tensorboard_without_tensorflow()
        from torch.utils.tensorboard import SummaryWriter

        # A deep queue: add_scalar never blocks on the writer thread (flushed on events and close).
        return SummaryWriter(str(log_dir), max_queue=100_000, flush_secs=60)
    except ImportError:
        if required:
            raise
        warnings.warn(
            "tensorboard is not installed: telemetry goes to telemetry.jsonl only "
            "(pip install tensorboard for TensorBoard files)",
            stacklevel=stacklevel + 1,
        )
        return None


def tb_step(tb: Any, rec: dict[str, Any], layers: list[str], clip_rate: float, dense: bool) -> None:
    """One kept step: its scalars; the output logits, the attention logits, per-layer series
    (gradient norms, update ratios, dead units) and the norms' histogram only every 10th step and
    around events (``dense``). The step's scalars go out as one event holding them all (one
    ``Summary`` of several values, which TensorBoard's reader takes value by value under each tag:
    tested with its ``EventAccumulator``): ``add_scalar`` builds an event per value, ~40 us each,
    more than the rest of the record."""
    s = rec["step"]
    scalars: list[tuple[str, float | None]] = [
        ("grad_norm/pre_clip", rec["grad_norm"]),
        ("grad_norm/post_clip", rec["grad_norm_after"]),
        ("loss", rec["loss"]),
        ("lr", rec["lr"]),
        ("clip_rate/last_100", clip_rate),
    ]
    # Per-layer series every 10th kept step (and around events): a tag per layer per step would
    # cost more than the step itself.
    dense_step = not s % 10 or dense
    if dense_step:
        logits = rec.get("logits") or {}
        scalars += [(f"logits/{k}", logits.get(k)) for k in ("absmax", "logz", "mean")]
        scalars += [(f"attn_logit/{n}", v) for n, v in (rec.get("attn_logit") or {}).items()]
        if len(layers) <= 64:
            for prefix, values in (
                ("layer_grad_norm", rec["layer_norms"]),
                ("update_ratio", rec.get("update_ratio") or []),
                ("dead_units", rec.get("dead_units") or []),
            ):
                names = (f"{prefix}/{n}" for n in layers)
                scalars += list(zip(names, values, strict=False))  # values: None where not sampled
    _add_scalars(tb, [(t, float(v)) for t, v in scalars if v is not None and math.isfinite(v)], s)
    if not dense_step:
        return
    finite = [x for x in rec["layer_norms"] if math.isfinite(x) and x > 0]
    if finite:
        tb.add_histogram("layer_grad_norm_log10", torch.tensor(finite).log10(), s)


def _add_scalars(tb: Any, scalars: list[tuple[str, float]], step: int) -> None:
    """``(tag, value)`` pairs as one TensorBoard event at ``step``: the values ``add_scalar``
    would write one event each, in one ``Summary`` (through the ``SummaryWriter``'s file writer,
    which ``add_scalar`` itself calls)."""
    if not scalars:
        return
    from tensorboard.compat.proto.summary_pb2 import Summary  # type: ignore[import-untyped]

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=val) for tag, val in scalars])
    tb._get_file_writer().add_summary(summary, step)


def tb_event(tb: Any, e: dict[str, Any]) -> None:
    tb.add_text(
        "events",
        f"step {e['step']}: {e['kind']} {', '.join(e['layers'][:5])} ({e['action']})",
        e["step"],
    )


def _tensorboard_without_tensorflow() -> None:
    """Have TensorBoard's writer use its own TF stub even where TensorFlow is installed.

    ``torch.utils.tensorboard`` resolves TensorBoard's TF-like API on import, and that imports all
    of TensorFlow when it is installed (about 5 s and a page of logs per process, for event files
    the stub writes identically). TensorBoard's documented switch is the presence of the module
    ``tensorboard.compat.notf``. Left alone where TensorFlow is already loaded (a Keras run)."""
    if "tensorflow" in sys.modules or "tensorboard.compat.notf" in sys.modules:
        return
    sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")
