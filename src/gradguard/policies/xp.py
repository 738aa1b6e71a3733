"""The few array operations the policies' decision rules are written against.

A rule (ZClip's update, clip_layerwise's thresholds, ...) is written once, against an
:class:`ArrayNamespace` ``xp``, and runs on three kinds of numbers:

- :data:`HOST`: Python floats, ints and bools, and lists for the small fixed-size buffers. Used when
  the Guard has already read the step's norm to the host: a few float operations instead of tiny
  device kernels. ``where(c, a, b)`` is ``a if c else b``. It is scalar: a list enters only the
  buffer operations (``put``, ``take``, ``moments``, ``window_moments``, ``searchsorted``), so a
  rule with elementwise vector arithmetic (clip_layerwise, AutoClip's history) runs on the other
  two only.
- :data:`TORCH`: tensors, sync-free: every branch on a value is a ``torch.where``, never a Python
  ``if`` (that would read the value to the host).
- ``gradguard.keras.xp.KERAS``: ``keras.ops``, for every Keras backend and inside a compiled step
  (defined in the Keras package, so importing gradguard never imports Keras).

Arithmetic (``+ - * /``, comparisons with ``>``, ``>=``) is written with the operators, which all
three support; the namespace holds what the operators do not express. Both branches of ``where``
are evaluated on every path, so a rule keeps them finite-safe (no division by a value that can be
zero on the branch not taken: Python would raise where a tensor gives inf).

As Keras's own ``LossScaleOptimizer`` is written once in ``keras.ops`` for every backend.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from .._lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


class ArrayNamespace(Protocol):
    """What a decision rule may call on ``xp``. Scalars are 0-dim arrays (or Python numbers on the
    host); ``buf`` arguments are 1-D (lists on the host)."""

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        """``a`` where ``cond`` holds, else ``b`` (elementwise)."""
        ...

    def sqrt(self, x: Any) -> Any: ...

    def log(self, x: Any) -> Any:
        """Natural log (of a positive value: a rule keeps zero out of both ``where`` branches)."""
        ...

    def exp(self, x: Any) -> Any: ...

    def power(self, base: float, exponent: Any) -> Any:
        """``base ** exponent`` for a Python float ``base``."""
        ...

    def minimum(self, a: Any, b: Any) -> Any:
        """Elementwise minimum; ``b`` may be a Python number."""
        ...

    def maximum(self, a: Any, b: Any) -> Any:
        """Elementwise maximum; ``b`` may be a Python number."""
        ...

    def isfinite(self, x: Any) -> Any: ...

    def logical_and(self, a: Any, b: Any) -> Any: ...

    def logical_or(self, a: Any, b: Any) -> Any: ...

    def logical_not(self, a: Any) -> Any: ...

    def any(self, a: Any) -> Any:
        """Whether any element of ``a`` holds (a scalar)."""
        ...

    def as_float(self, x: Any) -> Any:
        """``x`` (a bool or int) as float32 (a Python float on the host)."""
        ...

    def as_int(self, x: Any) -> Any:
        """``x`` (a bool) as the namespace's integer (a Python int on the host)."""
        ...

    def full_like(self, x: Any, value: float) -> Any: ...

    def moments(self, buf: Any, used: Any = True) -> tuple[Any, Any]:
        """Mean and population variance (``ddof=0``) of a small 1-D buffer, for a rule that uses
        them only where ``used`` holds (elsewhere the host returns zeros without summing)."""
        ...

    def window_moments(self, buf: Any, n: Any) -> tuple[Any, Any]:
        """Mean and sample variance (``ddof=1``) of the first ``n`` entries of ``buf`` (0 where
        there are too few: the mean of none, the variance of one)."""
        ...

    def window_median_mad(self, buf: Any, n: Any) -> tuple[Any, Any]:
        """Median and median absolute deviation (unscaled) of the first ``n`` entries of ``buf``
        (the mean of the two middle values for an even ``n``); +inf for both when ``n`` is 0."""
        ...

    def ring_trend(self, buf: Any, count: Any) -> tuple[Any, Any]:
        """The least-squares line through a ring's entries in the order they were written
        (``count`` written so far, each at slot ``count % len(buf)``, so the last
        ``min(count, len(buf))`` are held, the oldest at ``count % len(buf)`` once it is full):
        its value one step after the newest, and the median absolute deviation (unscaled) of the
        entries about the line; +inf for both with fewer than 2 entries."""
        ...

    def put(self, buf: Any, index: Any, value: Any, when: Any) -> Any:
        """``buf`` with ``buf[index] = value`` where ``when`` holds (a new array; ``index`` a
        scalar, never read to the host)."""
        ...

    def take(self, buf: Any, index: Any) -> Any:
        """``buf[index]`` for a scalar ``index`` (an integer-valued float is accepted)."""
        ...

    def floor(self, x: Any) -> Any: ...

    def mod(self, a: Any, n: int) -> Any:
        """``a`` modulo a positive Python int ``n`` (for integers: a ring's next slot)."""
        ...

    def mask_below(self, buf: Any, x: Any, fill: float) -> Any:
        """``buf`` with every entry below ``x`` replaced by ``fill``."""
        ...

    def count_at_least(self, buf: Any, x: Any) -> Any:
        """How many entries of ``buf`` are ``>= x`` (an integer)."""
        ...

    def keep_first(self, buf: Any, n: Any) -> Any:
        """``buf`` with its first ``n`` entries kept and the rest set to 0 (a buffer whose first
        ``n`` slots are in use, the others cleared)."""
        ...

    def arange_like(self, buf: Any) -> Any:
        """The positions of ``buf``'s elements, ``0 .. len(buf) - 1`` (integers)."""
        ...

    def concat(self, parts: Sequence[Any]) -> Any:
        """1-D arrays end to end."""
        ...

    def searchsorted(self, buf: Any, x: Any, right: bool) -> Any:
        """Where ``x`` goes in ascending ``buf``: the number of elements ``<= x`` (``right``) or
        ``< x``."""
        ...


