"""``output_logits``: the output logits drifted together, far from where they started.

The softmax cross-entropy cannot see the logits' common mode (adding ``c`` to every logit of a
row changes no probability), so nothing in the loss pulls it back: at scale, Adam's
per-coordinate steps without weight decay walk it, and the logits "diverge and become very
negative" (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities", the output-logit divergence; the mean output embedding drifting, Stollenwerk et
al. 2026). The loss looks fine until low precision cannot hold the logits apart (bf16 keeps 8
significant bits: at ``|x|`` of 256-512 its step is 2 nats), then it degrades or diverges. The
z-loss ``1e-4 * logsumexp(logits)**2`` (PaLM, Chowdhery et al. 2022) keeps ``log Z`` near 0.

The telemetry's ``logits`` holds, per step, the output's largest ``|x|``, ``logz`` (the mean
``logsumexp`` of its rows) and ``mean`` (the mean logit: the common mode). A drift is the mean
logit moving far from its start while the logits' size is mostly that move (the logits moved
together): a run whose logits grow apart (an overconfident or exploding model) is another story,
told by the other rules, and so is one whose mean logit moved back toward 0 (outputs far too
large from the init, coming down). Files without ``mean`` are judged on ``logz`` alone, which
only a common downward move takes far below zero (``logz`` is at least the largest logit of its
row).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

from ..records import RunLog
from .base import Finding, _g, _num, _step, _trouble, _trouble_text
from .registry import register

#: The move of the mean logit (nats) from its start that is a drift: e^10 ~ 2e4, far beyond any
#: move a trained classifier's logits make together (its healthy runs here: under 1 nat).
OUT_DRIFT = 10.0
#: ... and at least this share of the end's largest |logit| is the common move (the logits moved
#: together, not apart).
OUT_COMMON = 0.5
#: Steps averaged (median) for "the start" and "the end"; every end step beyond half the drift.
OUT_SAMPLES = 5


def _samples(run: RunLog) -> list[tuple[int, float | None, float | None, float | None]]:
    """(step, mean, logz, absmax) of each step whose ``logits`` hold a finite number."""
    out = []
    for s in run.steps:
        lg = s.get("logits")
        if _step(s) is None or not isinstance(lg, Mapping):
            continue
        row = (_num(lg.get("mean")), _num(lg.get("logz")), _num(lg.get("absmax")))
        if any(v is not None for v in row):
            out.append((s["step"], *row))
    return out


def _drift(samples: list[tuple[int, Any, Any, Any]], i: int) -> dict[str, Any] | None:
    """The drift of field ``i`` (1 mean, 2 logz): start and end medians, or None when too few."""
    vals = [(st, v) for st, *row in samples if (v := row[i - 1]) is not None]
    if len(vals) < 2 * OUT_SAMPLES:
        return None
    start = statistics.median(v for _, v in vals[:OUT_SAMPLES])
    tail = [v for _, v in vals[-OUT_SAMPLES:]]
    end = statistics.median(tail)
    move = end - start
    steady = all((v - start) * math.copysign(1.0, move) >= abs(move) / 2 for v in tail)
    return {
        "start": start,
        "end": end,
        "move": move,
        "steady": steady,
        "first": vals[0][0],
        "last": vals[-1][0],
    }


@register
def output_logits(run: RunLog) -> Finding | None:
    """The output logits drifted together (their mean moved tens of nats from its start): the
    output-logit divergence that the z-loss prevents."""
    samples = _samples(run)
    mean = _drift(samples, 1)
    logz = _drift(samples, 2)
    absmax = [a for *_, a in samples[-OUT_SAMPLES:] if a is not None]
    size = statistics.median(absmax) if absmax else None
    if mean is not None:
        if not (
            abs(mean["move"]) >= OUT_DRIFT
            and mean["steady"]
            and abs(mean["end"]) > abs(mean["start"])  # away from 0, not back from a bad init
            and (size is None or abs(mean["move"]) >= OUT_COMMON * size)
        ):
            return None
        common = mean
    elif logz is not None:
        # no mean logit recorded (an older file): only a common downward move takes log Z far
        # below zero
        if not (logz["end"] <= -OUT_DRIFT and logz["move"] <= -OUT_DRIFT and logz["steady"]):
            return None
        common = logz
    else:
        return None
    down = common["move"] < 0
    what = "mean logit" if common is mean else "log Z (the mean logsumexp of the logits' rows)"
    evidence = [
        f"the {what} went from {_g(common['start'])} at the start (step {common['first']}) to "
        f"{_g(common['end'])} at the end (step {common['last']}): every logit moved "
        f"{'down' if down else 'up'} by ~{abs(common['move']):.3g} nats together"
    ]
    if common is mean and logz is not None:
        evidence.append(f"log Z went from {_g(logz['start'])} to {_g(logz['end'])}")
    if size is not None:
        bits = 2.0 ** (math.floor(math.log2(max(size, 1.0))) - 7)
        evidence.append(
            f"largest |logit| {_g(size)} at the end: bf16 tells logits that large apart only in "
            f"steps of {bits:.3g} nats"
        )
    trouble = _trouble(run)
    if trouble:
        evidence.append(_trouble_text(trouble))
    return Finding(
        cause="output_logits",
        title="Output logits drifting" + (" very negative" if down else " up"),
        summary=(
            f"The output logits moved together by ~{abs(common['move']):.3g} nats: the softmax "
            "loss cannot see their common mode, so nothing pulls it back (output-logit "
            "divergence, Wortsman et al. 2023); in low precision the loss degrades, then "
            "diverges."
        ),
        evidence=evidence,
        advice=[
            "Add a z-loss, which keeps log Z near 0: loss = loss + 1e-4 * "
            "torch.logsumexp(logits, -1).pow(2).mean() (PaLM's coefficient; Wortsman et al. "
            "2023).",
            "Put weight decay on the output layer (AdamW's weight_decay, its bias included): the "
            "divergence appears without it.",
            "Or center the output embeddings after each step (mu-centering, Stollenwerk et al. "
            "2026): with torch.no_grad(): head.weight -= head.weight.mean(0, keepdim=True), and "
            "the bias minus its mean.",
            "Lower the learning rate if the drift began when it rose.",
        ],
        severity="high" if trouble else "medium",
        step=common["last"],
    )
