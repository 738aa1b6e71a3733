"""Telemetry on the host: a step's vector, once it has landed, read back into a ``step`` record.

The counterpart of :class:`~gradguard.diagnose.telemetry.collect.StepVector`: the parts are read
in the order it wrote them, as its ``fields`` say. A pending step is anything with ``fields`` and
``values()`` (the Keras callback hands over numbers already on the host).
"""

from __future__ import annotations

import math
from typing import Any, Protocol


class PendingStep(Protocol):
    fields: dict[str, Any]

    def values(self) -> list[float]: ...


class _Reader:
    """Reads a vector's values in order."""

    def __init__(self, values: list[float]):
        self.values = values
        self.pos = 0

    def take(self, n: int) -> list[float]:
        out = self.values[self.pos : self.pos + n]
        self.pos += n
        return out


def step_record(pending: PendingStep) -> dict[str, Any]:
    """The ``step`` record of one pending step (see ``records.py`` for its fields)."""
    f = pending.fields
    v = _Reader(pending.values())
    norm, norm_after = v.take(2)
    loss = v.take(1)[0] if f.get("loss_in_vector") else f.get("loss")
    lr = v.take(1)[0] if f.get("lr_in_vector") else f.get("lr")
    acted = list(f["host_acted"])
    for name, flag in zip(f["acted_names"], v.take(len(f["acted_names"])), strict=True):
        if flag:
            acted.append(name)
    L = f["n_layers"]
    layer_norms = v.take(L) if L else []
    layer_after = v.take(L) if f.get("has_after") else None
    update_ratio = weight_norms = None
    if f.get("has_update"):
        d, w = v.take(L), v.take(L)
        update_ratio = [di / wi if wi > 0 else None for di, wi in zip(d, w, strict=True)]
        weight_norms = w
    inp = None
    if f.get("has_input"):
        mean, std, absmax = v.take(3)
        inp = {"mean": mean, "std": std, "absmax": absmax, "batch": f.get("input_batch")}
    dead_units = None
    if "dead_rows" in f:
        dead = v.take(L)
        dead_units = [d / r if r else None for d, r in zip(dead, f["dead_rows"], strict=True)]
    logits = None
    if f.get("logits_n"):
        stats = v.take(f["logits_n"])
        logits = {
            "absmax": stats[0],
            "logz": stats[1] if len(stats) > 1 else None,
            "mean": stats[2] if len(stats) > 2 else None,
        }
    attn_names = f.get("attn_names") or []
    attn_logit = dict(zip(attn_names, v.take(len(attn_names)), strict=True)) or None
    metrics = dict(f["metrics"])
    metrics.update(zip(f["metric_names"], v.take(len(f["metric_names"])), strict=True))
    return {
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
        "logits": logits,
        "dead_units": dead_units,
        "attn_logit": attn_logit,
        "amp_scale": f.get("amp_scale"),
        "radius": f.get("radius"),
        "metrics": metrics,
        "rerun": f.get("rerun"),
    }
