"""The policies' array namespace (:class:`gradguard.policies.xp.ArrayNamespace`) in ``keras.ops``:
every backend, eager or compiled. Defined here so that importing gradguard never imports Keras."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops

from ..policies.xp import ArrayNamespace


class _Keras:
    """``keras.ops``; integers are int32 (every backend has them), floats float32."""

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return ops.where(cond, a, b)

    @staticmethod
    def sqrt(x: Any) -> Any:
        return ops.sqrt(x)

    @staticmethod
    def log(x: Any) -> Any:
        return ops.log(x)

    @staticmethod
    def exp(x: Any) -> Any:
        return ops.exp(x)

    @staticmethod
    def power(base: float, exponent: Any) -> Any:
        return ops.power(base, exponent)

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        return ops.minimum(a, b)

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return ops.maximum(a, b)

    @staticmethod
    def isfinite(x: Any) -> Any:
        return ops.isfinite(x)

    @staticmethod
    def logical_and(a: Any, b: Any) -> Any:
        return ops.logical_and(a, b)

    @staticmethod
    def logical_or(a: Any, b: Any) -> Any:
        return ops.logical_or(a, b)

    @staticmethod
    def logical_not(a: Any) -> Any:
        return ops.logical_not(a)

    @staticmethod
    def any(a: Any) -> Any:
        return ops.any(a)

    @staticmethod
    def as_float(x: Any) -> Any:
        return ops.cast(x, "float32")

    @staticmethod
    def as_int(x: Any) -> Any:
        return ops.cast(x, "int32")

    @staticmethod
    def full_like(x: Any, value: float) -> Any:
        return ops.full_like(x, value)

    @staticmethod
    def moments(buf: Any, used: Any = True) -> tuple[Any, Any]:
        mean = ops.mean(buf)
        return mean, ops.mean(ops.square(buf - mean))

    @staticmethod
    def window_moments(buf: Any, n: Any) -> tuple[Any, Any]:
        valid = ops.arange(buf.shape[0], dtype="int32") < n
        nf = ops.cast(n, "float32")
        mean = ops.sum(ops.where(valid, buf, 0.0)) / ops.maximum(nf, 1.0)
        ss = ops.sum(ops.where(valid, ops.square(buf - mean), 0.0))
        return mean, ss / ops.maximum(nf - 1.0, 1.0)

    @staticmethod
    def window_median_mad(buf: Any, n: Any) -> tuple[Any, Any]:
        size = buf.shape[0]
        valid = ops.arange(size, dtype="int32") < n
        lo = ops.maximum(ops.floor_divide(n - 1, 2), 0)
        hi = ops.minimum(ops.floor_divide(n, 2), size - 1)

        def middle(v: Any) -> Any:
            w = ops.sort(ops.where(valid, v, float("inf")))
            return (ops.take(w, lo) + ops.take(w, hi)) / 2.0

        med = middle(buf)
        mad = middle(ops.where(valid, ops.abs(buf - med), 0.0))
        none = n <= 0
        return ops.where(none, float("inf"), med), ops.where(none, float("inf"), mad)

    @staticmethod
    def ring_trend(buf: Any, count: Any) -> tuple[Any, Any]:
        size = buf.shape[0]
        k = ops.arange(size, dtype="int32")
        n = ops.minimum(count, size)
        start = ops.where(count > size, ops.mod(count, size), 0)
        w = ops.take(buf, ops.mod(k + start, size))  # oldest first
        valid = k < n
        nf = ops.cast(n, "float32")
        x = ops.cast(k, "float32")
        mx = (nf - 1.0) / 2.0
        my = ops.sum(ops.where(valid, w, 0.0)) / ops.maximum(nf, 1.0)
        dx = ops.where(valid, x - mx, 0.0)
        slope = ops.sum(dx * (w - my)) / ops.maximum(ops.sum(dx * dx), 1e-30)
        _, mad = _Keras.window_median_mad(w - (my + slope * (x - mx)), n)
        few = n < 2
        inf = float("inf")
        return ops.where(few, inf, my + slope * (nf - mx)), ops.where(few, inf, mad)

    @staticmethod
    def put(buf: Any, index: Any, value: Any, when: Any) -> Any:
        # A mask, not a scatter: portable to every backend and to XLA.
        at = ops.arange(buf.shape[0], dtype="int32") == index
        return ops.where(ops.logical_and(when, at), value, buf)

    @staticmethod
    def take(buf: Any, index: Any) -> Any:
        return ops.take(buf, ops.cast(index, "int32"))

    @staticmethod
    def floor(x: Any) -> Any:
        return ops.floor(x)

    @staticmethod
    def mod(a: Any, n: int) -> Any:
        return ops.mod(a, n)

    @staticmethod
    def mask_below(buf: Any, x: Any, fill: float) -> Any:
        return ops.where(buf >= x, buf, ops.cast(fill, buf.dtype))

    @staticmethod
    def count_at_least(buf: Any, x: Any) -> Any:
        return ops.sum(ops.cast(buf >= x, "int32"))

    @staticmethod
    def keep_first(buf: Any, n: Any) -> Any:
        return ops.where(ops.arange(buf.shape[0], dtype="int32") < n, buf, 0.0)

    @staticmethod
    def arange_like(buf: Any) -> Any:
        return ops.arange(buf.shape[0], dtype="int32")

    @staticmethod
    def concat(parts: Sequence[Any]) -> Any:
        return ops.concatenate(list(parts))

    @staticmethod
    def searchsorted(buf: Any, x: Any, right: bool) -> Any:
        # A count, O(n) elementwise: portable to every backend and to XLA.
        return ops.sum(ops.cast(buf <= x if right else buf < x, "int32"))


#: ``keras.ops`` as the policies' array namespace.
KERAS: ArrayNamespace = _Keras()
