"""``attention_logits``: the largest pre-softmax attention logit grew far beyond its start.

Attention logits that grow without bound make the softmax one-hot (attention entropy collapse),
after which the loss stalls or diverges with no NaN: Dehghani et al. 2023 (ViT-22B), Zhai et al.
2023, Wortsman et al. 2023, who fix it with qk-layernorm; Kimi K2's QK-Clip (MuonClip) caps the
logits by rescaling the query/key weights. The telemetry's ``attn_logit`` holds, on sampled steps,
each attention module's largest logit ``q.k * scale`` over its heads and the batch.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

from ..records import RunLog
from .base import Finding, _g, _num, _step, _trouble, _trouble_text
from .registry import register

#: The end's largest logit beyond which the softmax is near one-hot: exp(30) puts 1e13 times more
#: weight on the top key than on a key at logit 0.
ATTN_HIGH = 30.0
#: ... and it grew this many times over its start (a model whose logits start large is another
#: story).
ATTN_GROWTH = 3.0
#: Sampled steps averaged (median) for "the start" and "the end".
ATTN_SAMPLES = 3


def _samples(run: RunLog) -> list[tuple[int, dict[str, float]]]:
    out = []
    for s in run.steps:
        a = s.get("attn_logit")
        if _step(s) is None or not isinstance(a, Mapping):
            continue
        row = {str(k): v for k, x in a.items() if (v := _num(x)) is not None}
        if row:
            out.append((s["step"], row))
    return out


@register
def attention_logits(run: RunLog) -> Finding | None:
    """The largest attention logit grew past ~30 and to several times its start."""
    samples = _samples(run)
    if len(samples) < 2 * ATTN_SAMPLES:
        return None
    sites = sorted({k for _, row in samples for k in row})
    start = {
        k: statistics.median(row[k] for _, row in samples[:ATTN_SAMPLES] if k in row)
        for k in sites
        if any(k in row for _, row in samples[:ATTN_SAMPLES])
    }
    end = {
        k: statistics.median(row[k] for _, row in samples[-ATTN_SAMPLES:] if k in row)
        for k in sites
        if any(k in row for _, row in samples[-ATTN_SAMPLES:])
    }
    grown = {
        k: (start[k], v)
        for k, v in end.items()
        if k in start and v >= ATTN_HIGH and v >= ATTN_GROWTH * max(start[k], 1e-12)
    }
    if not grown:
        return None
    worst = max(grown, key=lambda k: grown[k][1])
    s0, s1 = grown[worst]
    peak_step, peak = max(
        ((st, row[worst]) for st, row in samples if worst in row), key=lambda t: t[1]
    )
    trouble = _trouble(run)
    evidence = [
        f"{k}: largest attention logit {_g(a)} at the start, {_g(b)} at the end"
        for k, (a, b) in sorted(grown.items(), key=lambda t: -t[1][1])[:5]
    ]
    evidence.append(f"peak {_g(peak)} at step {peak_step} ({worst})")
    if trouble:
        evidence.append(_trouble_text(trouble))
    return Finding(
        cause="attention_logits",
        title="Attention logits growing",
        summary=(
            f"The attention logits grew from {_g(s0)} to {_g(s1)} in {worst}: the softmax "
            "turns one-hot (attention entropy collapse), and the loss stalls or spikes without "
            "a NaN."
        ),
        evidence=evidence,
        advice=[
            "Normalize queries and keys before the dot product (qk-layernorm: a LayerNorm or "
            "RMSNorm on q and k per head; the gpt model's qk_layernorm=True), Dehghani et al. "
            "2023 and Wortsman et al. 2023's fix.",
            "Or cap the logits: gradguard's 'qk_clip' policy rescales the query/key weights of a "
            "head whose logit passes its threshold (Kimi K2's QK-Clip).",
            "Lower the learning rate or lengthen its warmup; weight decay on the attention "
            "weights also slows the growth.",
        ],
        severity="high" if trouble else "medium",
        step=peak_step,
        layers=sorted(grown, key=lambda k: -grown[k][1]),
    )
