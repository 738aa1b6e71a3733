"""Cut the learning rate after repeated incidents; restore it gradually once training is calm."""

from __future__ import annotations

import math
import statistics
from typing import Any

from ..errors import SpecError
from .base import Policy, StepContext, check_keys, check_number, check_numbers, refuse_state
from .registry import register
from .xp import HOST, ArrayNamespace

#: MAD to standard deviation for a normal distribution.
MAD_TO_STD = 1.4826


@register
class lr_backoff(Policy):
    """Multiply the LR by ``factor`` when ``events`` incidents (skipped or rolled-back steps, from
    the policies before it in the chain) happen within ``window`` steps; after ``window`` calm
    steps, grow it back geometrically so that one cut is undone over ``recover`` steps. The scale
    never goes below ``min_scale``.

    What counts: a skipped or rolled-back step, an instability a policy has already tested against
    the loss (``update_clip``'s persistently binding bound), and a finite spike that a clip
    mitigated (``adaptive_clip``'s). With ``loss_z > 0`` (default 0: off) a spike counts only where
    the step's loss is out of line too: above the median of the last ``loss_window`` finite losses
    by more than ``loss_z`` robust standard deviations (1.4826 x their median absolute deviation);
    without a loss given to ``guard.step(loss=...)``, or before 8 losses, every spike counts. That
    spares a run whose gradient norm rises while its loss falls (a CNN starting to learn, a rare
    hard batch), but on a run whose LR is too high the gradient spikes come before the loss shows
    anything, and waiting for the loss loses it: measured in docs/policies.md#the-default
    (``loss_z=2`` took the quick suite's LR 0.1 and 0.3 from 0.929 and 0.769 to 0.870 and 0.624
    over 10 seeds), so the default counts every spike.

    The scale is applied only around the optimizer step (the param groups' ``lr`` is restored right
    after), so LR schedulers see and set their own values untouched and compose with it.
    Runs after the detecting policies whatever its position in the chain.
    """

    name = "lr_backoff"
    kind = "react"

    def __init__(
        self,
        factor: float = 0.5,
        events: int = 2,
        window: int = 50,
        recover: int = 200,
        min_scale: float = 1e-3,
        loss_z: float = 0.0,
        loss_window: int = 32,
    ):
        super().__init__()
        if not 0.0 < factor < 1.0:
            raise SpecError(f"factor must be in (0, 1), got {factor!r}")
        for n, v in (
            ("events", events),
            ("window", window),
            ("recover", recover),
            ("loss_window", loss_window),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecError(f"{n} must be an integer >= 1, got {v!r}")
        if not 0.0 < min_scale <= 1.0:
            raise SpecError(f"min_scale must be in (0, 1], got {min_scale!r}")
        if not isinstance(loss_z, (int, float)) or isinstance(loss_z, bool):
            raise SpecError(f"loss_z must be a number >= 0, got {loss_z!r}")
        if not (math.isfinite(loss_z) and loss_z >= 0):
            raise SpecError(f"loss_z must be a finite number >= 0, got {loss_z!r}")
        self.factor = float(factor)
        self.events = events
        self.window = window
        self.recover = recover
        self.min_scale = float(min_scale)
        self.loss_z = float(loss_z)
        self.loss_window = loss_window
        self.state = {"scale": 1.0, "recent": [], "last_event": None, "cuts": 0, "losses": []}

    def check_state(self, state: Any) -> None:
        """``scale`` in (0, 1], ``recent`` and ``last_event`` step numbers (``last_event`` None
        before the first incident), ``cuts`` an integer >= 0, ``losses`` the recent finite losses
        (optional: a state saved before it existed loads with none)."""
        check_keys(
            self.name, state, ("scale", "recent", "last_event", "cuts"), optional=("losses",)
        )
        if "losses" in state:
            losses = state["losses"]
            if not isinstance(losses, (list, tuple)) or len(losses) > self.loss_window:
                refuse_state(
                    self.name,
                    "losses",
                    losses,
                    f"it must be a list of at most loss_window={self.loss_window} losses",
                )
            check_numbers(self.name, "losses", losses)
        check_number(self.name, "scale", state["scale"])
        if not 0.0 < state["scale"] <= 1.0:
            refuse_state(self.name, "scale", state["scale"], "the LR scale must be in (0, 1]")
        check_numbers(self.name, "recent", state["recent"], integer=True, nonneg=True)
        check_number(
            self.name, "last_event", state["last_event"], integer=True, nonneg=True, nullable=True
        )
        check_number(self.name, "cuts", state["cuts"], integer=True, nonneg=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict({"losses": [], **state})

    def counts(self, ctx: StepContext) -> bool:
        """Whether this step is an incident for the backoff (see the class docstring)."""
        if ctx.hard_incident or not ctx.anomaly:
            return ctx.hard_incident
        return self.loss_out_of_line(None if ctx.host is None else ctx.host.loss)

    def loss_out_of_line(self, loss: float | None) -> bool:
        """Whether ``loss`` is above the recent losses' median by more than ``loss_z`` robust
        standard deviations (True where that cannot be told: no loss, too few, ``loss_z=0``)."""
        past: list[float] = self.state["losses"]
        if self.loss_z == 0 or loss is None or len(past) < 8:
            return True
        if not math.isfinite(loss):
            return True
        med = statistics.median(past)
        mad = statistics.median(abs(v - med) for v in past)
        return bool(loss > med + self.loss_z * MAD_TO_STD * mad)

    def apply(self, ctx: StepContext) -> None:
        st = self.state
        step = ctx.step
        recent = [s for s in st["recent"] if step - s < self.window]
        last = -1 if st["last_event"] is None else st["last_event"]
        event = self.counts(ctx)
        loss = None if ctx.host is None else ctx.host.loss
        if loss is not None and math.isfinite(loss):
            st["losses"] = [*st["losses"], float(loss)][-self.loss_window :]
        st["scale"], cut = backoff_scale(
            HOST, self, st["scale"], event, len(recent) + 1, last, step
        )
        if event:
            recent.append(step)
            st["last_event"] = step
            if cut:
                st["cuts"] += 1
                recent = []
                ctx.record(self.name, True)
        st["recent"] = recent
        ctx.lr_scale *= st["scale"]
        ctx.metrics["lr_scale"] = st["scale"]


def backoff_scale(
    xp: ArrayNamespace, p: lr_backoff, scale: Any, event: Any, n_events: Any, last: Any, step: Any
) -> tuple[Any, Any]:
    """lr_backoff's decision, written once (the torch Guard on host floats, Keras on
    ``keras.ops``): ``(new scale, cut)`` for a step with ``event`` an incident, ``n_events`` the
    incidents within the window counting this one, ``last`` the step of the last incident
    (-1: none yet). An incident that makes ``events`` cuts the scale by ``factor`` (not below
    ``min_scale``); ``window`` calm steps after the last incident grow it back by
    ``(1 / factor) ** (1 / recover)`` a step, up to 1."""
    cut = xp.logical_and(event, n_events >= p.events)
    cut_scale = xp.maximum(scale * p.factor, p.min_scale)
    calm = xp.logical_and(scale < 1.0, xp.logical_or(last < 0, step - last >= p.window))
    grown = xp.minimum(scale * (1.0 / p.factor) ** (1.0 / p.recover), 1.0)
    new = xp.where(event, xp.where(cut, cut_scale, scale), xp.where(calm, grown, scale))
    return new, cut
