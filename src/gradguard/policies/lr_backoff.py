"""Cut the learning rate after repeated incidents; restore it gradually once training is calm."""

from __future__ import annotations

from typing import Any

from ..errors import SpecError
from .base import Policy, StepContext, check_keys, check_number, check_numbers, refuse_state
from .registry import register
from .xp import HOST, ArrayNamespace


@register
class lr_backoff(Policy):
    """Multiply the LR by ``factor`` when ``events`` incidents (skipped or rolled-back steps, from
    the policies before it in the chain) happen within ``window`` steps; after ``window`` calm
    steps, grow it back geometrically so that one cut is undone over ``recover`` steps. The scale
    never goes below ``min_scale``.

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
    ):
        super().__init__()
        if not 0.0 < factor < 1.0:
            raise SpecError(f"factor must be in (0, 1), got {factor!r}")
        for n, v in (("events", events), ("window", window), ("recover", recover)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecError(f"{n} must be an integer >= 1, got {v!r}")
        if not 0.0 < min_scale <= 1.0:
            raise SpecError(f"min_scale must be in (0, 1], got {min_scale!r}")
        self.factor = float(factor)
        self.events = events
        self.window = window
        self.recover = recover
        self.min_scale = float(min_scale)
        self.state = {"scale": 1.0, "recent": [], "last_event": None, "cuts": 0}

    def check_state(self, state: Any) -> None:
        """``scale`` in (0, 1], ``recent`` and ``last_event`` step numbers (``last_event`` None
        before the first incident), ``cuts`` an integer >= 0."""
        check_keys(self.name, state, ("scale", "recent", "last_event", "cuts"))
        check_number(self.name, "scale", state["scale"])
        if not 0.0 < state["scale"] <= 1.0:
            refuse_state(self.name, "scale", state["scale"], "the LR scale must be in (0, 1]")
        check_numbers(self.name, "recent", state["recent"], integer=True, nonneg=True)
        check_number(
            self.name, "last_event", state["last_event"], integer=True, nonneg=True, nullable=True
        )
        check_number(self.name, "cuts", state["cuts"], integer=True, nonneg=True)

    def apply(self, ctx: StepContext) -> None:
        st = self.state
        step = ctx.step
        recent = [s for s in st["recent"] if step - s < self.window]
        last = -1 if st["last_event"] is None else st["last_event"]
        st["scale"], cut = backoff_scale(
            HOST, self, st["scale"], ctx.event, len(recent) + 1, last, step
        )
        if ctx.event:
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
