"""Cut the learning rate after repeated incidents; restore it gradually once training is calm."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import SpecError
from .base import StepContext, check_keys, check_number, check_numbers, refuse_state
from .registry import register
from .rule import Decision, Field, RuleInputs, RulePolicy, initial_host_state
from .xp import HOST, ArrayNamespace, ring_in_order

#: MAD to standard deviation for a normal distribution.
MAD_TO_STD = 1.4826
#: The most incidents (``events``) and losses (``loss_window``) held: each is a buffer of slots.
MAX_SLOTS = 1_000_000


@register
class lr_backoff(RulePolicy):
    """Multiply the LR by ``factor`` when ``events`` incidents (skipped or rolled-back steps, from
    the policies before it in the chain) happen within ``window`` steps; after ``window`` calm
    steps, grow it back geometrically so that one cut is undone over ``recover`` steps. The scale
    never goes below ``min_scale``.

    What counts: a skipped or rolled-back step, an instability a policy has already tested against
    the loss (``update_clip``'s persistently binding bound), and a finite spike that a clip
    mitigated (``adaptive_clip``'s). With ``loss_z > 0`` (default 0: off) a spike counts only
    where the step's loss is out of line too: above the recent losses' trend (the least-squares
    line through the last ``loss_window`` finite losses, taken one step on) by more than
    ``loss_z`` robust standard deviations of the losses about that line (1.4826 x their median
    absolute deviation); without a loss given to ``guard.step(loss=...)``, or before 8 losses,
    every spike counts. The trend, not the window's median: early in training the loss falls
    fast, and a loss jump on a falling curve can still be below the median of the last 32. That
    spares a run whose gradient norm rises while its loss keeps to its curve (a CNN starting to
    learn, a rare hard batch, injected gradient spikes a clip contains), but on a run whose LR is
    too high some gradient spikes come before the loss shows anything: measured in
    docs/policies.md#the-default (``loss_z=3`` took the quick suite's LR 0.1 from 0.933 to 0.884
    over 10 seeds), so the default counts every spike.

    With ``confirm=K > 0`` (default 0: off) a mitigated spike is judged by what the loss did
    after it: it counts, ``K`` steps later, unless the median of the finite losses of the ``K``
    steps after it is below the median of the last ``loss_window`` losses before it (the loss kept
    falling: the clip contained the spike). Spikes that come while one is being judged join it
    and count with it, one incident each. Where it cannot be told (no loss given at the spike,
    fewer than 8 losses before it, no finite loss after it) the spike counts at once. That spares
    the benign spikes of a healthy run (a CNN whose gradient norm rises as it starts to learn: the
    stability suite's held-out CNN lost 2.5 points to them), at the price of a cut ``K`` steps
    later on a run whose LR is too high, and that price is high: ``confirm=3`` took the quick
    suite's LR 0.1 and 0.3 from 0.933 and 0.744 to 0.818 and 0.534 over 10 seeds
    (docs/policies.md#the-default), so it is off by default.

    The scale is applied only around the optimizer step (the param groups' ``lr`` is restored right
    after), so LR schedulers see and set their own values untouched and compose with it.
    Runs after the detecting policies whatever its position in the chain.

    A rule written once (:meth:`decide`, for the torch Guard's host numbers and Keras's
    ``keras.ops``). State: the LR ``scale``, the steps of the ``recent`` incidents (a ring of
    ``events`` slots), ``last_event``, the ``cuts`` so far and the recent finite losses; saved as
    plain numbers and lists (``recent`` ascending, ``losses`` oldest first).
    """

    name = "lr_backoff"
    kind = "react"
    host_only = True
    metrics = ("lr_scale",)

    def __init__(
        self,
        factor: float = 0.5,
        events: int = 2,
        window: int = 50,
        recover: int = 200,
        min_scale: float = 1e-3,
        loss_z: float = 0.0,
        loss_window: int = 32,
        confirm: int = 0,
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
        if not isinstance(confirm, int) or isinstance(confirm, bool) or confirm < 0:
            raise SpecError(f"confirm must be an integer >= 0 (0: off), got {confirm!r}")
        for n, v in (("events", events), ("loss_window", loss_window), ("confirm", confirm)):
            if v > MAX_SLOTS:
                raise SpecError(
                    f"{n} must be at most {MAX_SLOTS}, got {v!r} (held in a buffer of that many "
                    "slots)"
                )
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
        self.confirm = confirm
        self.state = initial_host_state(self.fields())

    # ----- the rule, written once (host numbers, keras.ops) --------------------------------------
    def without_loss(self) -> str | None:
        if self.loss_z:
            return (
                f"loss_z={self.loss_z:g} tests each clipped spike against the step's loss; use "
                "loss_z=0 (the default)"
            )
        return None

    def fields(self, n_layers: int = 0) -> dict[str, Field]:
        # ``recent``: the steps of the incidents within the window, a ring written at
        # ``incidents % events`` (-1: empty; fewer than ``events`` are ever live, since reaching
        # ``events`` cuts the LR and clears them); ``last_event`` -1 before the first; the recent
        # finite losses as a ring (``losses``, ``losses_count`` taken), where a loss is given.
        out = {
            "scale": Field(init=1.0),
            "recent": Field((self.events,), kind="int", init=-1),
            "incidents": Field(kind="int"),
            "last_event": Field(kind="int", init=-1),
            "cuts": Field(kind="int"),
        }
        if self.given_loss:
            out["losses"] = Field((self.loss_window,))
            out["losses_count"] = Field(kind="int")
            if self.confirm:
                # The spike being judged (``pend_step`` -1: none), the losses' median before it,
                # the spikes judged with it, and the finite losses after it (``after_count``).
                out["pend_step"] = Field(kind="int", init=-1)
                out["pend_level"] = Field()
                out["pend_count"] = Field(kind="int")
                out["after"] = Field((self.confirm,))
                out["after_count"] = Field(kind="int")
        return out

    def decide(
        self, xp: ArrayNamespace, state: Mapping[str, Any], inputs: RuleInputs
    ) -> tuple[dict[str, Any], Decision]:
        new = dict(state)
        step = inputs.step
        loss = inputs.loss
        out_of_line: Any = True
        spike = inputs.anomaly
        confirmed: Any = 0  # spikes judged this step that count
        if loss is not None and "losses" in state:
            if self.loss_z:
                out_of_line = loss_out_of_line(
                    xp, self, state["losses"], state["losses_count"], loss
                )
            spike = xp.logical_and(spike, out_of_line)
            if self.confirm:
                n = xp.minimum(state["losses_count"], self.loss_window)
                spike, confirmed = judge_spikes(xp, self, state, new, step, spike, loss, n)
            finite = xp.isfinite(loss)
            slot = xp.mod(state["losses_count"], self.loss_window)
            new["losses"] = xp.put(state["losses"], slot, loss, finite)
            new["losses_count"] = state["losses_count"] + xp.as_int(finite)
        # A hard incident counts as it is; a spike a clip mitigated, where the loss is out of line
        # (one incident for the step, either or both); held spikes judged now, one each.
        k = xp.as_int(xp.logical_or(inputs.incident, spike)) + confirmed
        event = k > 0
        first = xp.maximum(step - self.window + 1, 0)  # the window's first step
        recent = xp.mask_below(state["recent"], first, -1)
        n_events = xp.count_at_least(recent, first) + k
        last = state["last_event"]
        scale, cut = backoff_scale(xp, self, state["scale"], event, n_events, last, step)
        # Below a cut, fewer than ``events - live`` incidents came: each takes the next slot.
        added = recent
        for j in range(self.events):
            added = xp.put(added, xp.mod(state["incidents"] + j, self.events), step, j < k)
        new["recent"] = xp.where(cut, xp.full_like(recent, -1), added)
        new["incidents"] = state["incidents"] + k
        new["last_event"] = xp.where(event, step, last)
        new["cuts"] = state["cuts"] + xp.as_int(cut)
        new["scale"] = scale
        return new, Decision(lr_scale=scale, acted=cut, metrics={"lr_scale": scale})

    def counts(self, ctx: StepContext) -> bool:
        """Whether this step is an incident for the backoff (see the class docstring)."""
        if ctx.hard_incident or not ctx.anomaly:
            return ctx.hard_incident
        return self.loss_out_of_line(None if ctx.host is None else ctx.host.loss)

    def loss_out_of_line(self, loss: float | None) -> bool:
        """Whether ``loss`` is above the recent losses' median by more than ``loss_z`` robust
        standard deviations (True where that cannot be told: no loss, too few, ``loss_z=0``)."""
        if self.loss_z == 0 or loss is None:
            return True
        st = self.state
        return bool(loss_out_of_line(HOST, self, st["losses"], st["losses_count"], loss))

    # ----- state representation -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The saved form: ``scale``, ``recent`` (the incidents' steps, ascending),
        ``last_event`` (None before the first), ``cuts``, ``losses`` (oldest first); with
        ``confirm``, ``pending``: the spike being judged (``step``, ``level``, ``count``, the
        finite losses ``after`` it), or None."""
        st = self.state
        losses: list[float] = []
        if "losses" in st:
            losses = ring_in_order(list(st["losses"]), int(st["losses_count"]))
        last = int(st["last_event"])
        out: dict[str, Any] = {
            "scale": float(st["scale"]),
            "recent": sorted(int(s) for s in st["recent"] if s >= 0),
            "last_event": None if last < 0 else last,
            "cuts": int(st["cuts"]),
            "losses": losses,
        }
        if "pend_step" in st:
            held = int(st["pend_step"])
            out["pending"] = (
                None
                if held < 0
                else {
                    "step": held,
                    "level": float(st["pend_level"]),
                    "count": int(st["pend_count"]),
                    "after": [float(v) for v in list(st["after"])[: int(st["after_count"])]],
                }
            )
        return out

    def check_state(self, state: Any) -> None:
        """``scale`` in (0, 1], ``recent`` fewer than ``events`` step numbers, ``last_event`` a
        step number (None before the first incident), ``cuts`` an integer >= 0, ``losses`` the
        recent finite losses (optional: a state saved before it existed loads with none)."""
        check_keys(
            self.name,
            state,
            ("scale", "recent", "last_event", "cuts"),
            optional=("losses", "pending"),
        )
        if state.get("pending") is not None:
            self._check_pending(state["pending"])
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
        check_numbers(
            self.name,
            "recent",
            state["recent"],
            integer=True,
            nonneg=True,
            max_length=self.events - 1,
        )
        check_number(
            self.name, "last_event", state["last_event"], integer=True, nonneg=True, nullable=True
        )
        check_number(self.name, "cuts", state["cuts"], integer=True, nonneg=True)

    def _check_pending(self, pending: Any) -> None:
        """A held spike: its step, its level, how many spikes it holds, the losses after it."""
        if not isinstance(pending, Mapping) or set(pending) != {"step", "level", "count", "after"}:
            refuse_state(
                self.name,
                "pending",
                pending,
                "it must be None or a mapping with step, level, count and after",
            )
        check_number(self.name, "pending.step", pending["step"], integer=True, nonneg=True)
        check_number(self.name, "pending.level", pending["level"])
        check_number(self.name, "pending.count", pending["count"], integer=True, nonneg=True)
        check_numbers(self.name, "pending.after", pending["after"], max_length=max(self.confirm, 1))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        st = initial_host_state(self.fields())
        recent = sorted(int(s) for s in state.get("recent", []))
        recent = recent[len(recent) - self.events + 1 :] if self.events > 1 else []
        st["recent"] = recent + [-1] * (self.events - len(recent))
        st["incidents"] = len(recent)
        last = state.get("last_event")
        st["last_event"] = -1 if last is None else int(last)
        st["scale"] = float(state["scale"])
        st["cuts"] = int(state["cuts"])
        if "losses" in st:
            losses = [float(v) for v in state.get("losses", [])][-self.loss_window :]
            st["losses"] = losses + [0.0] * (self.loss_window - len(losses))
            st["losses_count"] = len(losses)
        held = state.get("pending")
        if "pend_step" in st and held is not None:
            after = [float(v) for v in held["after"]][: self.confirm]
            st["pend_step"] = int(held["step"])
            st["pend_level"] = float(held["level"])
            st["pend_count"] = int(held["count"])
            st["after"] = after + [0.0] * (self.confirm - len(after))
            st["after_count"] = len(after)
        self.state = st


def loss_out_of_line(xp: ArrayNamespace, p: lr_backoff, losses: Any, count: Any, loss: Any) -> Any:
    """lr_backoff's loss test, written once: whether ``loss`` is above the recent losses' trend
    by more than ``p.loss_z`` robust standard deviations. The trend is the least-squares line
    through the ring ``losses`` (``count`` finite losses written so far; the last ``loss_window``
    held) at the next step, the deviation 1.4826 x the median absolute deviation of the losses
    about it: a loss that is falling as fast as it was is not out of line, however far below its
    window's median it now is. True where that cannot be told (fewer than 8 losses, a non-finite
    loss)."""
    pred, mad = xp.ring_trend(losses, count)
    n = xp.minimum(count, p.loss_window)
    unknown = xp.logical_or(n < 8, xp.logical_not(xp.isfinite(loss)))
    above = loss > pred + p.loss_z * MAD_TO_STD * mad
    return xp.logical_or(unknown, above)


def judge_spikes(
    xp: ArrayNamespace,
    p: lr_backoff,
    state: Mapping[str, Any],
    new: dict[str, Any],
    step: Any,
    spike: Any,
    loss: Any,
    n: Any,
) -> tuple[Any, Any]:
    """lr_backoff's ``confirm`` test, written once: ``(this step's spike counting at once, the
    held spikes that count now)``; the held spike's fields go into ``new``. ``n``: the losses in
    the ring before this step's. A spike is held where its level (the ring's median) is known (8
    losses or more, and its own loss finite); spikes that come while it is held join it; they are
    judged together ``confirm`` steps after it, against the median of the finite losses after
    it: they count unless it is below the level."""
    pending = state["pend_step"] >= 0
    finite = xp.isfinite(loss)
    into_after = xp.logical_and(pending, finite)
    after = xp.put(state["after"], xp.mod(state["after_count"], p.confirm), loss, into_after)
    after_count = state["after_count"] + xp.as_int(into_after)
    due = xp.logical_and(pending, step - state["pend_step"] >= p.confirm)
    med_after, _ = xp.window_median_mad(after, after_count)
    kept_falling = xp.logical_and(after_count > 0, med_after < state["pend_level"])
    counted = xp.where(xp.logical_and(due, xp.logical_not(kept_falling)), state["pend_count"], 0)
    still = xp.logical_and(pending, xp.logical_not(due))
    level, _ = xp.window_median_mad(state["losses"], n)
    knowable = xp.logical_and(n >= 8, finite)
    fresh = xp.logical_and(spike, xp.logical_not(still))  # a spike with none held
    hold = xp.logical_and(fresh, knowable)
    new["pend_step"] = xp.where(hold, step, xp.where(still, state["pend_step"], -1))
    new["pend_level"] = xp.where(hold, level, xp.where(still, state["pend_level"], 0.0))
    joined = state["pend_count"] + xp.as_int(xp.logical_and(spike, still))
    new["pend_count"] = xp.where(hold, 1, xp.where(still, joined, 0))
    new["after"] = after
    new["after_count"] = xp.where(still, after_count, 0)
    return xp.logical_and(fresh, xp.logical_not(knowable)), counted


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
