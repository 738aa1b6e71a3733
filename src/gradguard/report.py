"""What one guarded step did: :class:`StepReport`.

Values that live on the device (norms, whether a clip engaged) are read only when asked for, so a
Guard with a clipping-only chain never forces a host sync; read ``report.grad_norm`` and you pay
for it then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from .stats import NormSummary

_T = TypeVar("_T")


def _bool(v: Tensor | bool) -> bool:
    return bool(v.item()) if isinstance(v, Tensor) else bool(v)


def _float(v: Tensor | float) -> float:
    return float(v.item()) if isinstance(v, Tensor) else float(v)


class StepReport:
    """The outcome of one ``Guard.step()``.

    Attributes:
        step: the Guard's step index (0-based; counts every call, skipped or not).
        skipped: the optimizer step did not happen (a skip, a rollback or an AMP overflow).
        skip_reason: why (``nonfinite_grad``, ``nonfinite_loss``, ``spike_grad_norm``, ``rollback``,
            ``runaway``, the reason of a ``StepContext.request_rollback``, ``amp_overflow``, ...),
            or None.
        rolled_back: the model and optimizer were restored to a snapshot (``rollback``; the steps
            it undid are in ``metrics["rollback.skipped_from"]``/``["rollback.skipped_to"]``).
        lr_scale: the factor applied to the LR for this step (``lr_backoff``, ``rollback`` after a
            runaway), 1.0 otherwise.
        localization: where a non-finite gradient started (a ``localization`` record), when the
            step was given a ``replay``; else None.
        rerun: the rerun attribution of a failing step given a ``replay``: ``"transient"`` (the
            rerun did not reproduce the failure: hardware, nondeterminism), ``"reproducible"`` (it
            did: the data or the model), or None (no rerun: a healthy step, or no ``replay``).
        rerun_detail: the rerun's ``result``, ``trigger`` (``nonfinite``/``spike``), ``grad_norm``
            and ``loss`` (and ``origin`` when it found one), or None.
    Lazy properties (host sync on first access): ``skipped`` and ``skip_reason`` of a
    ``sync_free`` Guard, ``grad_norm`` (global L2 norm before mitigation),
    ``grad_norm_after``, ``clipped``, ``actions`` (policies that acted), ``layers`` (per policy, the
    layer names involved), ``metrics``.
    """

    __slots__ = (
        "_acted",
        "_cache",
        "_layer_names",
        "_layer_stats",
        "_layers",
        "_metrics",
        "_norms",
        "_policy_kinds",
        "_skip_reason",
        "_skipped",
        "localization",
        "lr_scale",
        "rerun",
        "rerun_detail",
        "rolled_back",
        "step",
    )

    def __init__(
        self,
        step: int,
        norms: NormSummary,
        skipped: bool | Tensor,
        skip_reason: str | list[tuple[Tensor, str]] | None,
        rolled_back: bool,
        lr_scale: float,
        acted: Mapping[str, Tensor | bool],
        layers: Mapping[str, Tensor | list[int]],
        metrics: Mapping[str, Tensor | float],
        layer_names: list[str],
        policy_kinds: Mapping[str, str],
        layer_stats: bool = False,
    ):
        self.step = step
        self._norms = norms
        self._skipped = skipped
        self._skip_reason = skip_reason
        self.rolled_back = rolled_back
        self.lr_scale = lr_scale
        self._acted = dict(acted)
        self._layers = dict(layers)
        self._metrics = dict(metrics)
        self._layer_names = layer_names
        self._policy_kinds = policy_kinds
        self._layer_stats = layer_stats
        self._cache: dict[str, Any] = {}
        # Where a non-finite gradient started (a localization record), when the step had a replay.
        self.localization: dict[str, Any] | None = None
        # The rerun attribution, when a failing step had a replay (see the class docstring).
        self.rerun: str | None = None
        self.rerun_detail: dict[str, Any] | None = None

    @property
    def skipped(self) -> bool:
        """The optimizer step did not happen. (A ``sync_free`` Guard's skip is a device flag, read
        here on first access.)"""
        return self._memo("skipped", lambda: _bool(self._skipped))

    @property
    def skip_reason(self) -> str | None:
        """Why the step was skipped, or None. (A ``sync_free`` Guard's: the first of its
        ``(flag, reason)`` pairs whose flag is set.)"""
        reason = self._skip_reason
        if not isinstance(reason, list):
            return reason
        return self._memo("skip_reason", lambda: next((r for f, r in reason if _bool(f)), None))

    def _memo(self, key: str, fn: Callable[[], _T]) -> _T:
        if key not in self._cache:
            self._cache[key] = fn()
        return cast(_T, self._cache[key])  # what fn() returned for this key

    @property
    def grad_norm(self) -> float:
        return self._memo("grad_norm", lambda: _float(self._norms.norm))

    @property
    def grad_norm_after(self) -> float:
        """Global norm of the gradient the optimizer received (0.0 when the step was skipped)."""
        return self._memo(
            "grad_norm_after", lambda: 0.0 if self.skipped else _float(self._norms.norm_after())
        )

    @property
    def actions(self) -> tuple[str, ...]:
        """Names of the policies that acted this step, in chain order."""
        return self._memo("actions", lambda: tuple(k for k, v in self._acted.items() if _bool(v)))

    @property
    def clipped(self) -> bool:
        """Whether a clipping policy changed the gradient this step."""
        return any(self._policy_kinds.get(a) == "clip" for a in self.actions)

    @property
    def layers(self) -> dict[str, tuple[str, ...]]:
        """For each policy that acted and named layers: the layer names involved."""

        def build() -> dict[str, tuple[str, ...]]:
            out: dict[str, tuple[str, ...]] = {}
            for policy, spec in self._layers.items():
                if policy not in self.actions:
                    continue
                if isinstance(spec, Tensor):
                    idx = (
                        torch.nonzero(spec.reshape(-1)).reshape(-1).tolist()
                        if spec.dtype == torch.bool
                        else spec.tolist()
                    )
                else:
                    idx = list(spec)
                out[policy] = tuple(self._layer_names[i] for i in idx)
            return out

        return self._memo("layers", build)

    @property
    def layer_norms(self) -> dict[str, float] | None:
        """Per-layer gradient norm before mitigation (``Guard(layer_stats=True)``), else None."""
        if not self._layer_stats:
            return None
        return self._memo(
            "layer_norms",
            lambda: dict(
                zip(self._layer_names, self._norms.raw_layer_norms().tolist(), strict=True)
            ),
        )

    @property
    def metrics(self) -> dict[str, float]:
        return self._memo("metrics", lambda: {k: _float(v) for k, v in self._metrics.items()})

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "grad_norm": self.grad_norm,
            "grad_norm_after": self.grad_norm_after,
            "skipped": self.skipped,
            "skip_reason": self.skip_reason,
            "rolled_back": self.rolled_back,
            "clipped": self.clipped,
            "lr_scale": self.lr_scale,
            "actions": list(self.actions),
            "layers": {k: list(v) for k, v in self.layers.items()},
            "metrics": self.metrics,
            "rerun": self.rerun,
        }

    def __repr__(self) -> str:
        return (
            f"StepReport(step={self.step}, grad_norm={self.grad_norm:.4g}, grad_norm_after={self.grad_norm_after:.4g}, "
            f"skipped={self.skipped}, actions={list(self.actions)})"
        )


class Tally:
    """Counters whose increments may be device bools (a clip that may or may not have engaged):
    Python ints plus pending flags, summed only when read, so counting never syncs."""

    _FOLD_EVERY = 1024  # bounded memory: pending flags are summed on the device this often

    def __init__(self, keys: Iterable[str] = ()):
        self._ints: dict[str, int] = dict.fromkeys(keys, 0)
        self._pending: dict[str, list[Tensor]] = {}
        self._folded: dict[str, Tensor] = {}

    def add(self, key: str, value: Tensor | bool | int) -> None:
        if isinstance(value, Tensor):
            pending = self._pending.setdefault(key, [])
            pending.append(value)
            if len(pending) >= self._FOLD_EVERY:
                self._fold(key)
        else:
            self._ints[key] = self._ints.get(key, 0) + int(value)

    def _fold(self, key: str) -> None:
        total = torch.stack(self._pending.pop(key)).sum()
        prev = self._folded.get(key)
        self._folded[key] = total if prev is None else prev + total

    def read(self) -> dict[str, int]:
        for key in list(self._pending):
            self._fold(key)
        out = dict(self._ints)
        for key, t in self._folded.items():
            out[key] = out.get(key, 0) + int(t.item())
        self._ints, self._folded = out, {}
        return dict(out)

    def load(self, counts: Mapping[str, int]) -> None:
        self._pending, self._folded = {}, {}
        self._ints = {**dict.fromkeys(self._ints, 0), **{k: int(v) for k, v in counts.items()}}
