"""gradguard for PyTorch Lightning: :class:`GuardCallback`.

    trainer = lightning.Trainer(callbacks=[GuardCallback(policy="default", log_dir="runs/gg")])

How it fits Lightning's step (automatic and manual optimization, 32-bit, bf16 and fp16 AMP):

- ``on_before_backward`` collects the loss (summed over accumulated micro-batches, unscaled under
  fp16 AMP), so loss-aware policies (``skip_spike``, ``rollback``) see it.
- ``on_before_optimizer_step`` runs after backward and after Lightning's AMP unscaling, and before
  Lightning's own clipping: the Guard measures and mitigates there (:meth:`Guard.before_step`).
  Leave ``Trainer(gradient_clip_val=...)`` off: it would clip again after the Guard; put the
  threshold in the policy instead (``clip_norm:1.0``).
- A skip drops the gradients (``.grad = None``), so the ``optimizer.step()`` Lightning then calls
  leaves every parameter, its moments and its step count untouched (true of every
  ``torch.optim`` optimizer). The LR scheduler still counts the batch, as it does when the fp16
  scaler skips an overflowing step.
- The step is concluded (:meth:`Guard.after_step`: snapshots, statistics, telemetry) by a post-step
  hook on the optimizer, and metrics go to the module's logger from ``on_train_batch_end``:
  ``gradguard/grad_norm``, ``gradguard/skipped`` (the step's flag) and, at Lightning's logging
  cadence, the counters (``gradguard/total_skipped``, ``gradguard/total_clipped``, ...).
- ``state_dict`` / ``load_state_dict`` put the Guard's state (statistics, counters, rollback
  snapshot) in Lightning's checkpoints, so ``trainer.fit(..., ckpt_path=...)`` resumes exactly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..guard import Guard, PendingStep
from ..policies import Policy, parse_spec
from ..report import StepReport

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gradguard.integrations.lightning needs PyTorch Lightning: pip install 'gradguard[lightning]'"
    ) from e


def _raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Lightning hands hooks a ``LightningOptimizer`` (automatic) or the optimizer (manual)."""
    return getattr(optimizer, "_optimizer", optimizer)


class _Slot:
    """One guarded optimizer: its Guard, the loss of the step being accumulated, the step pending."""

    def __init__(self, guard: Guard):
        self.guard = guard
        self.loss: Tensor | None = None
        self.pending: PendingStep | None = None
        self.report: StepReport | None = None
        self.hook: Any = None


