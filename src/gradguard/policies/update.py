"""Bound the step, not only the gradient: each layer's update relative to its weights."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from .._lazy import np, torch
from ..errors import SpecError
from ..updates import DEFAULT_SAMPLES, UpdateStats
from .base import (
    Policy,
    StepContext,
    UpdateDecision,
    check_keys,
    check_number,
    check_numbers,
    refuse_state,
)
from .clip import _check_positive
from .registry import register

if TYPE_CHECKING:
    from ..layout import ParamLayout

#: The longest window of update ratios per layer.
MAX_WINDOW = 10_000


def _lr_value(v: Any) -> float | None:
    """A param group's LR as a float, or None where reading it would sync a device."""
    if isinstance(v, torch.Tensor):
        return float(v) if v.device.type == "cpu" and v.numel() == 1 else None
    return float(v) if isinstance(v, (int, float)) else None


def _improving(losses: list[float]) -> bool:
    """Whether the loss is going down: the median of the later half of ``losses`` below the
    median of the earlier half (False with fewer than 8 losses: no evidence of progress)."""
    if len(losses) < 8:
        return False
    half = len(losses) // 2
    return float(np.median(losses[-half:])) < float(np.median(losses[:half]))


def _row_medians(hist: np.ndarray) -> np.ndarray:
    """``np.nanmedian(hist, axis=1)`` (NaN for a row of NaNs), without its masked-array path
    (10x slower): NaNs sort last, the middle of each row's valid entries is taken."""
    srt = np.sort(hist, axis=1)
    n = (~np.isnan(hist)).sum(axis=1)
    rows = np.arange(hist.shape[0])
    lo = np.maximum((n - 1) // 2, 0)
    hi = np.minimum(n // 2, hist.shape[1] - 1)
    med = (srt[rows, lo] + srt[rows, hi]) / 2
    return np.where(n > 0, med, np.nan)


@register
class update_clip(Policy):
    """Bound each layer's update relative to its weights, ``||w_new - w_old|| / ||w_old||``,
    measured from the weights after the step, so for any torch optimizer (SGD, momentum, Adam,
    AdamW, ...): an LR burst or an Adam update blow-up is caught while the gradients look normal.

    The bound of layer ``l`` is ``min(factor * level_l, max_ratio)``: ``level_l`` is the median
    of the layer's last ``window`` update ratios (as bounded: a capped step enters as its cap, so
    a burst does not raise the level; a sustained change lifts it by up to ``factor`` every
    ``window / 2`` steps). ``max_ratio`` (default 0.03: no layer moves by more than 3% of its own
    norm in one step, the first step included, before any history exists) is a bound on a
    scale-free quantity, like the trust ratio LARS and LAMB build on: it is what keeps the first
    steps of a too-high LR from killing a deep net (measured in docs/policies.md). A layer over
    its bound has its update scaled back to it, exactly: ``w <- w_old + s * (w_new - w_old)``,
    and (``moments=True``, the default) its first-moment buffers (SGD's momentum, Adam's
    ``exp_avg``) by the same ``s``: the optimizer then remembers the step it took, not the one it
    proposed. Without that, a momentum run whose every step is bounded keeps accelerating against
    the bound (measured in docs/policies.md: the stability suite's momentum MLP at LR 0.2).
    Layers whose weights are ~zero (RMS < 1e-6, e.g. a zero-initialized output) are not bounded:
    a ratio to nothing is undefined; they enter once they have grown.

    A bound that binds on ``persist`` of the last ``persist_window`` steps (default 8 of 16) while
    the loss is not going down (the median of the later half of the last ``2 * persist_window``
    losses not below that of the earlier half) says the LR is above what the model tolerates, not
    that one step went wrong: the next step is reported as an incident (``StepContext.unstable``,
    metric ``update_clip.unstable``), which ``lr_backoff`` after it in the chain counts; the count
    starts afresh either way. Bounded steps that do bring the loss down (a small net whose healthy
    steps are large) are left alone. The loss is the one given to ``guard.step(loss=...)``, read
    in the chain's host read; without it (or before 8 losses are in) a persistent bound counts as
    an incident. Bounding alone keeps an unstable run at the bound (every layer moving
    ``max_ratio`` a step); the backoff is what brings its steps down (measured in docs/bench.md,
    the stability suite). ``persist=0`` reports nothing.

    Measuring exactly costs a copy and a subtraction of the weights (about one optimizer step)
    and a buffer the size of the parameters. ``mode="exact"`` pays it every step; ``"auto"`` (the
    default) measures exactly only where a step is at risk (the first ``warmup`` steps, a step
    whose LR jumped by ``lr_jump`` or more over the previous one, and the ``hold`` steps after any
    layer went over its bound) and otherwise estimates the ratios from a strided sample of at most
    ``samples`` elements per tensor (costs ~1% of a step). A sampled step over its bound cannot be
    scaled back (its old weights were not kept): it is reported (``update_clip.missed``) and the
    following ``hold`` steps are measured, and bounded, exactly. ``"sample"`` never copies
    (monitoring only). The measurement also reads every weight's norm: it is the Guard's
    post-step integrity check, at no extra cost.

    Torch only: a Keras optimizer's weights are not reachable outside its compiled step.

    Metrics: ``update_clip.max_ratio`` (the largest layer ratio), ``update_clip.capped`` (layers
    scaled back), ``update_clip.exact`` (1.0 when measured exactly), ``update_clip.missed`` (1.0
    on a sampled step over its bound), ``update_clip.unstable`` (1.0 on the step reported as an
    incident).
    """

    name = "update_clip"
    keras_refusal = (
        "it measures the update from the weights before and after the step and scales it back per "
        "layer, which needs the weights outside the compiled train step; the Keras default is "
        "skip_nonfinite+adaptive_clip+lr_backoff"
    )
    kind = "update"

    def __init__(
        self,
        factor: float = 4.0,
        max_ratio: float = 0.03,
        window: int = 32,
        mode: Literal["auto", "exact", "sample"] = "auto",
        warmup: int = 100,
        hold: int = 50,
        lr_jump: float = 4.0,
        samples: int = DEFAULT_SAMPLES,
        moments: bool = True,
        persist: int = 8,
        persist_window: int = 16,
    ):
        super().__init__()
        if not isinstance(moments, bool):
            raise SpecError(f"moments must be true or false, got {moments!r}")
        for key, v in (("factor", factor), ("lr_jump", lr_jump)):
            if not (isinstance(v, (int, float)) and math.isfinite(v)) or not v > 1.0:
                raise SpecError(f"{key} must be a finite number > 1, got {v!r}")
        _check_positive(self.name, "max_ratio", max_ratio)
        for key, v, lo, hi in (
            ("window", window, 1, MAX_WINDOW),
            ("warmup", warmup, 0, 10**9),
            ("hold", hold, 0, 10**9),
            ("samples", samples, 1, 10**9),
            ("persist_window", persist_window, 1, MAX_WINDOW),
            ("persist", persist, 0, persist_window if isinstance(persist_window, int) else 0),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise SpecError(f"{key} must be an integer in [{lo}, {hi}], got {v!r}")
        if mode not in ("auto", "exact", "sample"):
            raise SpecError(f"mode must be 'auto', 'exact' or 'sample', got {mode!r}")
        self.factor = float(factor)
        self.max_ratio = float(max_ratio)
        self.window = window
        self.mode = mode
        self.warmup = warmup
        self.hold = hold
        self.lr_jump = float(lr_jump)
        self.samples = samples
        self.moments = moments
        self.persist = persist
        self.persist_window = persist_window
        self.state = {
            "history": [],
            "pos": 0,
            "steps": 0,
            "hold": 0,
            "lrs": [],
            "bound_at": [],
            "losses": [],
            "unstable": False,
        }
        self._history: np.ndarray | None = None  # (layers, window) log-ratios, NaN where none

    def bind(self, layout: ParamLayout, optimizer: torch.optim.Optimizer) -> None:
        n = len(layout.layer_names)
        if self._history is None or self._history.shape[0] != n:
            self._history = np.full((n, self.window), np.nan)

    def apply(self, ctx: StepContext) -> None:
        """Before the step: report the instability the last steps' bounds showed (``persist``) as
        an incident, for ``lr_backoff``. The bound itself acts after the step
        (:meth:`decide_update`)."""
        if self.state["unstable"]:
            self.state["unstable"] = False
            ctx.unstable = True
            ctx.metrics["update_clip.unstable"] = 1.0

    # ----- before the step: how to measure ------------------------------------------------------------
    def update_mode(self, ctx: StepContext) -> str | None:
        st = self.state
        lrs = [_lr_value(g["lr"]) for g in ctx.optimizer.param_groups]
        lrs = [None if v is None else v * ctx.lr_scale for v in lrs]
        jumped = any(
            now is not None and before is not None and now > self.lr_jump * before
            for now, before in zip(lrs, st["lrs"], strict=False)
        )
        st["lrs"] = lrs
        if self.mode != "auto":
            return self.mode
        risky = st["steps"] < self.warmup or st["hold"] > 0 or jumped
        return "exact" if risky else "sample"

    # ----- after the step: the bound -----------------------------------------------------------------
    def decide_update(self, ctx: StepContext, update: UpdateStats | None) -> UpdateDecision | None:
        if update is None:  # not measured (update_mode always asks: only another policy's step)
            return None
        st = self.state
        hist = self._history
        assert hist is not None, "update_clip used before bind()"
        ratio = np.asarray(update.ratio, dtype=np.float64)
        level = np.exp(_row_medians(hist))
        cap = np.where(
            np.isnan(level), self.max_ratio, np.minimum(self.factor * level, self.max_ratio)
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            over = ratio > cap  # NaN (an undefined ratio) is never over
            entry = np.where(ratio > 0, np.log(np.minimum(ratio, cap)), np.nan)
        hist[:, st["pos"]] = entry
        st["pos"] = (st["pos"] + 1) % self.window
        st["steps"] += 1
        if self.persist:
            loss = None if ctx.host is None else ctx.host.loss
            if loss is not None and math.isfinite(loss):
                st["losses"] = [*st["losses"], float(loss)][-2 * self.persist_window :]
        n_over = int(over.sum())
        finite = ratio[~np.isnan(ratio)]
        metrics: dict[str, float | torch.Tensor] = {
            "update_clip.max_ratio": float(finite.max()) if finite.size else 0.0,
            "update_clip.capped": 0.0,
            "update_clip.exact": 1.0 if update.exact else 0.0,
            "update_clip.missed": 0.0,
        }
        if not n_over:
            st["hold"] = max(0, st["hold"] - 1)
            return UpdateDecision(metrics=metrics)
        st["hold"] = self.hold
        if self.persist:
            now = st["steps"]
            bound_at = [s for s in st["bound_at"] if now - s < self.persist_window] + [now]
            if len(bound_at) >= self.persist:
                # An incident at the next step, unless the loss shows the bounded steps are
                # making progress; the count starts afresh either way.
                st["unstable"] = not _improving(st["losses"])
                bound_at = []
            st["bound_at"] = bound_at
        if not update.exact:
            metrics["update_clip.missed"] = 1.0
            return UpdateDecision(metrics=metrics)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(over, cap / ratio, 1.0)
        metrics["update_clip.capped"] = float(n_over)
        ctx.layers[self.name] = np.flatnonzero(over).tolist()
        return UpdateDecision(
            layer_scale=scale.tolist(), scale_moments=self.moments, acted=True, metrics=metrics
        )

    # ----- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = dict(self.state)
        sd["lrs"] = list(sd["lrs"])
        sd["bound_at"] = list(sd["bound_at"])
        sd["losses"] = list(sd["losses"])
        sd["history"] = [] if self._history is None else self._history.tolist()
        return sd

    def check_state(self, state: Any) -> None:
        """``history``: one row of ``window`` log-ratios per layer (NaN where none); ``pos`` in
        ``[0, window)``; ``steps``, ``hold`` integers >= 0; ``lrs`` the last LR of each group;
        ``bound_at`` the recent steps (<= ``steps``) a layer went over its bound; ``unstable`` a
        bool."""
        check_keys(
            self.name,
            state,
            ("history", "pos", "steps", "hold", "lrs", "bound_at", "losses", "unstable"),
        )
        hist = state["history"]
        n = None if self._history is None else self._history.shape[0]
        if not isinstance(hist, (list, tuple)) or (n is not None and len(hist) != n):
            refuse_state(self.name, "history", hist, f"it must hold one row per layer ({n})")
        for row in hist:
            if not isinstance(row, (list, tuple)) or len(row) != self.window:
                refuse_state(
                    self.name, "history", row, f"each row holds window={self.window} values"
                )
            for v in row:
                if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isinf(v):
                    refuse_state(self.name, "history", v, "log-ratios are finite numbers or NaN")
        check_number(self.name, "pos", state["pos"], integer=True, nonneg=True)
        if state["pos"] >= self.window:
            refuse_state(self.name, "pos", state["pos"], f"it must be < window={self.window}")
        for key in ("steps", "hold"):
            check_number(self.name, key, state[key], integer=True, nonneg=True)
        lrs = state["lrs"]
        if not isinstance(lrs, (list, tuple)):
            refuse_state(self.name, "lrs", lrs, "it must be a list of LRs (None where unread)")
        check_numbers(self.name, "lrs", [v for v in lrs if v is not None], nonneg=True)
        bound_at = state["bound_at"]
        if not isinstance(bound_at, (list, tuple)):
            refuse_state(self.name, "bound_at", bound_at, "it must be a list of step numbers")
        check_numbers(self.name, "bound_at", bound_at, integer=True, nonneg=True)
        if any(s > state["steps"] for s in bound_at):
            refuse_state(self.name, "bound_at", bound_at, "no step can be after steps")
        losses = state["losses"]
        if not isinstance(losses, (list, tuple)):
            refuse_state(self.name, "losses", losses, "it must be a list of recent losses")
        check_numbers(self.name, "losses", losses)
        if not isinstance(state["unstable"], bool):
            refuse_state(self.name, "unstable", state["unstable"], "it must be true or false")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"history", "pos", "steps", "hold", "lrs", "bound_at", "losses", "unstable"}
        missing = keys - set(state)
        if missing:
            raise KeyError(f"update_clip: state is missing {sorted(missing)}")
        hist = state["history"]
        if hist:
            self._history = np.asarray(hist, dtype=np.float64)
        self.state = {
            "history": [],
            "pos": int(state["pos"]),
            "steps": int(state["steps"]),
            "hold": int(state["hold"]),
            "lrs": list(state["lrs"]),
            "bound_at": [int(s) for s in state["bound_at"]],
            "losses": [float(v) for v in state["losses"]],
            "unstable": bool(state["unstable"]),
        }
