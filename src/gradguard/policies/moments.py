"""Reset the optimizer's moment buffers for the parameters whose gradient spiked, and keep the
spike out of the fresh moments (SPAM's momentum reset, Huang et al. 2025, made spike-triggered)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import np, torch
from ..actions import moment_keys
from ..errors import SpecError
from .base import Policy, StepContext, check_keys, check_number, check_numbers
from .clip import _check_positive
from .registry import register

if TYPE_CHECKING:
    from ..layout import ParamLayout


@register
class reset_moments(Policy):
    """On a gradient spike, reset the optimizer's moment buffers for the affected parameters and
    keep the spiking gradient out of them.

    Detection per parameter: the mean and variance of each parameter's gradient norm (plain over
    the first ``warmup`` steps, then exponentially moving with decay ``beta``); after warmup a
    parameter whose norm is more than ``z`` standard deviations above its mean is "affected".
    Its moments (Adam's m and v, SGD's momentum, ...) are zeroed, so the spikes already absorbed
    do not linger in them for the next ~1/(1-beta2) steps, *and its gradient is dropped for this
    step* (set to ``None``: every torch optimizer then leaves that parameter, its state and its
    step count alone), so the spike does not enter the fresh moments either. Dropping, not
    clipping: a spike concentrated in a few elements stays concentrated in them when the tensor is
    scaled down to its running norm, and would still put ~``numel`` times the usual square into
    those elements' second moment. The other parameters step as usual.

    ``every=N`` also resets all moments periodically, on SPAM's schedule: SPAM increments its step
    counter before checking it, so with 0-based steps it resets before steps N-1, 2N-1, ...
    (off by default; SPAM's DeltaT is 500). A periodic reset keeps the gradients. SPAM itself is
    periodic only; its spike handling is a per-element clip (``g^2 > theta*v``), which this policy
    does not do.

    With ``reset_step`` the step counter restarts too, so Adam's bias correction restarts and the
    first update after a reset is an ordinary first Adam step; SPAM keeps the counter and ramps
    the LR back over 150 steps instead. Works with any torch optimizer, without swapping it.
    Detection runs on the per-parameter norms the Guard reads once per step; only an actual reset
    touches optimizer state.
    """

    name = "reset_moments"
    keras_refusal = (
        "it zeroes one parameter's moments and restarts that parameter's step count, but Keras "
        "optimizers share one iteration counter across all variables (Adam's bias correction), so "
        "the reset cannot be done exactly"
    )
    kind = "reset"
    needs_host = True
    needs_host_param_norms = True

    def __init__(
        self,
        z: float = 6.0,
        beta: float = 0.98,
        warmup: int = 25,
        every: int | None = None,
        reset_step: bool = True,
    ):
        super().__init__()
        _check_positive(self.name, "z", z)
        if not 0.0 < beta < 1.0:
            raise SpecError(f"beta must be in (0, 1), got {beta!r}")
        if not isinstance(warmup, int) or warmup < 1:
            raise SpecError(f"warmup must be an integer >= 1, got {warmup!r}")
        if every is not None and (not isinstance(every, int) or every < 1):
            raise SpecError(f"every must be a positive integer or None, got {every!r}")
        self.z = float(z)
        self.beta = float(beta)
        self.warmup = warmup
        self.every = every
        self.reset_step = bool(reset_step)
        self.state = {"mean": None, "var": None, "count": None, "resets": 0}

    def bind(self, layout: ParamLayout, optimizer: torch.optim.Optimizer) -> None:
        if self.state["mean"] is None:
            n = len(layout)
            self.state.update(mean=np.zeros(n), var=np.zeros(n), count=np.zeros(n, dtype=np.int64))

    def apply(self, ctx: StepContext) -> None:
        host = ctx.host
        assert host is not None and host.param_norms is not None
        stats = ctx.stats
        idx = np.asarray(stats.param_index, dtype=np.int64)
        x = np.asarray(host.param_norms, dtype=np.float64)
        mean, var, count = self.state["mean"], self.state["var"], self.state["count"]
        m, v, c = mean[idx], var[idx], count[idx]
        finite = np.isfinite(x)
        affected = finite & (c >= self.warmup) & (x - m > self.z * np.sqrt(v))
        periodic = self.every is not None and (ctx.step + 1) % self.every == 0
        targets = idx if periodic else idx[affected]
        if len(targets) and host.finite:
            # The Guard zeroes the moments and drops the spiking gradients (a policy decides).
            reset = [i for i in targets.tolist() if self._has_moments(ctx, stats.layout.params[i])]
            reset_layers = {stats.layout.layer_of[i] for i in reset}
            ctx.request_reset(reset, step=self.reset_step)
            if affected.any():
                ctx.request_drop(np.flatnonzero(affected).tolist())
                reset_layers.update(stats.layout.layer_of[i] for i in idx[affected].tolist())
            if reset_layers:
                self.state["resets"] += 1
                ctx.record(self.name, True, sorted(reset_layers))
        # Update the running statistics with the norms that were not spikes: plain running mean
        # and variance during warmup (an EMA started from one value would underestimate the
        # spread and fire on noise), an exponential moving one after it.
        upd = finite & ~affected
        delta = x - m
        warm = c < self.warmup
        rate = np.where(warm, 1.0 / (c + 1.0), 1.0 - self.beta)
        new_m = m + rate * delta
        new_v = np.where(
            warm,
            (c * v + delta * (x - new_m)) / (c + 1.0),
            self.beta * (v + (1 - self.beta) * delta**2),
        )
        mean[idx] = np.where(upd, new_m, m)
        var[idx] = np.where(upd, new_v, v)
        count[idx] = c + upd

    def _has_moments(self, ctx: StepContext, param: torch.Tensor) -> bool:
        return bool(moment_keys(ctx.optimizer, param, self.reset_step))

    def state_dict(self) -> dict[str, Any]:
        st = self.state
        return {
            "mean": np.asarray(st["mean"]).tolist(),
            "var": np.asarray(st["var"]).tolist(),
            "count": np.asarray(st["count"]).tolist(),
            "resets": st["resets"],
        }

    def check_state(self, state: Any) -> None:
        """``mean``, ``var`` (>= 0, finite) and ``count`` (integers >= 0), one value per guarded
        parameter; ``resets`` an integer >= 0."""
        check_keys(self.name, state, ("mean", "var", "count", "resets"))
        n = None if self.state["mean"] is None else len(self.state["mean"])
        for key in ("mean", "var", "count"):
            check_numbers(self.name, key, state[key], integer=key == "count", nonneg=True, length=n)
            n = len(state[key])  # the three agree with each other too
        check_number(self.name, "resets", state["resets"], integer=True, nonneg=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {
            "mean": np.asarray(state["mean"], dtype=np.float64),
            "var": np.asarray(state["var"], dtype=np.float64),
            "count": np.asarray(state["count"], dtype=np.int64),
            "resets": int(state["resets"]),
        }