class _Host:
    """Python numbers; lists for buffers."""

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b

    @staticmethod
    def sqrt(x: float) -> float:
        return math.sqrt(x)

    @staticmethod
    def log(x: float) -> float:
        return math.log(x) if x > 0 or math.isnan(x) else -math.inf

    @staticmethod
    def exp(x: float) -> float:
        return math.exp(x) if x < 709.0 else math.inf

    @staticmethod
    def power(base: float, exponent: float) -> float:
        return cast(float, base**exponent)  # typeshed: float ** float may be complex

    @staticmethod
    def minimum(a: float, b: float) -> float:
        return min(a, b)

    @staticmethod
    def maximum(a: float, b: float) -> float:
        return max(a, b)

    @staticmethod
    def isfinite(x: float) -> bool:
        return math.isfinite(x)

    @staticmethod
    def logical_and(a: bool, b: bool) -> bool:
        return bool(a and b)

    @staticmethod
    def logical_or(a: bool, b: bool) -> bool:
        return bool(a or b)

    @staticmethod
    def logical_not(a: bool) -> bool:
        return not a

    @staticmethod
    def any(a: Any) -> bool:
        return any(a) if isinstance(a, list) else bool(a)

    @staticmethod
    def as_float(x: Any) -> float:
        return float(x)

    @staticmethod
    def as_int(x: Any) -> int:
        return int(x)

    @staticmethod
    def full_like(x: Any, value: float) -> Any:
        return [value] * len(x) if isinstance(x, list) else value

    @staticmethod
    def moments(buf: list[float], used: bool = True) -> tuple[float, float]:
        if not used:
            return 0.0, 0.0
        n = len(buf)
        mean = sum(buf) / n
        # A product, not ``** 2``: the same correctly rounded square, and inf instead of an
        # OverflowError for a huge norm.
        return mean, sum((b - mean) * (b - mean) for b in buf) / n

    @staticmethod
    def window_moments(buf: Sequence[float], n: int) -> tuple[float, float]:
        w = buf if n == len(buf) else list(buf)[:n]
        mean = sum(w) / max(n, 1)
        return mean, sum((v - mean) * (v - mean) for v in w) / max(n - 1, 1)

    @staticmethod
    def window_median_mad(buf: Sequence[float], n: int) -> tuple[float, float]:
        if n <= 0:
            return math.inf, math.inf
        w = sorted(list(buf)[:n])
        med = _middle(w)
        return med, _middle(sorted(abs(v - med) for v in w))

    @staticmethod
    def ring_trend(buf: Sequence[float], count: int) -> tuple[float, float]:
        w = ring_in_order(buf, count)
        n = len(w)
        if n < 2:
            return math.inf, math.inf
        mx, my = (n - 1) / 2, math.fsum(w) / n
        slope = math.fsum((x - mx) * (y - my) for x, y in enumerate(w)) / math.fsum(
            (x - mx) ** 2 for x in range(n)
        )
        res = sorted(y - (my + slope * (x - mx)) for x, y in enumerate(w))
        med = _middle(res)
        return my + slope * (n - mx), _middle(sorted(abs(r - med) for r in res))

    @staticmethod
    def put(buf: list[float], index: int, value: float, when: bool) -> list[float]:
        if not when:
            return buf
        out = list(buf)
        out[index] = value
        return out

    @staticmethod
    def take(buf: Sequence[float], index: float) -> float:
        return buf[int(index)]

    @staticmethod
    def floor(x: float) -> float:
        return float(math.floor(x))

    @staticmethod
    def mod(a: int, n: int) -> int:
        return a % n

    @staticmethod
    def mask_below(buf: Sequence[Any], x: Any, fill: Any) -> list[Any]:
        return [v if v >= x else fill for v in buf]

    @staticmethod
    def count_at_least(buf: Sequence[Any], x: Any) -> int:
        return sum(1 for v in buf if v >= x)

    @staticmethod
    def keep_first(buf: Sequence[float], n: int) -> list[float]:
        n = max(0, min(int(n), len(buf)))
        return [*buf[:n], *([0.0] * (len(buf) - n))]

    @staticmethod
    def arange_like(buf: Sequence[float]) -> list[int]:
        return list(range(len(buf)))

    @staticmethod
    def concat(parts: Sequence[Sequence[float]]) -> list[float]:
        return [v for part in parts for v in part]

    @staticmethod
    def searchsorted(buf: Sequence[float], x: float, right: bool) -> int:
        return (bisect.bisect_right if right else bisect.bisect_left)(buf, x)