class GuardCallback(pl.Callback):
    """Guard every optimizer of a ``lightning.Trainer`` run.

    Args:
        policy: the Guard's policy spec or policies (see ``gradguard.available_policies()``).
        log_dir: write the Guard's telemetry (JSONL + TensorBoard) here; ``gradguard report DIR``
            renders it. With several optimizers, each gets a subfolder ``opt<i>``.
        layer_stats, check_finite: as for :class:`~gradguard.Guard`.
        log_metrics: send ``gradguard/*`` metrics to the module's logger.
    """

    def __init__(
        self,
        policy: str | Policy | Iterable[str | Policy] | None = "default",
        *,
        log_dir: str | os.PathLike | None = None,
        layer_stats: bool = False,
        check_finite: bool = True,
        log_metrics: bool = True,
    ):
        super().__init__()
        self.policy = policy
        self.log_dir = log_dir
        self.layer_stats = layer_stats
        self.check_finite = check_finite
        self.log_metrics = log_metrics
        self._slots: dict[int, _Slot] = {}
        self._restored: dict[str, Any] | None = None
        if isinstance(policy, str):
            parse_spec(policy)  # a bad spec fails here, not at the first step of a long run

    # ----- setup -----------------------------------------------------------------------------------
    @property
    def guards(self) -> list[Guard]:
        """The Guards, one per optimizer, in the trainer's optimizer order (after fit starts)."""
        return [s.guard for s in self._slots.values()]

    @property
    def guard(self) -> Guard:
        """The Guard of the run's (only) optimizer."""
        if len(self._slots) != 1:
            raise ConfigError(
                f"this run has {len(self._slots)} guarded optimizers; use callback.guards"
            )
        return next(iter(self._slots.values())).guard

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.gradient_clip_val:
            warnings.warn(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips after the Guard has "
                "measured and mitigated, so its clipping is not recorded and statistics-based "
                "policies see unclipped norms it then overrides; leave it off and put the "
                "threshold in the policy (e.g. policy='skip_nonfinite+zclip+clip_norm:1.0')",
                stacklevel=2,
            )
        optimizers = [_raw_optimizer(o) for o in trainer.optimizers]
        if not optimizers:
            raise ConfigError(
                "GuardCallback found no optimizer: configure_optimizers returned none"
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._remove_hooks()
        self._slots = {}
        for i, opt in enumerate(optimizers):
            log_dir = self.log_dir
            if log_dir is not None and len(optimizers) > 1:
                log_dir = os.path.join(log_dir, f"opt{i}")
            if log_dir is not None and trainer.global_rank != 0:
                log_dir = os.path.join(log_dir, f"rank{trainer.global_rank}")
            guard = Guard(
                pl_module,
                opt,
                self.policy,
                scaler=scaler,
                check_finite=self.check_finite,
                layer_stats=self.layer_stats,
                log_dir=log_dir,
            )
            slot = _Slot(guard)
            slot.hook = opt.register_step_post_hook(self._make_post_hook(slot))
            self._slots[id(opt)] = slot
        if self._restored is not None:
            self._load_guards(self._restored)
            self._restored = None

    def _make_post_hook(self, slot: _Slot):
        def post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._conclude(slot)

        return post_hook

    def _remove_hooks(self) -> None:
        for slot in self._slots.values():
            if slot.hook is not None:
                slot.hook.remove()
                slot.hook = None

    def _slot(self, optimizer: Any) -> _Slot | None:
        return self._slots.get(id(_raw_optimizer(optimizer)))

    # ----- the step --------------------------------------------------------------------------------
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        loss = loss.detach()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # fp16 AMP hands this hook the scaled loss; divide on the device (no sync).
            loss = loss / scaler._scale if scaler._scale is not None else loss
        # Which optimizer this backward feeds is known only at the step: give every slot the loss
        # (in automatic optimization with one optimizer, the usual case, that is exact).
        for slot in self._slots.values():
            slot.loss = loss if slot.loss is None else slot.loss + loss

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        slot = self._slot(optimizer)
        if slot is None:
            return
        if slot.pending is not None:  # the last step never reached optimizer.step (AMP skip)
            self._conclude(slot)
        loss, slot.loss = slot.loss, None
        slot.pending = slot.guard.before_step(loss)

    def _conclude(self, slot: _Slot) -> None:
        if slot.pending is not None:
            pending, slot.pending = slot.pending, None
            slot.report = slot.guard.after_step(pending)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for i, slot in enumerate(self._slots.values()):
            self._conclude(slot)
            report, slot.report = slot.report, None
            if report is None or not self.log_metrics:
                continue
            prefix = "gradguard/" if len(self._slots) == 1 else f"gradguard/opt{i}/"
            metrics: dict[str, float] = {
                f"{prefix}grad_norm": report.grad_norm,
                f"{prefix}skipped": float(report.skipped),
            }
            # Lightning sets log_every_n_steps on the Trainer (its logger connector) undeclared.
            if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:  # type: ignore[attr-defined]
                for key, value in slot.guard.counters.items():
                    metrics[f"{prefix}total_{key.replace('.', '_')}"] = float(value)
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for slot in self._slots.values():
            self._conclude(slot)
            slot.guard.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            for slot in self._slots.values():
                slot.guard.close()
            self._remove_hooks()

    # ----- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"guards": [s.guard.state_dict() for s in self._slots.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before it builds the optimizers: keep it for on_fit_start.
        if self._slots:
            self._load_guards(state_dict)
        else:
            self._restored = state_dict

    def _load_guards(self, state: dict[str, Any]) -> None:
        saved = state.get("guards", [])
        if len(saved) != len(self._slots):
            raise ConfigError(
                f"the checkpoint holds {len(saved)} Guard state(s) but this run has "
                f"{len(self._slots)} optimizer(s); resume with the same configure_optimizers"
            )
        # Every Guard's state is checked before any is loaded: no partial resume.
        for slot, s in zip(self._slots.values(), saved, strict=True):
            slot.guard.check_state_dict(s)
        for slot, s in zip(self._slots.values(), saved, strict=True):
            slot.guard.load_state_dict(s)
