"""The telemetry file format: ``RUN_DIR/telemetry.jsonl``, one JSON object per line.

It is what a Guard with ``log_dir`` writes, what ``gradguard train`` writes, and what
``gradguard report`` and the diagnosis rules read. Lines are appended and flushed in whole lines, so
a run killed mid-write leaves at most one partial last line, which the reader drops.

Record types (key ``"type"``), version 1:

``meta`` (first line)
    ``version``, ``created`` (ISO time), ``gradguard``, ``torch``, ``policy`` (the Guard's spec),
    ``layers`` (layer names; every per-layer list below follows this order), ``layer_types`` (module
    class names), ``layer_params`` (parameter count per layer), ``forward_order`` (layer indices in
    the order their forward ran, input side first; empty if unknown), ``normalization`` (the model
    has a BatchNorm/LayerNorm/GroupNorm/RMSNorm-like layer), ``recurrent`` (names of recurrent
    layers), ``attention`` (names of the attention modules whose logits ``attn_logit`` records, as
    :func:`gradguard.attention.find_attention` finds them; empty when none, absent in older
    files), ``amp`` (an fp16 GradScaler is in use), ``sampling`` (how steps are kept, see below).

``step``
    ``step``; ``loss`` (float or null); ``lr`` (the first param group's LR as applied, after any
    backoff); ``grad_norm`` (global L2 norm before mitigation) and ``grad_norm_after`` (what the
    optimizer received; 0 when skipped); ``clipped``, ``skipped``, ``skip_reason``, ``rolled_back``,
    ``actions`` (policies that acted); ``layer_norms`` (per-layer gradient norm before mitigation)
    and ``layer_norms_after`` (after; null when nothing changed the gradient); ``weight_norms`` and
    ``update_ratio`` (per-layer ``||w_after - w_before|| / ||w_before||``; null on steps where they
    were not sampled); ``nonfinite_layers`` (indices of layers with a NaN/Inf gradient; empty when
    finite); ``input`` (``mean``, ``std``, ``absmax`` of the batch fed to the model and ``batch``, its
    leading dimension, absent in older files; or null); ``logits`` (the model's output on the
    last forward with gradients enabled before the step: a floating tensor, the first floating
    tensor of a tuple or list, or a Hugging Face-style output's ``logits``; ``absmax``, its
    largest ``|x|``, ``logz``, the mean over its rows of ``logsumexp`` over the last dimension, and
    ``mean``, the mean logit (their common mode; absent in older files), the two null when that
    dimension has fewer than 2 entries (a regression output); all float32. What the z-loss
    penalizes (``logz**2``) and the output-logit divergence it prevents: Wortsman et al. 2023,
    "Small-scale proxies for large-scale Transformer training instabilities". Null when the
    output held no floating tensor); ``attn_logit`` (``{attention module: its largest
    pre-softmax logit q.k * scale over the heads, the batch and the positions its mask allows}``,
    measured in the forwards before the steps where ``update_ratio`` is sampled; null on other
    steps and for a model without attention); ``dead_units`` (per layer, on the steps where
    ``update_ratio`` is sampled: the share of the layer's units whose gradient was exactly zero
    on every step the optimizer took of the ``sampling.dead_window`` steps up to that one (older
    files: on that step's batch alone), units being the rows (dim 0) of its parameters of 2 or more
    dimensions, the gradients as the optimizer received them; null for a layer without such a
    parameter and for an embedding, whose rows are tokens; the whole field null on other steps;
    a ReLU unit dead for the whole batch has an all-zero row in the gradient of the layer that
    feeds it). The three are absent in older files and in Keras runs.
    ``amp_scale`` (the GradScaler's scale, or null); ``radius`` (``{layer: spectral radius of its
    recurrent weights}`` on sampled steps, measured before the step's update: the recurrence its
    gradient went through; or null); ``rerun`` (the rerun attribution of a failing
    step given a replay: ``result`` ``transient``/``reproducible``, ``trigger``
    ``nonfinite``/``spike``, the rerun's ``grad_norm`` and ``loss``, ``origin`` when it found one;
    null, or absent in files written before it existed, when the step was not rerun).

``event``
    ``step``, ``kind`` (``nonfinite_grad``, ``nonfinite_loss``, ``grad_spike``, ``layer_spike``,
    ``loss_spike``, ``vanishing``, ``amp_overflow``), ``layers`` (the layers involved, most
    implicated first), ``action`` (what the Guard did: ``skipped``, ``rolled_back``, ``clipped`` or
    ``none``), ``detail`` (kind-specific numbers: z-scores, shares of the global norm, values).

``localization``
    ``step``, ``origin`` (the module where it starts), ``phase`` (``forward``: an activation went
    non-finite; ``backward``: a gradient did; ``gradient``: only parameter gradients were seen),
    ``path`` (modules in the order the fault spread), ``method`` (``replay`` or ``static``),
    ``detail``.

``end``
    ``step`` (steps seen), ``counters`` (the Guard's counters), ``events`` (count per kind).

Non-finite floats are written as JSON's ``NaN`` / ``Infinity`` extensions (Python's ``json``
reads them back).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .schema import SCHEMAS, repair

FILENAME = "telemetry.jsonl"
VERSION = 1
RECORD_TYPES = ("meta", "step", "event", "localization", "end")
EVENT_KINDS = (
    "nonfinite_grad",
    "nonfinite_loss",
    "grad_spike",
    "layer_spike",
    "loss_spike",
    "vanishing",
    "amp_overflow",
)


def run_file(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / FILENAME


def dumps(record: Mapping[str, Any]) -> str:
    """One record as one line (no newline inside: JSON escapes them)."""
    return json.dumps(record, separators=(",", ":"), allow_nan=True)


class RecordWriter:
    """Appends records to ``telemetry.jsonl``; lines are buffered and written whole on ``flush``."""

    def __init__(self, run_dir: str | os.PathLike, *, buffer_lines: int = 256):
        self.dir = Path(run_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"log_dir {self.dir} exists and is not a folder; give a folder path")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the log folder {self.dir}: {e}") from None
        self.path = self.dir / FILENAME
        self._buffer: list[str] = []
        self._limit = buffer_lines
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: Mapping[str, Any], *, flush: bool = False) -> None:
        self._buffer.append(dumps(record))
        if flush or len(self._buffer) >= self._limit:
            self.flush()

    def flush(self) -> None:
        if self._buffer and not self._file.closed:
            self._file.write("\n".join(self._buffer) + "\n")
            self._file.flush()
            self._buffer.clear()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed


@dataclass
class RunLog:
    """A telemetry file read back: the meta record, and the other records by type, in order."""

    path: Path
    meta: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    localizations: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    dropped_lines: int = 0  # a partial last line (a run killed mid-write), or unreadable lines
    #: Values of the wrong kind the reader replaced (``schema.repair``), by ``type.field``.
    repaired: dict[str, int] = field(default_factory=dict)

    @property
    def notes(self) -> list[str]:
        """What the reader skipped, in words, for the report."""
        out = []
        if self.dropped_lines:
            out.append(
                f"{self.dropped_lines} unreadable line(s) skipped (a run killed mid-write leaves "
                "a partial last line; a record without a step cannot be placed)"
            )
        if self.repaired:
            worst = sorted(self.repaired.items(), key=lambda kv: (-kv[1], kv[0]))
            shown = ", ".join(f"{k} x{n}" for k, n in worst[:6])
            more = f" and {len(worst) - 6} more fields" if len(worst) > 6 else ""
            out.append(
                f"{sum(self.repaired.values())} value(s) of the wrong type or out of range read "
                f"as not recorded ({shown}{more})"
            )
        return out

    @property
    def layers(self) -> list[str]:
        return list(self.meta.get("layers") or [])

    @property
    def forward_order(self) -> list[int]:
        """Layer indices input side first (the meta's ``forward_order``, else the layer order)."""
        order = list(self.meta.get("forward_order") or [])
        n = len(self.layers)
        return order + [i for i in range(n) if i not in set(order)]

    def steps_between(self, first: int, last: int) -> list[dict[str, Any]]:
        return [s for s in self.steps if first <= s["step"] <= last]

    def step_at(self, step: int) -> dict[str, Any] | None:
        for s in self.steps:
            if s["step"] == step:
                return s
        return None


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        yield from f


def load_run(run_dir: str | os.PathLike) -> RunLog:
    """Read ``RUN_DIR/telemetry.jsonl`` (or the file itself if a file is given)."""
    p = Path(run_dir)
    path = p if p.is_file() else run_file(p)
    if not path.exists():
        raise ConfigError(
            f"no telemetry in {p}: expected {path.name} there; create it with "
            "Guard(..., log_dir=DIR) or `gradguard train --out DIR`"
        )
    meta: dict[str, Any] | None = None
    log = RunLog(path=path, meta={})
    by_type = {"step": log.steps, "event": log.events, "localization": log.localizations}
    for line in _lines(path):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.dropped_lines += 1
            continue
        if not isinstance(rec, dict):
            log.dropped_lines += 1
            continue
        kind = rec.get("type")
        if isinstance(kind, str) and kind in SCHEMAS:
            fixed_rec, fixed = repair(kind, rec)
            for key in fixed:
                name = f"{kind}.{key}"
                log.repaired[name] = log.repaired.get(name, 0) + 1
            if fixed_rec is None:
                log.dropped_lines += 1
                continue
        if kind == "meta":
            if meta is None:  # a resumed run appends a second meta; the first one names the run
                meta = rec
        elif kind in by_type:
            by_type[kind].append(rec)
        elif kind == "end":
            log.end = rec
        else:
            log.dropped_lines += 1
    if meta is None:
        raise ConfigError(f"{path} has no meta record: it is not a gradguard telemetry file")
    if meta.get("version", 0) > VERSION:
        raise ConfigError(
            f"{path} was written by a newer gradguard (format {meta.get('version')}); upgrade gradguard to read it"
        )
    log.meta = meta
    log.steps.sort(key=lambda r: r["step"])
    return log


def event_counts(events: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        out[e["kind"]] = out.get(e["kind"], 0) + 1
    return out
