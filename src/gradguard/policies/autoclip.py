"""AutoClip (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
Networks"; reference code pseeth/autoclip)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import SpecError
from .base import Policy, StepContext
from .clip import NORM_EPS
from .registry import register

_INITIAL_CAPACITY = 1024


def sorted_insert(buf: Tensor, x: Tensor) -> Tensor:
    """Insert ``x`` into ascending ``buf`` (padded with +inf at the end), dropping the last slot.

    O(len(buf)) device ops with no host sync: the insertion index stays a tensor.
    """
    idx = torch.searchsorted(buf, x.reshape(1), right=True)
    ar = torch.arange(buf.numel(), device=buf.device)
    shifted = torch.cat([buf[:1], buf[:-1]])
    return torch.where(ar < idx, buf, torch.where(ar == idx, x, shifted))


def sorted_remove(buf: Tensor, x: Tensor) -> Tensor:
    """Remove one occurrence of ``x`` (which must be present) from ascending ``buf``; pad with +inf."""
    idx = torch.searchsorted(buf, x.reshape(1), right=False)
    ar = torch.arange(buf.numel(), device=buf.device)
    shifted = torch.cat([buf[1:], buf.new_full((1,), math.inf)])
    return torch.where(ar < idx, buf, shifted)


def percentile_sorted(buf: Tensor, n: Tensor, q: float) -> Tensor:
    """``numpy.percentile(buf[:n], q)`` (linear interpolation) for ascending ``buf``; +inf if n == 0."""
    n_f = n.to(torch.float32)
    pos = (q / 100.0) * (n_f - 1).clamp(min=0)
    lo = pos.floor()
    hi = torch.minimum(lo + 1, (n_f - 1).clamp(min=0))
    a = buf.index_select(0, lo.long().reshape(1)).reshape(())
    b = buf.index_select(0, hi.long().reshape(1)).reshape(())
    val = a + (b - a) * (pos - lo)
    # b - a is inf - inf = nan only when n == 0.
    return torch.where(n > 0, val, torch.full_like(val, math.inf))


@register
class autoclip(Policy):
    """Clip to the ``percentile``-th percentile of the history of global gradient norms, the current
    norm included (pseeth/autoclip, which uses ``numpy.percentile`` and ``clip_grad_norm_``).

    ``percentile=10`` is the paper's recommendation. ``history=N`` keeps the last N norms (a sliding
    window); ``history=None`` keeps every norm. Memory is bounded: norms live in one sorted float32
    tensor on the gradients' device; with ``history=None`` it holds at most ``max_history`` values
    (400 KB at the default 100,000) and, when full, is thinned to every other value, which keeps
    every percentile to within 1/max_history in rank. Each step costs O(size) device operations and
    no host sync. Non-finite norms never enter the history (the reference would let one NaN poison
    every later threshold).
    """

    name = "autoclip"

    def __init__(
        self, percentile: float = 10.0, history: int | None = None, max_history: int = 100_000
    ):
        super().__init__()
        if not (isinstance(percentile, (int, float)) and 0 <= percentile <= 100):
            raise SpecError(f"percentile must be in [0, 100], got {percentile!r}")
        if history is not None and (not isinstance(history, int) or history < 1):
            raise SpecError(
                f"history must be a positive integer or None (keep all), got {history!r}"
            )
        if not isinstance(max_history, int) or max_history < 2:
            raise SpecError(f"max_history must be an integer >= 2, got {max_history!r}")
        self.percentile = float(percentile)
        self.history = history
        self.max_history = max_history
        # sorted: the ascending buffer (+inf padded); size: entries stored (host int, finite or not);
        # n_valid: finite entries (device); ring: insertion order, for removing the oldest in a window.
        self.state = {"sorted": None, "n_valid": None, "size": 0, "count": 0, "ring": None}

    def _ensure(self, device: torch.device) -> None:
        st = self.state
        if st["sorted"] is None:
            cap = (
                self.history + 1
                if self.history is not None
                else min(_INITIAL_CAPACITY, self.max_history)
            )
            st["sorted"] = torch.full((cap,), math.inf, device=device)
            st["n_valid"] = torch.zeros((), dtype=torch.long, device=device)
            if self.history is not None:
                st["ring"] = torch.full((self.history,), math.inf, device=device)
        elif st["sorted"].device != device:
            for k in ("sorted", "n_valid", "ring"):
                if st[k] is not None:
                    st[k] = st[k].to(device)

    def threshold(self) -> Tensor:
        st = self.state
        return percentile_sorted(st["sorted"], st["n_valid"], self.percentile)

    def observe(self, x: Tensor) -> None:
        """Add one global norm to the history (non-finite norms are ignored)."""
        self._ensure(x.device)
        st = self.state
        finite = torch.isfinite(x)
        xin = torch.where(
            finite, x.to(torch.float32), torch.full_like(x, math.inf, dtype=torch.float32)
        )
        buf = st["sorted"]
        if self.history is not None:
            if st["size"] == self.history:
                old = st["ring"][st["count"] % self.history]
                buf = sorted_remove(buf, old)
                st["n_valid"] = st["n_valid"] - torch.isfinite(old).long()
                st["size"] -= 1
            st["ring"][st["count"] % self.history] = xin
        else:
            if st["size"] + 1 >= buf.numel():
                if buf.numel() >= self.max_history:
                    # Thin the history: every other value keeps each percentile within one rank.
                    keep = buf[0 : st["size"] : 2]
                    buf = torch.cat([keep, buf.new_full((buf.numel() - keep.numel(),), math.inf)])
                    st["n_valid"] = (st["n_valid"] + 1) // 2
                    st["size"] = keep.numel()
                else:
                    grow = min(buf.numel(), self.max_history - buf.numel())
                    buf = torch.cat([buf, buf.new_full((max(grow, 1),), math.inf)])
        st["sorted"] = sorted_insert(buf, xin)
        st["n_valid"] = st["n_valid"] + finite.long()
        st["size"] += 1
        st["count"] += 1

    def apply(self, ctx: StepContext) -> None:
        stats = ctx.stats
        if not stats.grads:
            return
        x = stats.norm_after
        self.observe(x)
        thr = self.threshold()
        coef = torch.clamp(thr / (x + NORM_EPS), max=1.0)
        stats.scale_(coef)
        ctx.record(self.name, coef < 1.0)
        ctx.metrics["autoclip.threshold"] = thr
