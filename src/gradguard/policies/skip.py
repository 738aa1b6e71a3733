"""Skip the optimizer step: on non-finite gradients or loss, or on a finite outlier."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .._lazy import torch
from ..errors import SpecError
from .base import Policy, StepContext, check_keys, check_numbers
from .clip import _check_positive
from .registry import register
from .rule import Decision, Field, RuleInputs, RulePolicy, initial_host_state
from .xp import ArrayNamespace, ring_in_order

#: The longest window (and run of outliers): each is held in a ring of that many slots.
MAX_WINDOW = 1_000_000


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
        if ctx.device_skip:
            self._apply_on_device(ctx)
            return
        host = ctx.host
        assert host is not None
        bad_loss = host.loss is not None and not math.isfinite(host.loss)
        if not host.finite or bad_loss:
            ctx.request_skip("nonfinite_grad" if not host.finite else "nonfinite_loss")
            bad_layers: torch.Tensor | list[int] = (
                ~torch.isfinite(ctx.stats.raw_layer_norms) if ctx.stats.grads else []
            )
            ctx.record(self.name, True, bad_layers)

    def _apply_on_device(self, ctx: StepContext) -> None:
        """``Guard(sync_free=True)``: the same test on the device, as the step's skip flag."""
        stats = ctx.stats
        bad_grad = ~stats.finite  # a norm that overflows float32 counts too (no rescue read)
        ctx.request_skip_if(bad_grad, "nonfinite_grad")
        bad = bad_grad
        if ctx.loss is not None:
            bad_loss = ~torch.isfinite(ctx.loss.detach().to(bad_grad.device).reshape(()))
            ctx.request_skip_if(bad_loss, "nonfinite_loss")
            bad = bad | bad_loss
        layers = ~torch.isfinite(stats.raw_layer_norms) if stats.grads else None
        ctx.record(self.name, bad, layers)


