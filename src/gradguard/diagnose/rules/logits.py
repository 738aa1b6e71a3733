"""``output_logits``: the model's output logits grew by orders of magnitude while the run got into
trouble (output-logit divergence).

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities")
name it: without weight decay or a z-loss the output logits drift far from what the softmax needs,
their magnitude (and the log-partition ``log Z``) runs away, and the loss diverges; PaLM's z-loss
(``1e-4 * logsumexp(logits)^2``) keeps ``log Z`` near 0. A learnable logit scale or temperature
left unclamped does the same (CLIP clamps its ``logit_scale`` at 100). The telemetry's ``logits``
holds, every step, the output's largest magnitude (``absmax``) and its mean ``logsumexp``
(``logz``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

from ..records import RunLog
from .base import Finding, _g, _num, _step, _trouble
from .registry import register

#: The largest output logit beyond which the softmax is saturated for most examples ...
OUT_HIGH = 100.0
#: ... and it grew this many times over its start.
OUT_GROWTH = 10.0
#: Steps averaged (median) for "the start" and "the peak" windows.
OUT_SAMPLES = 5


def _series(run: RunLog) -> list[tuple[int, float, float | None]]:
    out = []
    for s in run.steps:
        lg = s.get("logits")
        if _step(s) is None or not isinstance(lg, Mapping):
            continue
        a = _num(lg.get("absmax"))
        if a is not None:
            out.append((s["step"], a, _num(lg.get("logz"))))
    return out


@register
def output_logits(run: RunLog) -> Finding | None:
    """The output logits grew past ~100 and 10x their start, with spikes or a degraded loss."""
    from .progress import _degradation

    series = _series(run)
    if len(series) < 2 * OUT_SAMPLES:
        return None
    start = statistics.median(a for _, a, _ in series[:OUT_SAMPLES])
    # The largest sustained level: the best median over any OUT_SAMPLES consecutive records.
    windows = [
        (series[i][0], statistics.median(a for _, a, _ in series[i : i + OUT_SAMPLES]))
        for i in range(OUT_SAMPLES, len(series) - OUT_SAMPLES + 1)
    ]
    if not windows:
        return None
    peak_step, peak = max(windows, key=lambda t: t[1])
    if peak < OUT_HIGH or peak < OUT_GROWTH * max(start, 1e-12):
        return None
    trouble = _trouble(run)
    degraded = _degradation(run)
    if not trouble and degraded is None:
        return None
    logz = [(s, z) for s, _, z in series if z is not None]
    evidence = [
        f"largest output logit {_g(start)} over the first {OUT_SAMPLES} steps, {_g(peak)} "
        f"around step {peak_step} ({peak / max(start, 1e-12):.3g}x)"
    ]
    if logz:
        z0, z1 = logz[0][1], max(logz, key=lambda t: abs(t[1]))
        evidence.append(
            f"log Z (mean logsumexp of the outputs) {_g(z0)} at the start, {_g(z1[1])} at step {z1[0]}"
        )
    if trouble:
        evidence.append(
            f"{len(trouble)} spike/non-finite event(s), the first at step {trouble[0]['step']}"
        )
    if degraded is not None:
        evidence.append(
            f"the loss ended at {_g(degraded['last'][2])}, above its best {_g(degraded['best'][2])}"
        )
    return Finding(
        cause="output_logits",
        title="Output logits diverging",
        summary=(
            f"The model's output logits grew from {_g(start)} to {_g(peak)}: the softmax "
            "saturates, each wrong prediction costs a huge loss and gradient, and training "
            "became unstable (output-logit divergence)."
        ),
        evidence=evidence,
        advice=[
            "Add a z-loss on the output logits: loss + 1e-4 * logsumexp(logits, -1).pow(2).mean() "
            "(PaLM; Wortsman et al. 2023), which keeps log Z near 0.",
            "Use weight decay on the output layer, or a lower LR for it; clamp a learnable "
            "logit scale or temperature (CLIP clamps its logit_scale at 100).",
            "Normalize before the output layer (a final LayerNorm) so its input cannot grow.",
        ],
        severity="high" if trouble else "medium",
        step=peak_step,
    )
