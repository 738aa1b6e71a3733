"""gradguard for the Hugging Face ``transformers.Trainer``.

The Trainer clips (``max_grad_norm``) before its ``on_pre_optimizer_step`` callback, so no
callback sees the gradients as backward left them. The Guard therefore sits in the optimizer:

- :class:`GuardedTrainer`, a ``Trainer`` whose optimizer (its own or the one you pass) is wrapped in
  a :class:`~gradguard.optim.GuardedOptimizer`. It takes over ``max_grad_norm`` (see below), puts
  the Guard's metrics in the Trainer's logs and saves the Guard's state inside ``optimizer.pt`` of
  every checkpoint, so ``train(resume_from_checkpoint=...)`` resumes it exactly::

      trainer = GuardedTrainer(model=model, args=args, train_dataset=ds, guard_policy="default")

- :class:`GuardCallback`, a ``TrainerCallback``: the Guard's counters in the logs
  (``gradguard/skipped``, ``gradguard/clipped``, ...), its telemetry finished at the end of training,
  and a warning when ``max_grad_norm`` would clip before the Guard. ``GuardedTrainer`` adds it;
  with a plain ``Trainer``, pass both yourself::

      opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=5e-5), model=model)
      args = TrainingArguments(..., max_grad_norm=0.0)       # the Guard clips, not the Trainer
      Trainer(model=model, args=args, optimizers=(opt, None), callbacks=[GuardCallback()])

``max_grad_norm``: the Trainer's clipping would hide the raw norm from the Guard (spike detection,
ZClip's and AutoClip's statistics, the telemetry would all see clipped norms). ``GuardedTrainer``
turns it off in the Trainer and gives its threshold to the Guard: ``clip_norm`` in the chain takes
the value ``max_grad_norm`` (appended if the chain has none). ``max_grad_norm=0`` leaves the chain
as given. The Trainer's logged ``grad_norm`` stays the raw, pre-Guard norm.

A skipped step: the optimizer does not step, the gradients are zeroed; the Trainer still counts the
step and steps its LR scheduler, as it does for an fp16 overflow skipped by the scaler.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any, cast

from ..errors import ConfigError
from ..optim import GuardedOptimizer, unwrap_guarded
from ..policies import Policy, parse_spec

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gradguard.integrations.hf needs Hugging Face Transformers: pip install 'gradguard[hf]'"
    ) from e


def adopt_max_grad_norm(
    policy: str | Policy | Iterable[str | Policy] | None, max_grad_norm: float
) -> list[Policy]:
    """The chain ``policy`` with the Trainer's ``max_grad_norm`` as its ``clip_norm`` threshold."""
    from ..policies import clip_norm

    chain = parse_spec(policy)
    if not max_grad_norm or max_grad_norm <= 0:
        return chain
    for i, p in enumerate(chain):
        if p.name == "clip_norm":
            chain[i] = clip_norm(max_grad_norm, norm_type=cast(clip_norm, p).norm_type)
            return chain
    chain.append(clip_norm(max_grad_norm))
    return chain


def _metrics(guarded: GuardedOptimizer) -> dict[str, float]:
    counters = guarded.guard.counters
    out = {f"gradguard/{k.replace('acted.', 'acted_')}": float(v) for k, v in counters.items()}
    report = guarded.last_report
    if report is not None:
        out["gradguard/grad_norm"] = report.grad_norm
    return out


class GuardCallback(TrainerCallback):
    """The Guard's counters in the Trainer's logs, its telemetry closed at the end of training."""

    def __init__(self) -> None:
        self.guarded: GuardedOptimizer | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.guarded = unwrap_guarded(optimizer)
        if self.guarded is None:
            raise ConfigError(
                "GuardCallback found no GuardedOptimizer in this Trainer: pass "
                "optimizers=(GuardedOptimizer(optimizer, model=model), scheduler) to the Trainer, "
                "or use gradguard.integrations.hf.GuardedTrainer"
            )
        if args.max_grad_norm and args.max_grad_norm > 0:
            warnings.warn(
                f"TrainingArguments(max_grad_norm={args.max_grad_norm}) makes the Trainer clip "
                "before the Guard sees the gradients, hiding the raw norm from it; set "
                "max_grad_norm=0 and put the threshold in the policy (clip_norm:...), or use "
                "GuardedTrainer, which does this for you",
                stacklevel=2,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.guarded is None or logs is None or "loss" not in logs:
            return
        metrics = _metrics(self.guarded)
        logs.update(metrics)
        # The Trainer records a copy of the logs before calling back: complete it too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.guarded is not None:
            self.guarded.close()


class GuardedTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose every optimizer step goes through a Guard.

    Keyword args (besides the Trainer's):
        guard_policy: the Guard's policy spec or policies (default ``"default"``).
        guard_log_dir: write the Guard's telemetry here (``gradguard report DIR`` renders it).
        guard_layer_stats: per-layer norms on every step's report.
    """

    def __init__(
        self,
        *args: Any,
        guard_policy: str | Policy | Iterable[str | Policy] | None = "default",
        guard_log_dir: str | os.PathLike | None = None,
        guard_layer_stats: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.guard_policy = adopt_max_grad_norm(guard_policy, self.args.max_grad_norm)
        self.args.max_grad_norm = 0.0  # the Guard clips at that threshold (see the module doc)
        self.guard_log_dir = guard_log_dir
        self.guard_layer_stats = guard_layer_stats
        self.guard_callback = GuardCallback()
        # First, so that the reporting callbacks (TensorBoard, W&B, ...) log the Guard's metrics.
        self.callback_handler.callbacks.insert(0, self.guard_callback)

    def create_optimizer(self, model: Any = None) -> Any:
        optimizer = super().create_optimizer(model)
        if unwrap_guarded(optimizer) is None:
            if self.args.world_size > 1 and self.guard_log_dir is not None:
                log_dir: str | os.PathLike | None = os.path.join(
                    self.guard_log_dir, f"rank{self.args.process_index}"
                )
            else:
                log_dir = self.guard_log_dir
            self.optimizer = GuardedOptimizer(
                optimizer,
                model=self.model,
                policy=self.guard_policy,
                layer_stats=self.guard_layer_stats,
                log_dir=log_dir,
            )
        return self.optimizer

    @property
    def guard(self):
        """The Guard (after training has started)."""
        guarded = unwrap_guarded(self.optimizer)
        if guarded is None:
            raise ConfigError("the Guard is built with the optimizer, when train() starts")
        return guarded.guard
