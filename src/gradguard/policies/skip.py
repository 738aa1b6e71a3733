"""Skip the optimizer step: on non-finite gradients or loss, or on a finite outlier."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

from ..errors import SpecError
from .base import Policy, StepContext, check_keys, check_numbers
from .clip import _check_positive
from .registry import register
from .xp import HOST, ArrayNamespace


@register
class skip_nonfinite(Policy):
    """Skip the step when any gradient (or the loss, if given) holds a NaN or Inf.

    The optimizer step does not happen: weights, optimizer state and step counters stay
    bit-identical (and the LR scheduler is the user's to step or not); the gradients are zeroed.
    The layers whose gradient went non-finite are reported.
    """

    name = "skip_nonfinite"
    needs_host = True
    kind = "skip"

    def apply(self, ctx: StepContext) -> None:
        host = ctx.host
        assert host is not None
        bad_loss = host.loss is not None and not math.isfinite(host.loss)
        if not host.finite or bad_loss:
            ctx.request_skip("nonfinite_grad" if not host.finite else "nonfinite_loss")
            bad_layers = ~torch.isfinite(ctx.stats.raw_layer_norms) if ctx.stats.grads else []
            ctx.record(self.name, True, bad_layers)


@register
class skip_spike(Policy):
    """Skip a step whose gradient norm (or loss) is a finite outlier.

    OLMo-core's ``SkipStepOptimizer`` rule: over a rolling window of the previous ``window``
    values (default 128), skip when the current value is more than ``z`` sample standard
    deviations (default 6) above their mean (one-sided), once the window holds ``warmup`` values
    counting the current one (default ``max(2, window // 2)``, as OLMo-core). Where we differ, on
    purpose: a skipped value does not enter the window (in OLMo-core every value does, so one
    spike inflates the deviation and blinds the detector for the next ``window`` steps, and one
    NaN makes every later comparison false, which skips every later step); a non-finite value is
    skipped without being compared; at least two earlier values are needed (OLMo-core with
    ``warmup=2`` compares against the NaN deviation of one value, which skips).

    ``on``: ``grad_norm``, ``loss`` or ``both`` (the loss part needs ``guard.step(loss=...)``).
    """

    name = "skip_spike"
    needs_host = True
    kind = "skip"

    def __init__(
        self, z: float = 6.0, window: int = 128, warmup: int | None = None, on: str = "both"
    ):
        super().__init__()
        _check_positive(self.name, "z", z)
        if not isinstance(window, int) or window < 2:
            raise SpecError(f"window must be an integer >= 2, got {window!r}")
        if warmup is not None and (not isinstance(warmup, int) or not 2 <= warmup <= window):
            raise SpecError(f"warmup must be an integer in [2, window={window}], got {warmup!r}")
        if on not in ("grad_norm", "loss", "both"):
            raise SpecError(f"on must be one of grad_norm, loss, both; got {on!r}")
        self.z = float(z)
        self.window = window
        self.warmup = warmup
        self.on = on
        self.state = {"grad_norm": [], "loss": []}
        self._windows = {k: deque(maxlen=window) for k in ("grad_norm", "loss")}

    def apply(self, ctx: StepContext) -> None:
        host = ctx.host
        assert host is not None
        values = {}
        if self.on in ("grad_norm", "both"):
            values["grad_norm"] = host.norm
        if self.on in ("loss", "both") and host.loss is not None:
            values["loss"] = host.loss
        spiked = [k for k, v in values.items() if is_spike(HOST, self, self._windows[k], v)]
        if spiked:
            ctx.request_skip("spike_" + "_".join(spiked))
            ctx.record(self.name, True)
            ctx.metrics["skip_spike.on"] = float(len(spiked))
            return
        for k, v in values.items():
            self._windows[k].append(v)

    def state_dict(self) -> dict:
        return {k: list(w) for k, w in self._windows.items()}

    def check_state(self, state) -> None:
        """Both windows (``grad_norm``, ``loss``): at most ``window`` finite values, the norms >= 0
        (a NaN in a window would make every later mean NaN: no spike detected again)."""
        check_keys(self.name, state, self._windows)
        for k in self._windows:
            check_numbers(self.name, k, state[k], nonneg=k == "grad_norm", max_length=self.window)

    def load_state_dict(self, state: dict) -> None:
        for k in self._windows:
            self._windows[k] = deque((float(v) for v in state.get(k, [])), maxlen=self.window)


def is_spike(xp: ArrayNamespace, p: skip_spike, window: Any, x: Any, filled: Any = None) -> Any:
    """skip_spike's test, written once (the torch Guard on host floats, Keras on ``keras.ops``):
    whether ``x`` is non-finite or more than ``p.z`` sample standard deviations above the mean of
    the first ``filled`` values of ``window`` (all of them by default), once those and ``x``
    number ``warmup`` (``need`` counts the current value, as OLMo-core) and at least two came
    before it."""
    n = len(window) if filled is None else filled
    need = p.warmup if p.warmup is not None else max(2, p.window // 2)
    mean, var = xp.window_moments(window, n)
    ready = xp.logical_and(n + 1 >= need, n >= 2)
    outlier = xp.logical_and(ready, x - mean > p.z * xp.sqrt(var))
    return xp.logical_or(xp.logical_not(xp.isfinite(x)), outlier)
