"""What every diagnosis rule shares: the :class:`Finding` it returns, the severities, and the
helpers that read a run's telemetry while tolerating any optional field being absent or null."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..records import RunLog


@dataclass
class Finding:
    """One likely cause. ``cause`` is a stable id (``lr_too_high``, ``init_depth``,
    ``missing_normalization``, ``outlier_batch``, ``fp16_overflow``, ``recurrent_explosion``);
    ``summary`` is one plain sentence; ``evidence`` the numbers behind it; ``advice`` what to try."""

    cause: str
    title: str
    summary: str
    evidence: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    severity: str = "medium"  # "high" | "medium" | "info"
    step: int | None = None
    layers: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SEVERITIES = ("high", "medium", "info")

#: Events that mean the run got into trouble (``vanishing`` and ``amp_overflow`` are not: the
#: first is the opposite problem, the second is fp16 loss scaling's routine back-off).
TROUBLE_KINDS = ("nonfinite_grad", "nonfinite_loss", "grad_spike", "layer_spike", "loss_spike")


#: A rule: the run's telemetry in, a finding (or None: the rule stays quiet) out.
Rule = Callable[[RunLog], "Finding | None"]

# ----- helpers ----------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, Inf, or not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _step(rec: Mapping[str, Any]) -> int | None:
    s = rec.get("step")
    return s if isinstance(s, int) and not isinstance(s, bool) else None


def _list(x: Any) -> list:
    return x if isinstance(x, list) else []


def _names(run: RunLog) -> list[str]:
    return [str(n) for n in _list(run.meta.get("layers"))]


def _forward_order(run: RunLog) -> list[int]:
    """Layer indices input side first (the meta's forward order, then the rest by index)."""
    n = len(_names(run))
    order = [i for i in _list(run.meta.get("forward_order")) if isinstance(i, int) and 0 <= i < n]
    order = list(dict.fromkeys(order))
    return order + [i for i in range(n) if i not in set(order)]


def _layer(run: RunLog, i: int) -> str:
    names = _names(run)
    return names[i] if 0 <= i < len(names) else f"layer[{i}]"


def _g(x: float) -> str:
    return f"{x:.3g}"


def _trouble(run: RunLog) -> list[dict[str, Any]]:
    """Spike and non-finite events, by step."""
    out = [e for e in run.events if e.get("kind") in TROUBLE_KINDS and _step(e) is not None]
    return sorted(out, key=lambda e: e["step"])


def _trouble_text(trouble: list[dict[str, Any]]) -> str:
    """The evidence line for a run's trouble events (:func:`_trouble`, not empty)."""
    return f"{len(trouble)} spike/non-finite event(s), the first at step {trouble[0]['step']}"


def _first_trouble(run: RunLog) -> int | None:
    """The first step with a spike or non-finite event (or, without AMP, a non-finite step)."""
    steps = [e["step"] for e in _trouble(run)]
    if not run.meta.get("amp"):  # with fp16 scaling a non-finite gradient is routine
        for s in run.steps:
            loss = s.get("loss")
            bad_loss = isinstance(loss, float) and not math.isfinite(loss)
            if _step(s) is not None and (_list(s.get("nonfinite_layers")) or bad_loss):
                steps.append(s["step"])
                break
    return min(steps) if steps else None


#: A "lone" non-finite step: at most this many steps with a NaN/Inf, and no spike anywhere ...
LONE_MAX_STEPS = 2
#: ... each followed by at least this many recorded steps with a finite loss and gradient.
LONE_RECOVERY = 5

NONFINITE_KINDS = ("nonfinite_grad", "nonfinite_loss")
GRAD_SPIKE_KINDS = ("grad_spike", "layer_spike")


def _finite_step(s: Mapping[str, Any]) -> bool:
    """A step record with a finite loss (or none) and a finite gradient norm (or none)."""
    loss, norm = s.get("loss"), s.get("grad_norm")
    bad = any(isinstance(v, float) and not math.isfinite(v) for v in (loss, norm))
    return not bad and not _list(s.get("nonfinite_layers"))


def _few_trouble_steps(run: RunLog, kinds: tuple[str, ...]) -> list[int]:
    """The steps of the run's trouble events when every one is of ``kinds`` and they fall on at
    most ``LONE_MAX_STEPS`` steps, ascending; else []."""
    trouble = _trouble(run)
    if not trouble or any(e["kind"] not in kinds for e in trouble):
        return []
    steps = sorted({e["step"] for e in trouble})
    return steps if len(steps) <= LONE_MAX_STEPS else []


def _lone_nonfinite(run: RunLog) -> list[int]:
    """The steps of an isolated non-finite episode, or []: the run's trouble is a NaN/Inf on at
    most ``LONE_MAX_STEPS`` steps, each followed by ``LONE_RECOVERY`` finite steps, and besides
    it at most ``LONE_MAX_STEPS`` gradient spikes on other steps (no loss spike): one bad batch
    is not a trend, and says nothing about the learning rate; a stray gradient spike elsewhere,
    which a healthy run has too (a GPT at AdamW 1e-3 had one 40 steps after its bad batch), does
    not make it one."""
    if run.meta.get("amp"):  # with fp16 loss scaling a non-finite gradient is routine
        return []
    trouble = _trouble(run)
    bad = sorted({e["step"] for e in trouble if e["kind"] in NONFINITE_KINDS})
    spikes = {e["step"] for e in trouble if e["kind"] in GRAD_SPIKE_KINDS} - set(bad)
    others = [e for e in trouble if e["kind"] not in NONFINITE_KINDS + GRAD_SPIKE_KINDS]
    if not bad or len(bad) > LONE_MAX_STEPS or len(spikes) > LONE_MAX_STEPS or others:
        return []
    steps = [s for s in run.steps if _step(s) is not None]
    if any(not _finite_step(s) and s["step"] not in bad for s in steps):
        return []
    for b in bad:
        after = [s for s in steps if s["step"] > b and s["step"] not in bad]
        if len(after) < LONE_RECOVERY or not all(_finite_step(s) for s in after[:LONE_RECOVERY]):
            return []
    return bad


def _lone_spikes(run: RunLog) -> list[int]:
    """The steps of a run's only trouble when it is a gradient spike (of the global norm or a
    layer's) on at most ``LONE_MAX_STEPS`` steps, the loss did not spike and nothing went
    non-finite, or []. On its own that is no trend: a rule may count it as trouble only with
    other evidence (the loss degrading after it)."""
    spikes = _few_trouble_steps(run, GRAD_SPIKE_KINDS)
    steps = [s for s in run.steps if _step(s) is not None]
    if not spikes or (not run.meta.get("amp") and not all(_finite_step(s) for s in steps)):
        return []
    return spikes


_WEIGHT_TYPES = re.compile(r"Linear|Conv|Bilinear")


def _weight_layers(run: RunLog) -> list[int]:
    """Layers with a weight matrix (Linear/Conv), input side first. Without layer types: all."""
    types = _list(run.meta.get("layer_types"))
    n = len(_names(run))
    order = _forward_order(run)
    if len(types) != n:
        return order
    return [
        i
        for i in order
        if isinstance(types[i], str) and _WEIGHT_TYPES.search(types[i]) and "Norm" not in types[i]
    ]


def _robust(values: list[float], floor: float) -> tuple[float, float]:
    """Median and MAD-based standard deviation (at least ``floor``)."""
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values) * 1.4826
    return med, max(mad, floor)