def ring_in_order(buf: Sequence[float], count: int) -> list[float]:
    """A host ring's entries oldest first: ``count`` written so far, each at slot
    ``count % len(buf)``, so the last ``min(count, len(buf))`` are held."""
    size = len(buf)
    if count <= size:
        return list(buf[:count])
    at = count % size
    return [*buf[at:], *buf[:at]]


def _middle(w: Sequence[float]) -> float:
    """The median of an ascending, non-empty list."""
    n = len(w)
    return (w[(n - 1) // 2] + w[n // 2]) / 2


class _Torch:
    """Tensors, with no host sync."""

    @staticmethod
    def where(cond: Tensor, a: Any, b: Any) -> Tensor:
        return torch.where(cond, a, b)

    @staticmethod
    def sqrt(x: Tensor) -> Tensor:
        return x.sqrt()

    @staticmethod
    def log(x: Tensor) -> Tensor:
        return torch.log(x)

    @staticmethod
    def exp(x: Tensor) -> Tensor:
        return torch.exp(x)

    @staticmethod
    def power(base: float, exponent: Tensor) -> Tensor:
        return base**exponent

    @staticmethod
    def minimum(a: Tensor, b: Any) -> Tensor:
        return a.clamp(max=b) if isinstance(b, (int, float)) else torch.minimum(a, b)

    @staticmethod
    def maximum(a: Tensor, b: Any) -> Tensor:
        return a.clamp(min=b) if isinstance(b, (int, float)) else torch.maximum(a, b)

    @staticmethod
    def isfinite(x: Tensor) -> Tensor:
        return torch.isfinite(x)

    @staticmethod
    def logical_and(a: Tensor, b: Tensor) -> Tensor:
        return a & b

    @staticmethod
    def logical_or(a: Tensor, b: Tensor) -> Tensor:
        return a | b

    @staticmethod
    def logical_not(a: Tensor) -> Tensor:
        return ~a

    @staticmethod
    def any(a: Tensor) -> Tensor:
        return a.any()

    @staticmethod
    def as_float(x: Tensor) -> Tensor:
        return x.float()

    @staticmethod
    def as_int(x: Tensor) -> Tensor:
        return x.long()

    @staticmethod
    def full_like(x: Tensor, value: float) -> Tensor:
        return torch.full_like(x, value)

    @staticmethod
    def moments(buf: Tensor, used: Any = True) -> tuple[Tensor, Tensor]:
        mean = buf.mean()
        return mean, (buf - mean).square().mean()

    @staticmethod
    def window_moments(buf: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        valid = torch.arange(buf.numel(), device=buf.device) < n
        nf = n.float()
        mean = torch.where(valid, buf, 0.0).sum() / nf.clamp(min=1.0)
        ss = torch.where(valid, (buf - mean).square(), 0.0).sum()
        return mean, ss / (nf - 1.0).clamp(min=1.0)

    @staticmethod
    def window_median_mad(buf: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        valid = torch.arange(buf.numel(), device=buf.device) < n
        lo = torch.div(n - 1, 2, rounding_mode="floor").clamp(min=0).reshape(1)
        hi = torch.div(n, 2, rounding_mode="floor").clamp(max=buf.numel() - 1).reshape(1)

        def middle(v: Tensor) -> Tensor:
            w = torch.where(valid, v, math.inf).sort().values
            return ((w.index_select(0, lo) + w.index_select(0, hi)) / 2).reshape(())

        med = middle(buf)
        mad = middle(torch.where(valid, (buf - med).abs(), 0.0))
        none = n <= 0
        return torch.where(none, math.inf, med), torch.where(none, math.inf, mad)

    @staticmethod
    def ring_trend(buf: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        size = buf.numel()
        k = torch.arange(size, device=buf.device)
        n = torch.clamp(count, max=size)
        start = torch.where(count > size, torch.remainder(count, size), 0)
        w = buf.index_select(0, torch.remainder(k + start, size))  # oldest first
        valid = k < n
        nf = n.to(buf.dtype)
        x = k.to(buf.dtype)
        mx = (nf - 1) / 2
        my = torch.where(valid, w, 0.0).sum() / nf.clamp(min=1.0)
        dx = torch.where(valid, x - mx, 0.0)
        slope = (dx * (w - my)).sum() / (dx * dx).sum().clamp(min=1e-30)
        _, mad = _Torch.window_median_mad(w - (my + slope * (x - mx)), n)
        few = n < 2
        return torch.where(few, math.inf, my + slope * (nf - mx)), torch.where(few, math.inf, mad)

    @staticmethod
    def put(buf: Tensor, index: Tensor, value: Tensor, when: Tensor) -> Tensor:
        # index_select/scatter with a device index: indexing by a 0-dim tensor would sync.
        slot = index.reshape(1)
        current = buf.index_select(0, slot)
        return buf.scatter(0, slot, torch.where(when, value, current).reshape(1))

    @staticmethod
    def take(buf: Tensor, index: Tensor) -> Tensor:
        # index_select with a device index: indexing by a 0-dim tensor would sync.
        return buf.index_select(0, index.long().reshape(1)).reshape(())

    @staticmethod
    def floor(x: Tensor) -> Tensor:
        return x.floor()

    @staticmethod
    def mod(a: Tensor, n: int) -> Tensor:
        return torch.remainder(a, n)

    @staticmethod
    def mask_below(buf: Tensor, x: Any, fill: float) -> Tensor:
        return torch.where(buf >= x, buf, fill)

    @staticmethod
    def count_at_least(buf: Tensor, x: Any) -> Tensor:
        at_least: Tensor = buf >= x
        return at_least.sum()

    @staticmethod
    def keep_first(buf: Tensor, n: Tensor) -> Tensor:
        return torch.where(torch.arange(buf.numel(), device=buf.device) < n, buf, 0.0)

    @staticmethod
    def arange_like(buf: Tensor) -> Tensor:
        return torch.arange(buf.numel(), device=buf.device)

    @staticmethod
    def concat(parts: Sequence[Tensor]) -> Tensor:
        return torch.cat(list(parts))

    @staticmethod
    def searchsorted(buf: Tensor, x: Tensor, right: bool) -> Tensor:
        return torch.searchsorted(buf, x.reshape(1), right=right)


#: Python numbers (the host path).
HOST: ArrayNamespace = _Host()
#: torch tensors (the device path).
TORCH: ArrayNamespace = _Torch()
