"""Skip the optimizer step: on non-finite gradients or loss, or on a finite outlier."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from .._lazy import torch
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
            bad_layers: torch.Tensor | list[int] = (
                ~torch.isfinite(ctx.stats.raw_layer_norms) if ctx.stats.grads else []
            )
            ctx.record(self.name, True, bad_layers)


@register
class skip_spike(Policy):
    """Skip a step whose gradient norm (or loss) is a finite outlier.

    OLMo-core's ``SkipStepOptimizer`` rule: over a rolling window of the previous ``window``
    values (default 128), skip when the current value is more than ``z`` sample standard
    deviations (default 6) above their mean (one-sided), once the window holds ``warmup`` values
    counting the current one (default ``max(2, window // 2)``, as OLMo-core).

    ``admit`` (default 8): after this many finite outliers in a row the level has shifted, not
    spiked (the gradient norm of an LSTM that starts to learn rises tenfold and stays there). Those
    ``admit`` steps are skipped, then the window restarts from those outliers alone (the last
    ``window`` of them), so the next values are compared with the new level (the warmup applies
    again, as at the start of training, to a window that already holds them). A single spike or a
    burst of fewer than ``admit`` outliers is skipped and never enters the window; a burst of
    ``admit`` or more is taken for a new level. Any value that is not a finite outlier (a normal
    value, a NaN, an Inf) ends the run; the gradient norm and the loss each have their own run.
    ``admit`` must stay below the Guard's ``max_consecutive_skips`` (default 20; the Guard refuses
    it otherwise), or a shift would stop the run with a :class:`~gradguard.errors.StallError`
    before it is admitted. 8: long enough that a burst of spikes is rarely taken for a shift,
    short enough to leave room below the Guard's limit for a few other skips around it.

    Where we differ from OLMo-core, on purpose: a skipped value does not enter the window (in
    OLMo-core every value does, so one spike inflates the deviation and blinds the detector for
    the next ``window`` steps, and one NaN makes every later comparison false, which skips every
    later step); a non-finite value is skipped without being compared; at least two earlier
    values are needed (OLMo-core with ``warmup=2`` compares against the NaN deviation of one
    value, which skips); and ``admit`` finite outliers in a row restart the window from them
    (OLMo-core has no such rule: every value enters its window anyway).

    ``on``: ``grad_norm``, ``loss`` or ``both`` (the loss part needs ``guard.step(loss=...)``).

    State: the window of each (``grad_norm``, ``loss``) and the current run of outliers of each
    (``grad_norm_outliers``, ``loss_outliers``: fewer than ``admit`` values). A state saved
    before ``admit`` existed has no runs and loads with none pending.
    """

    name = "skip_spike"
    needs_host = True
    kind = "skip"

    def __init__(
        self,
        z: float = 6.0,
        window: int = 128,
        warmup: int | None = None,
        on: str = "both",
        admit: int = 8,
    ):
        super().__init__()
        _check_positive(self.name, "z", z)
        if not isinstance(window, int) or window < 2:
            raise SpecError(f"window must be an integer >= 2, got {window!r}")
        if warmup is not None and (not isinstance(warmup, int) or not 2 <= warmup <= window):
            raise SpecError(f"warmup must be an integer in [2, window={window}], got {warmup!r}")
        if on not in ("grad_norm", "loss", "both"):
            raise SpecError(f"on must be one of grad_norm, loss, both; got {on!r}")
        if not isinstance(admit, int) or isinstance(admit, bool) or admit < 2:
            raise SpecError(f"admit must be an integer >= 2, got {admit!r}")
        self.z = float(z)
        self.window = window
        self.warmup = warmup
        self.on = on
        self.admit = admit
        self.state = {"grad_norm": [], "loss": []}
        self._windows: dict[str, deque[float]] = {
            k: deque(maxlen=window) for k in ("grad_norm", "loss")
        }
        # The current run of consecutive finite outliers of each, oldest first (< admit values).
        self._outliers: dict[str, list[float]] = {k: [] for k in self._windows}

    def apply(self, ctx: StepContext) -> None:
        host = ctx.host
        assert host is not None
        values = {}
        if self.on in ("grad_norm", "both"):
            values["grad_norm"] = host.norm
        if self.on in ("loss", "both") and host.loss is not None:
            values["loss"] = host.loss
        spiked = []
        for k, v in values.items():
            outlier = is_outlier(HOST, self, self._windows[k], v)
            if outlier or not math.isfinite(v):
                spiked.append(k)
            run = self._outliers[k]
            shifted, n = outlier_run(HOST, self, outlier, len(run))
            if shifted:  # the level has moved: the window restarts from the run, v included
                self._windows[k] = deque([*run, v], maxlen=self.window)
            self._outliers[k] = [*run, v][-n:] if n else []
        if spiked:
            ctx.request_skip("spike_" + "_".join(spiked))
            ctx.record(self.name, True)
            ctx.metrics["skip_spike.on"] = float(len(spiked))
            return
        for k, v in values.items():
            self._windows[k].append(v)

    def spiked(self, ctx: StepContext) -> bool:
        """It skipped this step for a spike (a finite outlier, or a non-finite value)."""
        return ctx.acted.get(self.name) is True and (ctx.skip_reason or "").startswith("spike_")

    def state_dict(self) -> dict[str, Any]:
        state = {k: list(w) for k, w in self._windows.items()}
        state.update({f"{k}_outliers": list(run) for k, run in self._outliers.items()})
        return state

    def check_state(self, state: Any) -> None:
        """Both windows (``grad_norm``, ``loss``): at most ``window`` finite values, the norms >= 0
        (a NaN in a window would make every later mean NaN: no spike detected again); both runs of
        outliers (``grad_norm_outliers``, ``loss_outliers``, absent in a state saved before
        ``admit`` existed): fewer than ``admit`` finite values (``admit`` in a row restart the
        window at once), the norms >= 0."""
        runs = [f"{k}_outliers" for k in self._windows]
        check_keys(self.name, state, [*self._windows, *runs], optional=runs)
        for k in self._windows:
            check_numbers(self.name, k, state[k], nonneg=k == "grad_norm", max_length=self.window)
            if f"{k}_outliers" in state:
                check_numbers(
                    self.name,
                    f"{k}_outliers",
                    state[f"{k}_outliers"],
                    nonneg=k == "grad_norm",
                    max_length=self.admit - 1,
                )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self._windows:
            self._windows[k] = deque((float(v) for v in state.get(k, [])), maxlen=self.window)
            self._outliers[k] = [float(v) for v in state.get(f"{k}_outliers", [])]


def is_outlier(xp: ArrayNamespace, p: skip_spike, window: Any, x: Any, filled: Any = None) -> Any:
    """skip_spike's test, written once (the torch Guard on host floats, Keras on ``keras.ops``):
    whether ``x`` is finite and more than ``p.z`` sample standard deviations above the mean of the
    first ``filled`` values of ``window`` (all of them by default), once those and ``x`` number
    ``warmup`` (``need`` counts the current value, as OLMo-core) and at least two came before
    it."""
    n = len(window) if filled is None else filled
    need = p.warmup if p.warmup is not None else max(2, p.window // 2)
    mean, var = xp.window_moments(window, n)
    ready = xp.logical_and(n + 1 >= need, n >= 2)
    # isfinite first: an Inf is above any mean, but it is no level a run could shift to.
    above = xp.logical_and(ready, x - mean > p.z * xp.sqrt(var))
    return xp.logical_and(xp.isfinite(x), above)


def is_spike(xp: ArrayNamespace, p: skip_spike, window: Any, x: Any, filled: Any = None) -> Any:
    """Whether skip_spike skips ``x``: non-finite, or a finite outlier (:func:`is_outlier`)."""
    return xp.logical_or(xp.logical_not(xp.isfinite(x)), is_outlier(xp, p, window, x, filled))


def outlier_run(xp: ArrayNamespace, p: skip_spike, outlier: Any, run: Any) -> tuple[Any, Any]:
    """skip_spike's level-shift rule, written once: ``(shifted, run)`` after a value that is a
    finite outlier or not (``outlier``, from :func:`is_outlier`), ``run`` finite outliers in a row
    having come before it. ``shifted``: this outlier is the ``p.admit``-th in a row, so the level
    has moved and the window restarts from the run; the new run is then 0, as after any value that
    is not a finite outlier (a normal value, a NaN, an Inf), and ``run + 1`` after any other
    outlier (always below ``admit``)."""
    shifted = xp.logical_and(outlier, run + 1 >= p.admit)
    grows = xp.logical_and(outlier, xp.logical_not(shifted))
    return shifted, xp.where(grows, run + 1, 0 * run)
