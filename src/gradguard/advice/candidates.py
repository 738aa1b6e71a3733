"""The candidate policies the probe compares, with parameters from what the LR probe measured.

Each is a Guard spec. ``none`` is the baseline (no Guard). The fixed-threshold clip takes its
threshold from the healthy run's gradient norms (``clip_norm:<p90>``), so it caps spikes at a
size this model's healthy training reaches instead of at a recipe's 1.0; the adaptive ones
(``agc``, ``autoclip``, ``zclip``) run with their papers' defaults, since they adapt by
themselves; the two ladders combine detection, clipping, skipping and rollback:

=====================  ===========================================================================
``none``               no Guard: the baseline
``clip_norm:T``        clip the global norm to T = the healthy run's norm percentile
``agc``                unit-wise adaptive clipping relative to the weights (Brock et al. 2021)
``autoclip``           clip to the 10th percentile of the norm history (Seetharaman et al. 2020)
``zclip``              clip norm spikes found by their z-score against an EMA (ZClip, 2025)
``default``            the Guard's default (``skip_nonfinite+adaptive_clip+update_clip+lr_backoff``):
                       no threshold, as a user gets it untuned
``skip ladder``        ``skip_nonfinite+zclip+clip_norm:T``: ``default_v1``'s chain, at threshold T
``rollback ladder``    ``zclip+clip_norm:T+rollback+lr_backoff``: restore the last good state on a
                       NaN, cut the LR when incidents repeat
=====================  ===========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..policies import parse_spec


@dataclass(frozen=True)
class Candidate:
    """One policy under test: a short ``name`` for tables and its Guard ``spec``."""

    name: str
    spec: str
    why: str


def threshold_text(value: float) -> str:
    """A clip threshold as spec text: 3 significant digits (``2.37``, ``0.0412``, ``130``)."""
    text = f"{value:.3g}"
    if "e" in text:  # 1.3e+02 would parse, but reads badly in a spec
        text = f"{float(text):f}".rstrip("0").rstrip(".")
    return text


def candidates(threshold: float) -> list[Candidate]:
    """The candidates for a measured clip threshold (1.0, the common recipe, if none could be
    measured). Every spec is checked to parse."""
    t = threshold_text(threshold if math.isfinite(threshold) and threshold > 0 else 1.0)
    out = [
        Candidate("none", "none", "no Guard (the baseline)"),
        Candidate(
            "clip_norm", f"clip_norm:{t}", "global-norm clip at the healthy run's percentile"
        ),
        Candidate("agc", "agc", "unit-wise clip relative to the weights (NFNets' defaults)"),
        Candidate("autoclip", "autoclip", "clip to the 10th percentile of the norm history"),
        Candidate("zclip", "zclip", "clip norm spikes by z-score against an EMA"),
        Candidate(
            "default",
            "default",
            "the untuned default: clip relative to the run's norms, bound each layer's update",
        ),
        Candidate(
            "skip ladder",
            f"skip_nonfinite+zclip+clip_norm:{t}",
            "skip NaN steps, clip spikes, cap at the measured threshold",
        ),
        Candidate(
            "rollback ladder",
            f"zclip+clip_norm:{t}+rollback+lr_backoff",
            "clip, roll back to the last good state on NaN, cut the LR on repeats",
        ),
    ]
    for c in out:
        if c.spec != "none":
            parse_spec(c.spec)
    return out