@register
class skip_spike(RulePolicy):
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
    metrics = ("skip_spike.on",)

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
        if not isinstance(window, int) or isinstance(window, bool) or not 2 <= window <= MAX_WINDOW:
            raise SpecError(
                f"window must be an integer in [2, {MAX_WINDOW}], got {window!r} (the window is "
                "held in a ring of that many slots; OLMo-core uses 128)"
            )
        if warmup is not None and (not isinstance(warmup, int) or not 2 <= warmup <= window):
            raise SpecError(f"warmup must be an integer in [2, window={window}], got {warmup!r}")
        if on not in ("grad_norm", "loss", "both"):
            raise SpecError(f"on must be one of grad_norm, loss, both; got {on!r}")
        if not isinstance(admit, int) or isinstance(admit, bool) or not 2 <= admit <= MAX_WINDOW:
            raise SpecError(f"admit must be an integer in [2, {MAX_WINDOW}], got {admit!r}")
        self.z = float(z)
        self.window = window
        self.warmup = warmup
        self.on = on
        self.admit = admit
        self.state = initial_host_state(self.fields())

    # ----- the rule, written once (host floats, keras.ops) ---------------------------------------
    @property
    def channels(self) -> tuple[str, ...]:
        """The values watched: the gradient norm and/or the loss (none where it is never given)."""
        out: tuple[str, ...] = ("grad_norm",) if self.on in ("grad_norm", "both") else ()
        if self.on in ("loss", "both") and self.given_loss:
            out += ("loss",)
        return out

    def without_loss(self) -> str | None:
        if self.on == "loss":
            return "on=loss watches the loss alone; use skip_spike:on=grad_norm"
        return None

    def fields(self, n_layers: int = 0) -> dict[str, Field]:
        # Per channel (the loss's prefixed ``loss_``): the window as a ring (``values``, its first
        # ``min(count, window)`` slots in use), the count of values it took, and the current run
        # of outliers (``outliers``, its first ``run`` slots, the rest 0).
        out = {}
        for ch in self.channels:
            pre = "" if ch == "grad_norm" else "loss_"
            out[pre + "values"] = Field((self.window,))
            out[pre + "count"] = Field(kind="int")
            out[pre + "outliers"] = Field((self.admit,))
            out[pre + "run"] = Field(kind="int")
        return out

    def decide(
        self, xp: ArrayNamespace, state: Mapping[str, Any], inputs: RuleInputs
    ) -> tuple[dict[str, Any], Decision]:
        values = {"grad_norm": inputs.raw_norm, "loss": inputs.loss}
        watched = [ch for ch in self.channels if values[ch] is not None]
        new = dict(state)
        fired: dict[str, Any] = {}
        outlier: dict[str, Any] = {}
        for ch in watched:
            pre, x = ("" if ch == "grad_norm" else "loss_"), values[ch]
            count = state[pre + "count"]
            filled = xp.minimum(count, self.window)
            outlier[ch] = is_outlier(xp, self, state[pre + "values"], x, filled=filled)
            fired[ch] = xp.logical_or(xp.logical_not(xp.isfinite(x)), outlier[ch])
        spiked: Any = False
        for f in fired.values():
            spiked = xp.logical_or(spiked, f)
        keep = xp.logical_not(spiked)  # a step skipped for either value enters neither window
        for ch in watched:
            pre, x = ("" if ch == "grad_norm" else "loss_"), values[ch]
            count, ring = state[pre + "count"], state[pre + "values"]
            taken = xp.put(ring, xp.mod(count, self.window), x, keep)
            # The run of outliers: this one goes to slot ``run``; the ``admit``-th restarts the
            # window from the run's last ``window`` values, oldest first (ring slots 0..).
            run = state[pre + "run"]
            shifted, new_run = outlier_run(xp, self, outlier[ch], run)
            pending = xp.put(state[pre + "outliers"], run, x, outlier[ch])
            kept = min(self.admit, self.window)
            seed = xp.concat([pending[self.admit - kept :], xp.full_like(ring, 0.0)[kept:]])
            new[pre + "values"] = xp.where(shifted, seed, taken)
            new[pre + "count"] = xp.where(shifted, kept, count + xp.as_int(keep))
            new[pre + "outliers"] = xp.keep_first(pending, new_run)
            new[pre + "run"] = new_run
        # The reason names the values that fired where that is known (the host); elsewhere
        # (Keras, whose one value is the gradient norm) every value watched.
        names = [ch for ch, f in fired.items() if f is True] or watched
        on: Any = 0.0
        for f in fired.values():
            on = on + xp.as_float(f)
        return new, Decision(
            skip=spiked,
            skip_reason="spike_" + "_".join(names),
            acted=spiked,
            metrics={"skip_spike.on": on},
        )

    def spiked(self, ctx: StepContext) -> bool:
        """It skipped this step for a spike (a finite outlier, or a non-finite value)."""
        return ctx.acted.get(self.name) is True and (ctx.skip_reason or "").startswith("spike_")

    # ----- state representation -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The saved form: each window oldest first, each run of outliers (the loss's empty when
        it is not watched)."""
        st = self.state
        out: dict[str, Any] = {}
        for ch in ("grad_norm", "loss"):
            pre = "" if ch == "grad_norm" else "loss_"
            if pre + "values" not in st:
                out[ch], out[f"{ch}_outliers"] = [], []
                continue
            out[ch] = ring_in_order(list(st[pre + "values"]), int(st[pre + "count"]))
            out[f"{ch}_outliers"] = list(st[pre + "outliers"])[: int(st[pre + "run"])]
        return out

    def check_state(self, state: Any) -> None:
        """Both windows (``grad_norm``, ``loss``): at most ``window`` finite values, the norms >= 0
        (a NaN in a window would make every later mean NaN: no spike detected again); both runs of
        outliers (``grad_norm_outliers``, ``loss_outliers``, absent in a state saved before
        ``admit`` existed): fewer than ``admit`` finite values (``admit`` in a row restart the
        window at once), the norms >= 0."""
        chans = ("grad_norm", "loss")
        runs = [f"{k}_outliers" for k in chans]
        check_keys(self.name, state, [*chans, *runs], optional=runs)
        for k in chans:
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
        st = initial_host_state(self.fields())
        for ch in self.channels:
            pre = "" if ch == "grad_norm" else "loss_"
            window = [float(v) for v in state.get(ch, [])][-self.window :]
            run = [float(v) for v in state.get(f"{ch}_outliers", [])][: self.admit - 1]
            st[pre + "values"] = window + [0.0] * (self.window - len(window))
            st[pre + "count"] = len(window)
            st[pre + "outliers"] = run + [0.0] * (self.admit - len(run))
            st[pre + "run"] = len(run)
        self.state = st


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
