"""AutoClip (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
Networks"; reference code pseeth/autoclip)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from .._lazy import torch
from ..errors import SpecError
from .base import Policy, StepContext, check_keys, check_number, check_tensor, refuse_state
from .clip import NORM_EPS
from .registry import register
from .xp import TORCH, ArrayNamespace

if TYPE_CHECKING:
    from torch import Tensor

#: History slots at most (two float32 buffers of this length: 80 MB).
_MAX_SLOTS = 10_000_000
_INITIAL_CAPACITY = 1024


# The history's arithmetic, written once for torch and Keras (``xp``: the array namespace).
def sorted_insert(xp: ArrayNamespace, buf: Any, x: Any) -> Any:
    """Insert ``x`` into ascending ``buf`` (padded with +inf at the end), dropping the last slot.

    O(len(buf)) device ops with no host sync: the insertion index stays a tensor.
    """
    idx = xp.searchsorted(buf, x, right=True)
    ar = xp.arange_like(buf)
    shifted = xp.concat([buf[:1], buf[:-1]])
    return xp.where(ar < idx, buf, xp.where(ar == idx, x, shifted))


def sorted_remove(xp: ArrayNamespace, buf: Any, x: Any) -> Any:
    """Remove one occurrence of ``x`` (which must be present) from ascending ``buf``; pad with +inf."""
    idx = xp.searchsorted(buf, x, right=False)
    shifted = xp.concat([buf[1:], xp.full_like(buf[:1], math.inf)])
    return xp.where(xp.arange_like(buf) < idx, buf, shifted)


def percentile_sorted(xp: ArrayNamespace, buf: Any, n: Any, q: float) -> Any:
    """``numpy.percentile(buf[:n], q)`` (linear interpolation) for ascending ``buf``; +inf if n == 0."""
    last = xp.maximum(xp.as_float(n) - 1.0, 0.0)
    pos = (q / 100.0) * last
    lo = xp.floor(pos)
    hi = xp.minimum(lo + 1.0, last)
    a = xp.take(buf, lo)
    b = xp.take(buf, hi)
    val = a + (b - a) * (pos - lo)
    # b - a is inf - inf = nan only when n == 0.
    return xp.where(n > 0, val, math.inf)


def autoclip_factor(xp: ArrayNamespace, norm: Any, threshold: Any) -> Any:
    """The clipping factor ``min(1, threshold / (norm + 1e-6))``, as ``clip_grad_norm_``."""
    return xp.minimum(threshold / (norm + NORM_EPS), 1.0)


def reservoir_slot(count: int, capacity: int, seed: int = 0x9E3779B97F4A7C15) -> int | None:
    """Vitter's Algorithm R for the ``count``-th item (0-based): the slot it replaces, or None.

    The random draw is a hash of ``count`` (splitmix64), so the sample is reproducible and a
    resumed run draws exactly what the uninterrupted one would, with no generator state to save.
    """
    if count < capacity:
        return count
    z = (seed + count * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    j = (z ^ (z >> 31)) % (count + 1)
    return j if j < capacity else None


@register
class autoclip(Policy):
    """Clip to the ``percentile``-th percentile of the history of global gradient norms, the current
    norm included (pseeth/autoclip, which uses ``numpy.percentile`` and ``clip_grad_norm_``).

    ``percentile=10`` is the paper's recommendation. ``history=N`` keeps the norms of the last N
    steps (a sliding window; a non-finite step holds its slot without a value); ``history=None``
    keeps every norm, exactly, up to ``max_history`` of them. Beyond that the history is a uniform
    random sample of all the norms seen (reservoir sampling, Vitter's Algorithm R, reproducible), so
    each percentile is the whole history's to within sampling error, about 1/sqrt(max_history) in
    rank (0.3% at the default 100,000), and memory stays bounded (800 KB).

    Norms live in one sorted float32 tensor on the gradients' device; each step costs O(size)
    device operations and no host sync. Non-finite norms never enter the statistics (in the
    reference one NaN poisons every later threshold).
    """

    name = "autoclip"
    nonnegative = frozenset({"sorted", "ring", "n_valid", "size", "count"})

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
        for key, n in (("history", history), ("max_history", max_history)):
            if n is not None and n > _MAX_SLOTS:
                raise SpecError(
                    f"{key}={n} would keep {n} norms in two device buffers ({n * 8 / 1e9:.1f} GB); "
                    f"the limit is {_MAX_SLOTS:,}. Leave history unset: AutoClip then keeps every "
                    f"norm up to max_history and a uniform sample of them beyond"
                )
        self.percentile = float(percentile)
        self.history = history
        self.max_history = max_history
        # sorted: the kept norms ascending, +inf padded; ring: the same norms by slot (so the one a
        # new norm replaces can be found); size: slots in use; count: norms seen; n_valid: finite
        # norms kept (a device scalar: finiteness is never read to the host).
        self.state = {"sorted": None, "ring": None, "n_valid": None, "size": 0, "count": 0}

    @property
    def capacity(self) -> int:
        return self.history if self.history is not None else self.max_history

    def _ensure(self, device: torch.device, need: int) -> None:
        st = self.state
        if st["sorted"] is None:
            cap = (
                self.capacity if self.history is not None else min(_INITIAL_CAPACITY, self.capacity)
            )
            st["sorted"] = torch.full((cap + 1,), math.inf, device=device)
            st["ring"] = torch.full((cap,), math.inf, device=device)
            st["n_valid"] = torch.zeros((), dtype=torch.long, device=device)
        for k in ("sorted", "ring", "n_valid"):
            if st[k].device != device:
                st[k] = st[k].to(device)
        ring = st["ring"]
        if need > ring.numel():  # grow geometrically up to the capacity
            cap = min(self.capacity, max(need, 2 * ring.numel()))
            st["ring"] = torch.cat([ring, ring.new_full((cap - ring.numel(),), math.inf)])
            buf = cast("Tensor", st["sorted"])  # filled above
            st["sorted"] = torch.cat([buf, buf.new_full((cap + 1 - buf.numel(),), math.inf)])

    def check_state(self, state: Any) -> None:
        """The history must be one this AutoClip could have kept: norms >= 0 (+inf marks a slot
        without a finite norm, never NaN), ``ring`` no longer than the capacity, ``sorted`` exactly
        the ring's norms ascending (plus one +inf pad), ``n_valid`` the number of finite ones,
        ``size`` and ``count`` consistent with ``history``/``max_history``."""
        name = self.name
        st = check_keys(name, state, ("sorted", "ring", "n_valid", "size", "count"))
        for key in ("size", "count"):
            check_number(name, key, st[key], integer=True, nonneg=True)
        size, count = st["size"], st["count"]
        fix = f"load a state saved by autoclip with history={self.history}, max_history={self.max_history}"
        if size != min(count, self.capacity):
            refuse_state(
                name,
                "size",
                size,
                f"after count={count} norms a history of capacity {self.capacity} holds "
                f"{min(count, self.capacity)}",
                fix,
            )
        if st["sorted"] is None or st["ring"] is None or st["n_valid"] is None:
            if any(st[k] is not None for k in ("sorted", "ring", "n_valid")) or count:
                refuse_state(
                    name, "sorted", st["sorted"], "sorted, ring and n_valid are made together", fix
                )
            return
        self._check_history(st, size, fix)

    def _check_history(self, st: Mapping[str, Any], size: int, fix: str) -> None:
        """``ring``, ``sorted`` and ``n_valid``: the ``size`` norms kept, the same norms sorted
        (plus one +inf pad) and the count of finite ones."""
        name = self.name
        ring = st["ring"]
        check_tensor(name, "ring", ring, nonneg=True, allow_inf=True)
        if not ring.is_floating_point():
            refuse_state(name, "ring", ring, "it must hold floating-point norms", fix)
        if ring.ndim != 1 or not size <= ring.numel() <= self.capacity:
            refuse_state(
                name,
                "ring",
                ring,
                f"it must be 1-D with between size={size} and {self.capacity} slots",
                fix,
            )
        if self.history is not None and ring.numel() != self.history:
            refuse_state(name, "ring", ring, f"it must have history={self.history} slots", fix)
        check_tensor(
            name,
            "sorted",
            st["sorted"],
            like=ring.new_empty(ring.numel() + 1),
            nonneg=True,
            allow_inf=True,
        )
        check_tensor(name, "n_valid", st["n_valid"], shape=(), nonneg=True)
        r = ring.detach().cpu().float()
        if torch.isfinite(r[size:]).any():
            refuse_state(name, "ring", ring, f"slots from size={size} on must be empty (+inf)", fix)
        want = torch.sort(torch.cat([r, r.new_full((1,), math.inf)])).values
        if not torch.equal(st["sorted"].detach().cpu().float(), want):
            refuse_state(
                name,
                "sorted",
                st["sorted"],
                "it must hold the ring's norms in ascending order",
                fix,
            )
        n_valid = st["n_valid"]
        if n_valid.is_floating_point() or int(n_valid) != int(torch.isfinite(r).sum()):
            refuse_state(
                name,
                "n_valid",
                n_valid,
                f"it must be the integer count of finite norms in the ring, "
                f"{int(torch.isfinite(r).sum())}",
                fix,
            )

    def threshold(self) -> Tensor:
        st = self.state
        return cast(
            "Tensor", percentile_sorted(TORCH, st["sorted"], st["n_valid"], self.percentile)
        )

    def observe(self, x: Tensor) -> None:
        """Add one global norm to the history (a non-finite one is kept out of the statistics)."""
        st = self.state
        count: int = st["count"]
        st["count"] = count + 1
        slot: int | None
        if self.history is not None:
            slot = count % self.history
        else:
            slot = reservoir_slot(count, self.capacity)
            if slot is None:
                return  # not drawn into the sample
        evict = slot < st["size"]
        self._ensure(x.device, slot + 1)
        finite = torch.isfinite(x)
        xin = torch.where(
            finite, x.to(torch.float32), torch.full_like(x, math.inf, dtype=torch.float32)
        )
        buf = st["sorted"]
        if evict:
            old = st["ring"][slot]
            buf = sorted_remove(TORCH, buf, old)
            st["n_valid"] = st["n_valid"] - torch.isfinite(old).long()
        else:
            st["size"] += 1
        st["ring"][slot] = xin
        st["sorted"] = sorted_insert(TORCH, buf, xin)
        st["n_valid"] = st["n_valid"] + finite.long()

    def apply(self, ctx: StepContext) -> None:
        stats = ctx.stats
        if not stats.grads:
            return
        x = stats.norm_after
        self.observe(x)
        thr = self.threshold()
        coef = autoclip_factor(TORCH, x, thr)
        stats.scale_(coef)
        ctx.record(self.name, coef < 1.0)
        ctx.metrics["autoclip.threshold"] = thr
