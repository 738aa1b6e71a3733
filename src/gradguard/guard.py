"""The Guard: a drop-in replacement for ``optimizer.step()`` that measures the gradients once,
runs the policy chain on them, then steps, skips or rolls back.

    guard = gradguard.Guard(model, optimizer, policy="default")
    loss.backward()
    report = guard.step(loss=loss)     # instead of optimizer.step()

Order of one step: (AMP: unscale) -> one fused statistics pass -> at most one host read (only if a
policy needs host values; the non-finite check is one) -> with ``replay=``, a non-finite step is
rerun once and attributed (transient or reproducible) -> each policy in chain order (a spike one
flags is rerun right after it, so the policies after it see the attribution) -> the
optimizer step with the LR scale, or a skip (gradients zeroed, nothing else touched) -> the
update policies' decision on the measured update (``update_clip``: a layer's update scaled back)
and the weight check, in one host read -> the policies' after-step hooks.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from .actions import drop_grads_, reset_param_state_, scale_rows_
from .errors import ConfigError, GradGuardError, IntegrityError, StallError
from .integrity import (
    check_groups,
    check_hyperparameters,
    explain_nonfinite,
    finite_after_step,
    group_signature,
)
from .layout import ParamLayout
from .listeners import StepListener, log_dir_listener
from .policies import HostView, Policy, StepContext, parse_spec, skip_nonfinite
from .policies.registry import order_chain
from .report import StepReport, Tally
from .skipstep import check_factor_optimizer, states_ready, step_with_skip_flag
from .snapshot import load_snapshot_
from .stats import GradStats, compute_grad_stats
from .updates import UpdateProbe, UpdateStats

if TYPE_CHECKING:
    from .policies.rollback import rollback
    from .updates import Mode

_STATE_VERSION = 1


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"Guard needs a torch.optim.Optimizer as its second argument, got {type(optimizer).__name__}; "
            "build the optimizer first: Guard(model, torch.optim.AdamW(model.parameters()), policy=...)"
        )
    closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ConfigError(
            f"{type(optimizer).__name__}.step() needs a closure: it re-evaluates the loss and the "
            "gradients inside its step (as LBFGS does), so a Guard could neither see nor clip the "
            "gradients it uses. Guard a first-order optimizer (SGD, Adam, AdamW, ...)"
        )


def _refuse_fsdp1(model: nn.Module | None, optimizer: Any) -> None:
    """FSDP1 flattens parameters into per-rank FlatParameters whose gradients gradguard cannot
    attribute to layers or reduce: refuse it clearly rather than report partial norms."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:
        return
    flat = any(
        type(p).__name__ == "FlatParameter" for g in optimizer.param_groups for p in g["params"]
    )
    if flat or (model is not None and any(isinstance(m, FSDP1) for m in model.modules())):
        raise ConfigError(
            "FSDP1 (FullyShardedDataParallel) is not supported: its flat parameters hold a per-rank "
            "slice of many layers, so norms would be partial. Use FSDP2 (torch.distributed.fsdp."
            "fully_shard), whose DTensor gradients the Guard reduces across ranks, or DDP."
        )


def _check_params(layout: ParamLayout) -> None:
    """Refuse parameters no gradient step can update: integer/bool dtypes and meta tensors."""
    for name, p in zip(layout.names, layout.params, strict=True):
        if p.device.type == "meta":
            raise ConfigError(
                f"parameter {name} is on the meta device (no data): materialize the model first, "
                "e.g. model.to_empty(device='cpu') and initialize it, then build the optimizer and "
                "the Guard"
            )
        if not (p.is_floating_point() or p.is_complex()):
            raise ConfigError(
                f"parameter {name} has dtype {str(p.dtype).removeprefix('torch.')}, which no gradient "
                "can update; keep integer and bool tensors out of the optimizer (register them as "
                "buffers)"
            )


def _build_chain(
    policy: str | Policy | Iterable[str | Policy] | None, check_finite: bool
) -> list[Policy]:
    """The chain a Guard runs: the spec parsed, ``skip_nonfinite`` first where the finite check
    needs it, each policy once, reacting policies after the rest."""
    chain = parse_spec(policy)
    if check_finite and not any(p.name in ("skip_nonfinite", "rollback") for p in chain):
        chain.insert(0, skip_nonfinite())
    return order_chain(chain)


def _check_skip_limit(chain: list[Policy], max_consecutive_skips: int | None) -> None:
    """``max_consecutive_skips``: an integer >= 1 or None, above ``skip_spike``'s ``admit``."""
    if max_consecutive_skips is None:
        return
    if (
        not isinstance(max_consecutive_skips, int)
        or isinstance(max_consecutive_skips, bool)
        or max_consecutive_skips < 1
    ):
        raise ConfigError(
            f"max_consecutive_skips must be an integer >= 1 or None, got {max_consecutive_skips!r}"
        )
    spike = next((p for p in chain if p.name == "skip_spike"), None)
    admit = getattr(spike, "admit", None)
    if admit is not None and admit >= max_consecutive_skips:
        # skip_spike skips `admit` outliers in a row before it takes them for a new level: the
        # Guard would stop the run first.
        raise ConfigError(
            f"skip_spike:admit={admit} must be below max_consecutive_skips="
            f"{max_consecutive_skips}: a sustained shift in the gradient norm or loss is "
            f"skipped {admit} times before skip_spike admits it, and the Guard stops the run "
            f"after {max_consecutive_skips} skips in a row; lower admit or raise "
            "max_consecutive_skips"
        )


