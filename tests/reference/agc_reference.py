"""Adaptive gradient clipping (Brock et al. 2021, NFNets), written straight from the definition.

Per unit (an output row: reduce over every dim but 0; a tensor of ndim <= 1 is one unit):

    max = clipping * max(||W||_unit, eps)
    where ||g||_unit > max:  g <- g * max / max(||g||_unit, 1e-6)

Everything in float64 NumPy, one parameter at a time. Independent of gradguard.
"""

from __future__ import annotations

import numpy as np


def unit_norms(a: np.ndarray) -> np.ndarray:
    """L2 norm per unit, shaped to broadcast against ``a`` (a scalar array for ndim <= 1)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim <= 1:
        return np.sqrt(np.sum(a * a))
    axes = tuple(range(1, a.ndim))
    return np.sqrt(np.sum(a * a, axis=axes, keepdims=True))


def agc_clip(weight, grad, clipping: float = 0.01, eps: float = 1e-3):
    """Return (clipped gradient as float64 array, bool array: which units were clipped)."""
    w = np.asarray(weight, dtype=np.float64)
    g = np.asarray(grad, dtype=np.float64)
    max_norm = clipping * np.maximum(unit_norms(w), eps)
    g_norm = unit_norms(g)
    clipped = g_norm > max_norm
    scale = np.where(clipped, max_norm / np.maximum(g_norm, 1e-6), 1.0)
    return g * scale, np.atleast_1d(clipped).reshape(-1)


def agc_reference(named_params, clipping: float = 0.01, eps: float = 1e-3, excluded=()):
    """Apply AGC to every (name, weight, grad) triple whose name is not in ``excluded``.

    Returns a dict name -> (expected gradient, clipped-units mask or None if excluded).
    """
    out = {}
    for name, w, g in named_params:
        if name in excluded:
            out[name] = (np.asarray(g, dtype=np.float64), None)
        else:
            out[name] = agc_clip(w, g, clipping, eps)
    return out
