"""The one torch training loop: a bench run (:mod:`gradguard.bench.train`) and an advise probe
of a user's entry point (:mod:`gradguard.advice.runs`) both step through :func:`train_loop`.

What differs between them comes in as callables: ``forward(step)`` draws the step's batch and
runs the forward and backward passes (a bench run: its task, faults on the batch, DDP slices; an
entry point: the user's loss); ``before_update`` and ``after_update`` run around the update
(faults on the gradients and the optimizer; the LR scheduler); ``evaluate`` says whether the run
has reached its target. The loop owns the rest, once: the Guard's step (or the bare optimizer's,
measured), the per-step record, what stops a run (the Guard halting it, non-finite weights, an
unguarded non-finite loss), and the time spent in the Guard. The Keras bench has its own trainer
(:mod:`gradguard.bench.keras_loop`) behind the same ``train_run`` interface and result
(:func:`gradguard.bench.train.run_result`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import TrainingHalted
from ..guard import Guard
from ..stats import all_finite

#: ``forward(step) -> (loss, replay)``: the step's loss after its backward pass (the whole
#: batch's), and a closure that reruns the forward for ``guard.step(replay=...)``.
Forward = Callable[[int], tuple[torch.Tensor, Callable[[], torch.Tensor]]]


def make_guard(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    policy: str | None,
    log_dir: str | os.PathLike | None,
    *,
    measured: bool | None = None,
) -> Guard | None:
    """The run's Guard: ``policy``'s; with no policy, a measuring-only one (no policy, no
    finiteness skip), which trains exactly as the bare optimizer does, where ``measured`` (by
    default: where there is a ``log_dir`` to record in); else None. Under DDP every rank builds
    the Guard the main rank builds, with ``log_dir`` on the main rank only."""
    if policy is not None:
        return Guard(model, opt, policy, log_dir=log_dir)
    if log_dir is not None if measured is None else measured:
        return Guard(model, opt, "none", check_finite=False, log_dir=log_dir)
    return None


def params_finite(model: nn.Module) -> bool:
    """Whether every weight is finite: one fused norm pass, and an exact look only at a tensor
    whose norm overflowed (huge but finite weights are not called non-finite)."""
    return all_finite([p.detach() for p in model.parameters()])


def step_row(
    step: int, loss: float, lr: float, *, report: Any = None, norm: float | None = None
) -> dict[str, Any]:
    """One step's record: from the Guard's report, or (unguarded) the measured norm."""
    if report is not None:
        return {
            "step": step,
            "loss": loss,
            "grad_norm": report.grad_norm,
            "grad_norm_after": report.grad_norm_after,
            "clipped": report.clipped,
            "skipped": report.skipped,
            "lr": lr * report.lr_scale,
        }
    return {
        "step": step,
        "loss": loss,
        "grad_norm": norm,
        "grad_norm_after": norm,
        "clipped": False,
        "skipped": False,
        "lr": lr,
    }


@dataclass
class LoopRun:
    """What :func:`train_loop` measured: the per-step records and how the run ended."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    first_loss: float | None = None
    #: Why the run stopped early (the Guard's ``TrainingHalted`` reason, ``nonfinite_weights``,
    #: ``nonfinite_loss``), or None.
    diverged_reason: str | None = None
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    wall: float = 0.0
    guard_seconds: float = 0.0
    #: The Guard's counters (empty without a policy).
    counters: dict[str, int] = field(default_factory=dict)


def train_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    guard: Guard | None,
    steps: int,
    forward: Forward,
    *,
    guarded: bool,
    params: Iterable[torch.Tensor] | None = None,
    check_weights: bool = True,
    before_update: Callable[[int], None] | None = None,
    after_update: Callable[[int], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    evaluate: Callable[[int], bool] | None = None,
) -> LoopRun:
    """Train ``steps`` steps of ``forward`` and return what was measured; closes the Guard.

    ``guard``: the run's Guard (:func:`make_guard`; None: the bare optimizer steps, and the norm
    of ``params``' gradients, by default the model's, is measured for the record). ``guarded``:
    a policy guards the run (a measuring-only Guard does not: a non-finite loss then stops the
    run, as unguarded). ``check_weights``: read the weights' finiteness after each step (a Guard
    that checks them itself has already done so). ``evaluate(step)``: whether the run has now
    reached its target (the first time it has, the step and the time are recorded)."""
    params = list(model.parameters() if params is None else params)
    run = LoopRun()
    t0 = time.perf_counter()
    for step in range(steps):
        loss, replay = forward(step)
        loss_val = float(loss.detach())
        if run.first_loss is None and math.isfinite(loss_val):
            run.first_loss = loss_val
        if before_update is not None:
            before_update(step)
        row = _update(run, opt, guard, params, step, loss, loss_val, replay)
        if row is None:  # the Guard halted the run
            break
        if after_update is not None:
            after_update(step)
        run.steps.append(row)
        if on_step is not None:
            on_step(step)
        if check_weights and not params_finite(model):
            run.diverged_reason = "nonfinite_weights"
            break
        if not guarded and not math.isfinite(loss_val):
            run.diverged_reason = "nonfinite_loss"
            break
        if evaluate is not None and run.steps_to_target is None and evaluate(step):
            run.steps_to_target, run.seconds_to_target = step + 1, time.perf_counter() - t0
    run.wall = time.perf_counter() - t0
    if guard is not None:
        run.counters = dict(guard.counters) if guarded else {}
        guard.close()
    return run


def _update(
    run: LoopRun,
    opt: torch.optim.Optimizer,
    guard: Guard | None,
    params: list[torch.Tensor],
    step: int,
    loss: torch.Tensor,
    loss_val: float,
    replay: Callable[[], torch.Tensor],
) -> dict[str, Any] | None:
    """The step's update, by the Guard (timed) or by the bare optimizer (its gradients' norm
    measured), and its record; None when the Guard halted the run (its reason is in ``run``)."""
    lr = float(opt.param_groups[0]["lr"])
    if guard is not None:
        tg = time.perf_counter()
        try:
            report = guard.step(loss=loss, replay=replay)
        except TrainingHalted as e:  # the Guard stopped a run that cannot recover
            run.diverged_reason = e.reason
            return None
        run.guard_seconds += time.perf_counter() - tg
        return step_row(step, loss_val, lr, report=report)
    grads = [p.grad for p in params if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    opt.step()
    return step_row(step, loss_val, lr, norm=norm)