def _listener(
    log_dir: str | os.PathLike[str] | None, telemetry: StepListener | None
) -> StepListener | None:
    """The Guard's listener: the one given, or the telemetry ``log_dir`` asks for."""
    if log_dir is not None and telemetry is not None:
        raise ConfigError(
            "give log_dir or telemetry, not both (Telemetry(log_dir, ...) holds the folder)"
        )
    return log_dir_listener(log_dir) if log_dir is not None else telemetry


def _check_sync_free(
    chain: list[Policy],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    check_weights: bool | None,
) -> None:
    """``sync_free``: a fused optimizer that takes a device skip flag, and nothing that needs the
    host read it avoids."""
    check_factor_optimizer(optimizer)
    if scaler is not None:
        raise ConfigError(
            "sync_free cannot be combined with a GradScaler, which passes its own overflow flag to "
            "the fused step; train in bf16 without a scaler, or drop sync_free"
        )
    if check_weights:
        raise ConfigError(
            "check_weights reads every step's weight check to the host, which sync_free avoids; "
            "drop one of them (a sync_free step whose gradient is non-finite is still skipped)"
        )
    host = [
        p.name
        for p in chain
        if p.name != "skip_nonfinite"
        and (p.kind != "clip" or p.needs_host or getattr(p, "host_only", False))
    ]
    if host:
        raise ConfigError(
            f"sync_free needs every policy to decide on the device, and {', '.join(host)} "
            "decide(s) on host values (a skip, an LR change, a rollback or an update bound is "
            "read to the host); use skip_nonfinite and clipping policies (e.g. "
            "'skip_nonfinite+clip_norm:1.0' or 'skip_nonfinite+zclip'), or drop sync_free"
        )


