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
    around events (``dense``)."""
    s = rec["step"]
    for tag, val in (
        ("grad_norm/pre_clip", rec["grad_norm"]),
        ("grad_norm/post_clip", rec["grad_norm_after"]),
        ("loss", rec["loss"]),
        ("lr", rec["lr"]),
        ("clip_rate/last_100", clip_rate),
    ):
        if val is not None and math.isfinite(val):
            tb.add_scalar(tag, val, s)
    # Per-layer series every 10th kept step (and around events): TensorBoard's writer costs
    # ~0.2 ms per scalar, so a tag per layer per step would cost more than the step itself.
    if s % 10 and not dense:
        return
    logits = rec.get("logits") or {}
    for tag, val in (
        ("logits/absmax", logits.get("absmax")),
        ("logits/logz", logits.get("logz")),
        ("logits/mean", logits.get("mean")),
    ):
        if val is not None and math.isfinite(val):
            tb.add_scalar(tag, val, s)
    for name, val in (rec.get("attn_logit") or {}).items():
        if val is not None and math.isfinite(val):
            tb.add_scalar(f"attn_logit/{name}", val, s)
    if len(layers) <= 64:
        for name, val in zip(layers, rec["layer_norms"], strict=False):
            if math.isfinite(val):
                tb.add_scalar(f"layer_grad_norm/{name}", val, s)
        for prefix in ("update_ratio", "dead_units"):
            for name, val in zip(layers, rec.get(prefix) or [], strict=False):
                if val is not None and math.isfinite(val):
                    tb.add_scalar(f"{prefix}/{name}", val, s)
    finite = [x for x in rec["layer_norms"] if math.isfinite(x) and x > 0]
    if finite:
        tb.add_histogram("layer_grad_norm_log10", torch.tensor(finite).log10(), s)


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