def _check_loss(loss: Tensor | float | None) -> None:
    """A loss given to a step: a scalar tensor or a number."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ConfigError(
                f"loss must be a scalar tensor, got shape {tuple(loss.shape)}; pass loss.mean() or loss.sum()"
            )
    elif loss is not None and not isinstance(loss, (int, float)):
        raise ConfigError(f"loss must be a tensor or a number, got {type(loss).__name__}")


@dataclass(eq=False)
class PendingStep:
    """A step measured and decided by :meth:`Guard.before_step`, awaiting :meth:`Guard.after_step`."""

    ctx: StepContext
    stats: GradStats
    stale: bool = False
    localization: dict[str, Any] | None = None
    #: The rerun attribution of a failing step (``guard.step(replay=...)``): ``result``
    #: (``transient``/``reproducible``), ``trigger`` (``nonfinite``/``spike``), the rerun's
    #: ``grad_norm`` and ``loss``, and its ``origin`` when the rerun found one; None: no rerun.
    rerun: dict[str, Any] | None = None
    saved_lrs: list[float] | None = None
    #: The optimizer's update, measured after the step when a policy reads it.
    update: UpdateStats | None = None

    @property
    def stepped(self) -> bool:
        """Whether the optimizer should step (False: the Guard skipped, rolled back or the AMP
        scaler found an overflow)."""
        return not self.ctx.skip

    @property
    def skip_reason(self) -> str | None:
        return self.ctx.skip_reason


class Guard:
    """Guard an optimizer: measure, mitigate, then step or skip.

    Args:
        model: the module being trained (names layers, finds the output head, and is what
            ``rollback`` restores). ``None`` is allowed: parameters are then named ``param.<i>``.
        optimizer: any ``torch.optim.Optimizer``; every parameter in its groups is guarded.
        policy: a spec string (``"default"``, ``"zclip"``, ``"skip_nonfinite+agc:0.02"``,
            ``"none"``), a :class:`Policy`, or a list of either. See ``available_policies()``.
        scaler: a ``torch.amp.GradScaler`` if you train with fp16 autocast. The Guard then unscales
            before measuring and calls ``scaler.step`` and ``scaler.update`` itself; an overflow is
            the scaler's skip (reported as ``amp_overflow``), not counted again as the Guard's.
        check_finite: guarantee that no NaN/Inf gradient reaches the weights by skipping such steps
            (adds ``skip_nonfinite`` to the chain if neither it nor ``rollback`` is there). It costs
            one host read per step; set False only for a sync-free clipping chain on an accelerator
            where you accept torch's own behaviour on NaN.
        check_weights: after every step, check in one fused pass that every weight is finite
            (default: as ``check_finite``). When one is not, a chain with ``rollback`` restores the
            last good state; otherwise the Guard raises :class:`~gradguard.errors.IntegrityError`
            naming the cause (a corrupted optimizer state, an update that overflowed the dtype).
            Before the step the LR, weight decay, momentum, betas and eps of every param group are
            checked to be finite (free: host values), and a changed set of param groups is refused.
        check_state: include the optimizer state (Adam's moments, SGD's momentum) in that pass
            every step. By default the state is read only where it can go non-finite unseen: on a
            step whose gradients were large enough to overflow a second moment, and to name the
            cause when a weight went non-finite (a NaN or negative moment shows in the weights the
            same step). True also catches an infinite moment planted from outside, which leaves the
            weights finite (Adam's update ``m / sqrt(v)`` is then 0); it costs a pass over the
            state (2x the weights for Adam).
        max_consecutive_skips: raise :class:`~gradguard.errors.StallError` when this many steps
            in a row were skipped (AMP overflows aside): skipping is then not recovering, it is a
            stall (as optax's ``apply_if_finite(max_consecutive_errors)``). ``None``: never.
        layer_stats: compute per-layer gradient norms every step and expose them on the report
            (``report.layer_norms``); they come from the per-parameter norms, no extra pass.
        log_dir: record telemetry (per-layer norms, actions, events, where a NaN started) to this
            folder as ``telemetry.jsonl`` and TensorBoard files; ``gradguard report DIR`` renders it.
            Call ``guard.close()`` at the end (or use the Guard as a context manager).
        telemetry: a :class:`gradguard.diagnose.Telemetry` with non-default settings, instead of
            ``log_dir``; or any :class:`~gradguard.listeners.StepListener`.
        sync_free: decide the non-finite skip on the device and pass it to the optimizer as a
            0/1 flag (:mod:`gradguard.skipstep`), so that a step reads nothing to the host. Needs
            a fused ``Adam``, ``AdamW``, ``SGD`` or ``Adagrad`` and a chain of ``skip_nonfinite``
            and clipping policies (e.g. ``"skip_nonfinite+clip_norm:1.0"``); no ``scaler``, no
            ``check_weights``. A skipped step leaves the weights, moments and step counts
            bit-identical; a taken one is the optimizer's own. ``report.skipped`` and the counters
            are read when asked for; a stall (``max_consecutive_skips``) is checked every
            ``max_consecutive_skips`` steps, in one read. The first step decides on the host (the
            optimizer has no state yet to leave untouched).
    """

    def __init__(
        self,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer,
        policy: str | Policy | Iterable[str | Policy] | None = "default",
        *,
        scaler: torch.amp.GradScaler | None = None,
        check_finite: bool = True,
        check_weights: bool | None = None,
        check_state: bool = False,
        max_consecutive_skips: int | None = 20,
        layer_stats: bool = False,
        log_dir: str | os.PathLike[str] | None = None,
        telemetry: StepListener | None = None,
        sync_free: bool = False,
    ):
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(
                f"Guard's first argument must be the nn.Module being trained (or None), got {type(model).__name__}"
            )
        _check_optimizer(optimizer)
        _refuse_fsdp1(model, optimizer)
        chain = _build_chain(policy, check_finite)
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.layout = ParamLayout.build(model, optimizer)
        _check_params(self.layout)
        self.policies: list[Policy] = chain
        self.check_finite = check_finite
        _check_skip_limit(chain, max_consecutive_skips)
        self.sync_free = bool(sync_free)
        if self.sync_free:
            _check_sync_free(chain, optimizer, self.scaler, check_weights)
            check_weights = False
        self.check_weights = check_finite if check_weights is None else bool(check_weights)
        self.check_state = bool(check_state)
        self.max_consecutive_skips = max_consecutive_skips
        self._groups = group_signature(optimizer)
        self._rollback = cast(
            "rollback | None", next((p for p in chain if p.name == "rollback"), None)
        )
        self._update_policies = [p for p in chain if p.kind == "update"]
        self._update_measured = False  # this step's update is being measured (set before the step)
        # Built on the first step an update policy asks for a measurement (qk_clip never does).
        self._probe: UpdateProbe | None = None
        self._streak: Counter[str] = Counter()
        #: sync_free: skips in a row so far, on the device; whether every parameter has state.
        self._flag_streak: Tensor | None = None
        self._states_ready = False
        self.layer_stats = layer_stats
        self._bind_chain()
        self._step = 0
        self._tally = Tally(("steps", "skipped", "rolled_back", "amp_overflow", "clipped"))
        self._last_grad: tuple[weakref.ref[Tensor], int] | None = None
        self._pending: PendingStep | None = None
        self.telemetry = _listener(log_dir, telemetry)
        if self.telemetry is not None:
            self.telemetry.bind(self)

    def _bind_chain(self) -> None:
        """Show each policy the parameters and the optimizer; note what the chain reads."""
        chain = self.policies
        for p in chain:
            p.bind(self.layout, self.optimizer)
        # GradScaler.step reads its overflow flag to the host anyway; the Guard reads it in the
        # same step to report (and not double count) the scaler's skip.
        self._needs_host = any(p.needs_host for p in chain) or self.scaler is not None
        self._needs_host_param_norms = any(p.needs_host_param_norms for p in chain)
        self._kinds = {p.name: p.kind for p in chain}

    # ----- the step ---------------------------------------------------------------------------------
    def step(
        self, loss: Tensor | float | None = None, *, replay: Callable[[], Tensor] | None = None
    ) -> StepReport:
        """Measure the gradients, run the policy chain, then step the optimizer or skip.

        Call once per optimizer step, after ``backward()`` (after the last micro-batch when
        accumulating gradients), in place of ``optimizer.step()`` (and of ``scaler.step/update``).
        ``loss`` lets loss-aware policies (``skip_spike``, ``rollback``) see it.

        ``replay``: a function that recomputes this step's loss (same batch), e.g.
        ``lambda: loss_fn(model(x), y)``. It is called only on a failing step: one whose gradient
        or loss is non-finite, or a finite spike a policy of the chain flagged (``skip_spike``,
        ``zclip``, ``adaptive_clip``). Once, with hooks on every module: the model, its buffers,
        gradients and the RNG state are left as they were. That one rerun gives

        * the attribution, ``report.rerun``: ``"reproducible"`` (the rerun failed again: non-finite
          again, or a spike whose gradient norm and loss are within 1e-2 relative of the step's:
          the data or the model) or ``"transient"`` (it did not: hardware, nondeterminism), in
          the terms of Megatron-LM's rerun state machine (its rule, not its code). ``report.rerun_detail`` holds the rerun's
          norm and loss; both go to the telemetry;
        * for a non-finite step, the module where the NaN/Inf starts, ``report.localization``.

        Order: a non-finite step is rerun before the policy chain runs, so every policy sees
        ``ctx.rerun``; a spike right after the policy that flagged it, so the policies after it
        see it (put ``rollback`` after the spike detector). Healthy steps never call it.
        """
        pending = self._decide(loss, replay, stacklevel=3)
        ctx = pending.ctx
        if pending.stepped:
            if self.telemetry is not None and self.telemetry.wants_update_ratio(ctx.step):
                self.telemetry.before_update(pending.stats)
            check_hyperparameters(self.optimizer, ctx.lr_scale)
            self._before_update(ctx)
            if ctx.skip_flag is not None:
                step_with_skip_flag(self.optimizer, ctx.skip_flag)
            else:
                self._apply_step(ctx.lr_scale)
            self._after_update(pending)
        elif not pending.stale:
            if self.scaler is not None:
                self.scaler.update()  # backs the scale off on overflow; unscale_ recorded the check
            self.optimizer.zero_grad(set_to_none=True)
        self._verify(pending)
        return self._conclude(pending)

    def before_step(
        self, loss: Tensor | float | None = None, *, replay: Callable[[], Tensor] | None = None
    ) -> PendingStep:
        """First half of :meth:`step`, for frameworks that call ``optimizer.step()`` themselves.

        Measures the gradients and runs the chain exactly as :meth:`step` does. The Guard does not
        step: the caller's framework does, right after. So that its ``optimizer.step()`` cannot
        apply a cancelled step, a skip drops the gradients (sets every ``.grad`` to ``None``):
        every ``torch.optim`` optimizer leaves a parameter without a gradient untouched, its
        moments and step count included. An LR scale (``lr_backoff``) is applied to the param
        groups until :meth:`after_step`. With a ``scaler``, the framework owns ``scaler.step`` and
        ``scaler.update``; the Guard only reads the overflow it recorded.

        Call :meth:`after_step` with the returned object once the framework's step is done.
        """
        if self._pending is not None:
            raise GradGuardError(
                "before_step() was called twice without after_step() in between; call "
                "guard.after_step(pending) once the optimizer has stepped"
            )
        if self.sync_free:
            raise GradGuardError(
                "a sync_free Guard hands its skip flag to the optimizer's own step, so it steps "
                "itself: call guard.step() (or use GuardedOptimizer), not before_step/after_step"
            )
        pending = self._decide(loss, replay, stacklevel=3)
        ctx = pending.ctx
        if pending.stepped:
            if self.telemetry is not None and self.telemetry.wants_update_ratio(ctx.step):
                self.telemetry.before_update(pending.stats)
            check_hyperparameters(self.optimizer, ctx.lr_scale)
            self._before_update(ctx)
            if ctx.lr_scale != 1.0:
                pending.saved_lrs = [g["lr"] for g in self.optimizer.param_groups]
                for g in self.optimizer.param_groups:
                    g["lr"] = g["lr"] * ctx.lr_scale
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._verify(pending)
        self._pending = pending
        return pending

    def after_step(self, pending: PendingStep) -> StepReport:
        """Second half of :meth:`step`: restore the LR, run the policies' after-step hooks
        (snapshots, EMA updates), count, and write telemetry. Returns the step's report."""
        if pending is not self._pending:
            raise GradGuardError(
                "after_step() needs the object returned by this Guard's last before_step()"
            )
        self._pending = None
        if pending.saved_lrs is not None:
            for g, lr in zip(self.optimizer.param_groups, pending.saved_lrs, strict=True):
                g["lr"] = lr
        if pending.stepped:
            self._after_update(pending)
            self._verify(pending)
        return self._conclude(pending)

    def _verify(self, pending: PendingStep) -> None:
        """After the step (taken or skipped): are the weights and the optimizer state (unless
        ``check_state=False`` and the gradients were too small to overflow it) finite? If not,
        roll back or raise. A skipped step is checked too: the state may have been corrupted
        before it, outside the Guard."""
        if not self.check_weights or pending.stale:
            return
        with_state = self.check_state or pending.stats.rescued
        if pending.update is not None and not with_state:
            finite = pending.update.finite  # the update's measurement read every weight's norm
        else:
            finite = finite_after_step(self.layout, self.optimizer, with_state)
        if finite:
            return
        reason, why = explain_nonfinite(self.layout, self.optimizer)
        ctx = pending.ctx
        if self._rollback is not None and self._rollback.recover(ctx, why):
            self._carry_out(ctx)
            ctx.skip_reason = "rollback"
            return
        raise IntegrityError(
            f"step {ctx.step}: {why}. The chain has no rollback, so the Guard cannot restore the "
            "last good state: add it (policy='default+rollback') to recover automatically",
            reason,
        )

    def _before_update(self, ctx: StepContext) -> None:
        """Before a step the optimizer takes: let the update policies choose how it is measured."""
        if not self._update_policies:
            return
        modes = {p.update_mode(ctx) for p in self._update_policies}
        mode: Mode | None = "exact" if "exact" in modes else "sample" if "sample" in modes else None
        self._update_measured = mode is not None
        if mode is not None:
            if self._probe is None:
                samples = min(getattr(p, "samples", 1024) for p in self._update_policies)
                self._probe = UpdateProbe(self.layout, samples=samples)
            self._probe.before(mode, check=self.check_weights)

    def _after_update(self, pending: PendingStep) -> None:
        """After the step the optimizer took: measure the update (when a policy asked) and apply
        the update policies' decisions, in chain order."""
        if not self._update_policies:
            return
        ctx = pending.ctx
        update = None
        if self._update_measured:
            self._update_measured = False
            assert self._probe is not None
            update = pending.update = self._probe.after()
        for policy in self._update_policies:
            decision = policy.decide_update(ctx, update)
            if decision is None:
                continue
            ctx.record(policy.name, decision.acted)
            ctx.metrics.update(decision.metrics)
            scale = decision.layer_scale
            if (
                scale is not None
                and update is not None
                and update.exact
                and any(s < 1.0 for s in scale)
            ):
                assert self._probe is not None
                self._probe.scale_layers_(scale)
                if decision.scale_moments:
                    self._probe.scale_moments_(self.optimizer, scale)
            if decision.row_scale:
                scale_rows_(decision.row_scale)

    def _decide(
        self, loss: Tensor | float | None, replay: Callable[[], Tensor] | None, stacklevel: int
    ) -> PendingStep:
        check_groups(self.optimizer, self._groups)
        check_hyperparameters(self.optimizer, 1.0)
        self._unscale()
        stats = compute_grad_stats(self.layout)
        if self._is_stale(stats):
            warnings.warn(
                "Guard.step() was called again on the same gradients without a backward() in between; "
                "this step is skipped. Call guard.step() once per optimizer step.",
                stacklevel=stacklevel + 1,
            )
            ctx = StepContext(
                self._step, stats, self.optimizer, skip=True, skip_reason="stale_grads"
            )
            return PendingStep(ctx, stats, stale=True)
        ctx = StepContext(
            self._step, stats, self.optimizer, loss=loss if isinstance(loss, Tensor) else None
        )
        if replay is not None and self.sync_free:
            raise ConfigError(
                "replay= reruns a failing step, which needs the host read sync_free avoids; "
                "drop replay, or build the Guard without sync_free"
            )
        if self._flag_path():
            _check_loss(loss)
            ctx.device_skip = True  # skip_nonfinite decides on the device: ctx.skip_flag
        elif self._needs_host:
            ctx.host = self._read_host(stats, loss)
            if self.scaler is not None and not ctx.host.finite:
                # An fp16 overflow: the scaler skips the step and backs its scale off. That is its
                # normal operation, not an incident for the policies to count or learn from.
                ctx.amp_overflow = True
                ctx.request_skip("amp_overflow")
        elif loss is not None and not isinstance(loss, (Tensor, int, float)):
            raise ConfigError(f"loss must be a tensor or a number, got {type(loss).__name__}")
        pending = PendingStep(ctx, stats)
        if replay is not None and self._nonfinite(ctx):
            # Rerun before any policy decides, so that all of them see the attribution.
            self._rerun(pending, replay, "nonfinite")
        for policy in self.policies:
            # Once the step is cancelled, clipping and resetting policies neither act on it nor
            # learn from it; skip/rollback/react policies still see it (incidents are their input),
            # except an AMP overflow, which only the reacting ones see (as a calm step).
            if ctx.skip and policy.kind in ("clip", "reset"):
                continue
            if ctx.amp_overflow and policy.kind != "react":
                continue
            policy.apply(ctx)
            self._carry_out(ctx)
            if replay is not None and self._spiked(ctx, policy) and self._spike_reruns():
                # A spike is known only once its detector has run: rerun right after it, so the
                # policies after it in the chain see the attribution.
                self._rerun(pending, replay, "spike")
        if ctx.rollback_request is not None and self._rollback is not None and not ctx.rollback:
            # Asked by a policy after rollback in the chain: honoured before the update all the same.
            self._rollback.honour_request(ctx)
            self._carry_out(ctx)
        return pending

    def _flag_path(self) -> bool:
        """This step skips through the optimizer's device flag (``sync_free``, once every
        parameter has optimizer state)."""
        if self.sync_free and not self._states_ready:
            self._states_ready = states_ready(self.optimizer, self.layout.params)
        return self.sync_free and self._states_ready

    def _carry_out(self, ctx: StepContext) -> None:
        """Do what the policy that just ran asked of the model and the optimizer (a policy
        decides, the Guard acts): load the snapshot it picked, zero the moments, drop the
        gradients (:mod:`gradguard.actions`)."""
        if ctx.restore is not None:
            snap, ctx.restore = ctx.restore, None
            load_snapshot_(self.layout, self.optimizer, snap)
        if ctx.reset:
            for i in ctx.reset:
                reset_param_state_(self.optimizer, self.layout.params[i], ctx.reset_step)
            ctx.reset = []
        if ctx.drop:
            drop_grads_(ctx.stats, ctx.drop)
            ctx.drop = []

    def _conclude(self, pending: PendingStep) -> StepReport:
        ctx, stats, stepped = pending.ctx, pending.stats, pending.stepped
        if pending.stale:
            return self._finish(ctx, stats, False)
        try:
            for policy in self.policies:
                policy.after_step(ctx, stepped)
        except BaseException:
            # The optimizer has stepped (e.g. a snapshot could not be written): count the step
            # before the error reaches the caller, so counters and the stale check stay true.
            self._finish(ctx, stats, stepped)
            raise
        report = self._finish(ctx, stats, stepped)
        report.localization = pending.localization
        report.rerun = ctx.rerun
        report.rerun_detail = pending.rerun
        if self.telemetry is not None:
            if ctx.skip_flag is not None:
                stepped = not report.skipped  # the telemetry reads it anyway: one read
            self.telemetry.after_step(self, ctx, stats, report, stepped, pending.localization)
        return report

    def _nonfinite(self, ctx: StepContext) -> bool:
        host = ctx.host
        if host is None or ctx.amp_overflow:
            return False
        return not host.finite or (host.loss is not None and not math.isfinite(host.loss))

    @staticmethod
    def _spiked(ctx: StepContext, policy: Policy) -> bool:
        """The policy that just ran flagged a finite spike (:meth:`Policy.spiked`), and the step
        is still the model's own: not rerun yet, not rolled back (the model is then no longer the
        one that made the step), no AMP overflow."""
        if ctx.rollback or ctx.amp_overflow or ctx.rerun is not None:
            return False
        return policy.spiked(ctx)

    def _spike_reruns(self) -> bool:
        """Spikes are rerun in a single process only: under DDP/FSDP a rank's rerun sees its own
        batch's gradient, which cannot be compared with the step's averaged one."""
        return self._world == 1

    def _rerun(self, pending: PendingStep, replay: Callable[[], Tensor], trigger: str) -> None:
        """Rerun the failing step once (localize's replay: hooks armed, the model, gradients and
        RNG restored) and classify it (``localize.attribute``): the attribution goes on the
        StepContext (for the policies still to decide), the report and the telemetry; for a
        non-finite step the same replay also gives where the NaN/Inf starts."""
        if self.model is None:
            return
        from .replay import attribute
        from .replay import replay as run_replay

        ctx = pending.ctx
        loc = run_replay(self.model, replay, measure=self.layout.params)
        host = ctx.host
        norm = host.norm if host is not None else float(pending.stats.norm)
        loss = host.loss if host is not None else None
        result = attribute(trigger, norm, loss, loc)
        if self._world > 1:
            # Every rank reruns the same failing step (the decision to is rank-consistent); the bad
            # batch may sit on one rank only: reproducible if any rank's rerun reproduced it, so
            # that every rank acts alike.
            flag = torch.tensor([float(result == "reproducible")], device=pending.stats.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            result = "reproducible" if flag.item() > 0 else "transient"
        ctx.rerun, ctx.rerun_trigger = result, trigger
        pending.rerun = {
            "result": result,
            "trigger": trigger,
            "grad_norm": loc.detail.get("grad_norm"),
            "loss": loc.detail.get("loss"),
        }
        if loc.origin:
            pending.rerun["origin"] = loc.origin
        if trigger == "nonfinite":
            pending.localization = loc.as_record(ctx.step)

    def _unscale(self) -> None:
        if self.scaler is None:
            return
        try:
            self.scaler.unscale_(self.optimizer)
        except RuntimeError as e:
            if "already been called" not in str(e):
                raise

    def _read_host(self, stats: GradStats, loss: Tensor | float | None) -> HostView:
        """The single host sync of a step: the global norm (its finiteness is the step's), and the
        loss and per-parameter norms when given or needed, read together in one transfer."""
        _check_loss(loss)
        loss_val: float | None = None
        parts = []
        if isinstance(loss, Tensor):
            parts.append(
                self._mean_over_ranks(
                    loss.detach().to(device=stats.device, dtype=torch.float32).reshape(1)
                )
            )
        elif loss is not None:
            loss_val = float(loss)
            if self._world > 1:
                loss_val = float(
                    self._mean_over_ranks(torch.tensor([loss_val], device=stats.device))
                )
        param_norms = None
        if self._needs_host_param_norms:
            parts.append(stats.raw_param_norms)
        if parts:
            values = torch.cat([stats.norm.reshape(1), *parts]).tolist()
            norm = values[0]
            if isinstance(loss, Tensor):
                loss_val = values[1]
            if self._needs_host_param_norms:
                param_norms = values[len(values) - stats.raw_param_norms.numel() :]
        else:
            norm = stats.norm.item()
        if not math.isfinite(norm) and stats.rescue_():
            # The norm overflowed while every element is finite: re-measured exactly (rare).
            norm = stats.norm.item()
            if param_norms is not None:
                param_norms = stats.raw_param_norms.tolist()
        # A NaN or Inf in any gradient makes the global norm non-finite (see GradStats.finite).
        return HostView(
            norm=norm, finite=math.isfinite(norm), loss=loss_val, param_norms=param_norms
        )

    @property
    def _world(self) -> int:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1
        return torch.distributed.get_world_size()

    def _mean_over_ranks(self, t: Tensor) -> Tensor:
        """The loss averaged over ranks, so that loss-aware policies decide alike on every rank
        (gradients are already identical: DDP averages them, sharded norms are all-reduced)."""
        if self._world > 1:
            torch.distributed.all_reduce(t)
            t = t / self._world
        return t

    def _apply_step(self, lr_scale: float) -> None:
        groups = self.optimizer.param_groups
        saved = None
        if lr_scale != 1.0:
            # Scale only around the step, so schedulers keep reading and writing their own LR.
            saved = [g["lr"] for g in groups]
            for g in groups:
                g["lr"] = g["lr"] * lr_scale
        try:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        finally:
            if saved is not None:
                for g, lr in zip(groups, saved, strict=True):
                    g["lr"] = lr

    def _is_stale(self, stats: GradStats) -> bool:
        """True if the first gradient is the very tensor the last step applied, unmodified since."""
        if not stats.grads or self._last_grad is None:
            return False
        ref, version = self._last_grad
        return ref() is stats.grads[0] and stats.grads[0]._version == version

    def _finish(self, ctx: StepContext, stats: GradStats, stepped: bool) -> StepReport:
        flag = ctx.skip_flag  # sync_free: the skip is a device flag, the optimizer stepped with it
        self._count(ctx, stepped)
        if stepped:
            g = stats.grads[0] if stats.grads else None
            self._last_grad = (weakref.ref(g), g._version) if g is not None else None
        else:
            self._last_grad = None
        report = StepReport(
            step=ctx.step,
            norms=stats.summary(),
            skipped=flag if flag is not None else not stepped,
            skip_reason=ctx.flag_reasons if flag is not None else ctx.skip_reason,
            rolled_back=ctx.rollback,
            lr_scale=ctx.lr_scale,
            acted=ctx.acted,
            layers=ctx.layers,
            metrics=ctx.metrics,
            layer_names=self.layout.layer_names,
            policy_kinds=self._kinds,
            layer_stats=self.layer_stats and bool(stats.grads),
        )
        self._step += 1
        if flag is not None:
            self._check_flag_streak(ctx, flag)
            return report
        if stepped:
            self._streak.clear()
        elif ctx.skip_reason not in ("amp_overflow", "stale_grads"):
            self._streak[ctx.skip_reason or "skipped"] += 1
        streak = sum(self._streak.values())
        if self.max_consecutive_skips is not None and streak >= self.max_consecutive_skips:
            self._raise_stall(ctx, streak)
        return report

    def _count(self, ctx: StepContext, stepped: bool) -> None:
        """The step in the counters: taken, skipped (a device flag with ``sync_free``), rolled
        back, clipped (once however many clipping policies acted), each policy's action."""
        tally, flag = self._tally, ctx.skip_flag
        tally.add("steps", 1)
        if flag is not None:
            tally.add("skipped", flag)
        elif ctx.skip_reason == "amp_overflow":
            tally.add("amp_overflow", 1)
        elif ctx.skip:
            tally.add("skipped", 1)
        if ctx.rollback:
            tally.add("rolled_back", 1)
        clip_flags: list[Tensor | bool] = []
        for name, acted in ctx.acted.items():
            tally.add(f"acted.{name}", acted)
            if self._kinds.get(name) == "clip" and acted is not False:
                clip_flags.append(acted)
        if not stepped or not clip_flags:
            return
        if flag is not None:
            clipped = torch.stack([torch.as_tensor(f, device=flag.device) for f in clip_flags])
            tally.add("clipped", clipped.any() & ~flag)
        elif any(f is True for f in clip_flags):
            tally.add("clipped", 1)
        elif len(clip_flags) == 1:
            tally.add("clipped", clip_flags[0])
        else:  # tensors only: a True is counted above, a False never kept
            tally.add("clipped", torch.stack(cast("list[Tensor]", clip_flags)).any())

    def _check_flag_streak(self, ctx: StepContext, flag: Tensor) -> None:
        """``sync_free``: count skips in a row on the device; read the count every
        ``max_consecutive_skips`` steps (the only host read) and raise on a stall."""
        limit = self.max_consecutive_skips
        if limit is None:
            return
        prev = self._flag_streak
        one = flag.to(torch.int64)
        self._flag_streak = one if prev is None else (prev + 1) * one
        if self._step % limit == 0:
            streak = int(self._flag_streak.item())
            if streak >= limit:
                self._streak = Counter({"nonfinite (sync_free)": streak})
                self._raise_stall(ctx, streak)

    def _raise_stall(self, ctx: StepContext, streak: int) -> None:
        reasons = ", ".join(f"{r} x{n}" for r, n in self._streak.most_common())
        host = ctx.host
        seen = ""
        if host is not None:
            seen = f"; last gradient norm {host.norm:.3g}" + (
                f", loss {host.loss:.3g}" if host.loss is not None else ""
            )
        raise StallError(
            f"the last {streak} steps (to step {ctx.step}) were all skipped ({reasons}){seen}: "
            "the run is not training any more. Lower the learning rate, check the data for a run "
            "of bad batches, or add rollback to go back to the last good state; "
            "max_consecutive_skips sets how many skips in a row are tolerated",
            "stalled",
        )

    # ----- counters and state -------------------------------------------------------------------------
    @property
    def policy_kinds(self) -> dict[str, str]:
        """Each policy of the chain by name, and its kind (``clip``, ``skip``, ``react`` ...)."""
        return dict(self._kinds)

    @property
    def counters(self) -> dict[str, int]:
        """steps, clipped, skipped, rolled_back, amp_overflow, and per-policy action counts
        (``acted.<policy>``). Reading it syncs once (clip counts may live on the device)."""
        return self._tally.read()

    @property
    def spec(self) -> str:
        """The spec string of the chain as it runs (including the implicit ``skip_nonfinite``)."""
        return "+".join(p.spec() for p in self.policies)

    def state_dict(self) -> dict[str, Any]:
        """Counters, every policy's state, and a fingerprint of the guarded parameters (names and
        shapes); with the model's and optimizer's state dicts it resumes a run exactly. Loads with
        ``torch.load(..., weights_only=True)``."""
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "counters": self.counters,
            "skip_streak": dict(self._streak),
            "fingerprint": self._fingerprint(),
            "policies": [{"name": p.name, "state": p.state_dict()} for p in self.policies],
        }

    def _fingerprint(self) -> dict[str, list[Any]]:
        return {
            "names": list(self.layout.names),
            "shapes": [list(p.shape) for p in self.layout.params],
        }

    def check_state_dict(self, state: Any) -> None:
        """Raise :class:`~gradguard.errors.ConfigError` if :meth:`load_state_dict` would refuse
        ``state``; change nothing.

        Checked: that it is a Guard state dict, saved with the same chain, on the same parameters
        (names and shapes, in order; a state saved before the fingerprint was recorded is
        accepted), with a step count and counters that are integers >= 0, and that every policy
        accepts its own state (:meth:`Policy.check_state`: finite statistics of the right form).
        """
        if not isinstance(state, dict) or not isinstance(state.get("policies"), (list, tuple)):
            raise ConfigError(
                "not a Guard state dict: expected the dict returned by Guard.state_dict()"
            )
        for i, entry in enumerate(state["policies"]):
            if not (
                isinstance(entry, dict) and isinstance(entry.get("name"), str) and "state" in entry
            ):
                raise ConfigError(
                    f"not a Guard state dict: policies[{i}] is {type(entry).__name__}, not a "
                    "{'name': ..., 'state': ...} entry; expected the dict returned by Guard.state_dict()"
                )
        saved = [p["name"] for p in state["policies"]]
        mine = [p.name for p in self.policies]
        if saved != mine:
            raise ConfigError(
                f"the saved Guard ran the chain {'+'.join(saved)} but this Guard runs {'+'.join(mine)}; build it with the same policy"
            )
        self._check_fingerprint(state.get("fingerprint"))
        step = state.get("step")
        if not _is_count(step):
            raise ConfigError(
                f"Guard state: step={step!r} must be an integer >= 0 (the number of steps taken); "
                "load the dict Guard.state_dict() returned"
            )
        for key in ("counters", "skip_streak"):
            counts = state.get(key, {})
            if not isinstance(counts, dict):
                raise ConfigError(
                    f"Guard state: {key} must be a dict of counts, got {type(counts).__name__}; "
                    "load the dict Guard.state_dict() returned"
                )
            for name, n in counts.items():
                if not isinstance(name, str) or not _is_count(n):
                    raise ConfigError(
                        f"Guard state: {key}[{name!r}]={n!r} must be an integer >= 0; load the "
                        "dict Guard.state_dict() returned"
                    )
        for p, s in zip(self.policies, state["policies"], strict=True):
            p.check_state(s["state"])

    def _check_fingerprint(self, saved: Any) -> None:
        if saved is None:
            return  # saved before gradguard recorded one: accepted unchecked
        fix = (
            "load it into a Guard built on the same model and optimizer (the same parameters, in "
            "the same order), or build this Guard afresh without loading the state"
        )
        names, shapes = (
            (saved.get("names"), saved.get("shapes")) if isinstance(saved, dict) else (None, None)
        )
        if not (
            isinstance(names, (list, tuple))
            and isinstance(shapes, (list, tuple))
            and len(names) == len(shapes)
        ):
            raise ConfigError(
                f"Guard state: the parameter fingerprint {saved!r} is malformed; {fix}"
            )
        mine = self._fingerprint()
        here = list(zip(mine["names"], map(tuple, mine["shapes"]), strict=True))
        there = [
            (n, tuple(s) if isinstance(s, (list, tuple)) else s)
            for n, s in zip(names, shapes, strict=True)
        ]
        if here == there:
            return
        first = next(
            (i for i, (a, b) in enumerate(zip(here, there, strict=False)) if a != b),
            min(len(here), len(there)),
        )

        def show(pairs: list[Any], i: int) -> str:
            return f"{pairs[i][0]} {pairs[i][1]}" if i < len(pairs) else "nothing"

        raise ConfigError(
            f"the saved Guard guarded another model: {len(there)} parameters where this one guards "
            f"{len(here)}, and parameter {first} was {show(there, first)} where it is "
            f"{show(here, first)} here; {fix}"
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. The whole state is checked first
        (:meth:`check_state_dict`): a state that does not fit this Guard raises
        :class:`~gradguard.errors.ConfigError` and leaves the Guard exactly as it was."""
        self.check_state_dict(state)
        backup = [p.state_dict() for p in self.policies]
        try:
            for p, s in zip(self.policies, state["policies"], strict=True):
                p.load_state_dict(s["state"])
        except BaseException:
            # check_state passed but a load failed all the same: put every policy back as it was.
            for p, b in zip(self.policies, backup, strict=True):
                p.load_state_dict(b)
            raise
        self._step = int(state["step"])
        self._tally.load(state.get("counters", {}))
        self._streak = Counter({str(k): int(v) for k, v in state.get("skip_streak", {}).items()})

    # ----- telemetry and resources ------------------------------------------------------------------
    def close(self) -> None:
        """Finish the telemetry (pending steps, the end record, TensorBoard files) and release what
        the policies hold (e.g. the temp folder of ``rollback:to=disk`` without a path). Idempotent."""
        try:
            if self.telemetry is not None and not self.telemetry.closed:
                self.telemetry.close(self.counters)
        finally:
            for p in self.policies:
                p.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Guard(policy={self.spec!r}, params={len(self.layout)}, layers={len(self.layout.layer_names)})"
