"""One bench run: build the task, model, optimizer and (if the mitigation is a policy) the Guard
from a :class:`RunConfig`, train, and measure what the bench compares.

Deterministic from the config: the seed fixes model init, batch order and every policy decision,
and the run trains with the config's ``threads`` intra-op threads (:func:`pinned_threads`), so
its figures do not depend on the machine's cores, the worker count or the caller's thread setting.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from . import keras_train
from .config import Resolved, RunConfig, resolve
from .loop import Forward, LoopRun, make_guard, train_loop
from .models import build_model
from .outcome import AT_CHANCE, LOSS_BLOWUP, blowup_evidence, loss_levels
from .parallel import Ranks, check_divisible, current, from_main, mean_over_ranks, rank_slice
from .tasks import Task, make_task

if TYPE_CHECKING:
    from ..guard import Guard
    from ..policies.rollback import rollback as Rollback


@contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the caller's count.

    What a CPU run computes depends on its thread count (a reduction split over more threads adds
    in another order, and a chaotic run amplifies the last bit), so every run trains with the
    count its config names, not one derived from the cores. Torch's inter-op pool does not take
    part in eager ops, numpy only does elementwise work and reductions here (single-threaded), and
    the DataLoader workers an entry point may use only load and collate (one thread each, seeded
    from the loader's generator): none of them changes a result.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_optimizer(res: Resolved, params) -> torch.optim.Optimizer:
    """The run's optimizer. ``foreach=True`` everywhere: torch picks the per-tensor loop on the
    CPU, whose steps on the bench's many small tensors are bound by dispatch (a fifth of a quick
    suite run); the foreach kernels take the same steps bit for bit (tests/bench/test_train.py)
    in a few calls a step."""
    cfg = res.config
    if res.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    if res.optimizer in ("momentum", "nesterov"):
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=res.momentum,
            nesterov=res.optimizer == "nesterov",
            weight_decay=cfg.weight_decay,
            foreach=True,
        )
    if res.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then constant or cosine to zero."""

    def factor(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.schedule == "cosine":
            span = max(1, cfg.steps - cfg.warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / span)))
        return 1.0

    return factor


def at_chance(task: Task, metric: float) -> bool:
    """Whether a final metric is no better than guessing: within 0.05 of chance accuracy (a trained
    model is far above: 0.9+ on digits), or an error within 5% of the constant predictor's."""
    if not math.isfinite(metric):
        return True
    if task.higher_is_better:
        return metric <= task.chance_metric + 0.05
    return metric >= 0.95 * task.chance_metric


RECOVER_WINDOW = 10  # steps before a fault that set the loss level to get back to
RECOVER_TOLERANCE = 0.10  # back within 10% of that level


def steps_to_recover(losses: list[float], strikes: list[int]) -> tuple[float | None, int]:
    """After each fault step, how many steps until the loss is back within 10% of its level (the
    mean of the 10 finite losses before the fault). Returns (median over the faults that
    recovered, or None; how many never recovered before the run ended)."""
    took, never = [], 0
    for s in strikes:
        before = [v for v in losses[max(0, s - RECOVER_WINDOW) : s] if math.isfinite(v)]
        if not before or s >= len(losses):
            continue
        level = statistics.fmean(before) * (1 + RECOVER_TOLERANCE)
        after = [
            t for t in range(s, len(losses)) if math.isfinite(losses[t]) and losses[t] <= level
        ]
        if after:
            took.append(after[0] - s)
        else:
            never += 1
    return (statistics.median(took) if took else None), never


def train_run(
    cfg: RunConfig,
    on_step: Callable[[int], None] | None = None,
    log_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one configuration; return (result, per-step metrics).

    ``log_dir``: also record the Guard's telemetry there (for ``gradguard report``); an unguarded
    run (``mitigation="none"``) then gets a measuring-only Guard (no policy, no finiteness skip),
    which trains exactly as the bare optimizer does.

    Data-parallel when a ``torch.distributed`` process group is initialized (``torchrun``,
    ``gradguard train --nproc N``): every rank builds the same model from the seed and wraps it in
    ``DistributedDataParallel``, draws the same global batch of ``cfg.batch_size`` examples from the
    same generator and trains on its contiguous slice (``batch_size`` must divide by the world
    size). The task losses are means and the slices equal, so DDP's averaged gradient is the whole
    batch's: N processes take the steps one process takes, to floating-point rounding. The Guard
    guards the unwrapped module (same layer names) and gets the loss averaged over the ranks.
    Rank 0 alone evaluates and writes telemetry (rank 0's ``log_dir``; the others' is ignored).
    Every rank returns rank 0's result and the per-step metrics, which are the same on every rank.
    Not equal to one process: ``batchnorm`` on the CPU (per-rank batch statistics; on GPUs it
    becomes SyncBatchNorm) and ``dropout`` (each rank draws its own masks).

    Trains with ``cfg.threads`` torch threads (every rank, too), whatever the caller had; the
    caller's count is restored on return.

    With ``rollback`` in the chain the result also holds ``skipped_data``: the inclusive
    ``[start, end]`` step ranges whose updates its rollbacks undid. The batch stream goes on after
    a rollback, so those batches are skipped, not replayed (``gradguard train --out DIR`` writes
    them to ``DIR/skip_batches.json``).
    """
    with pinned_threads(cfg.threads):
        if keras_train.is_keras_model(cfg.model):
            return keras_train.train_run(cfg, on_step=on_step, log_dir=log_dir)
        with deterministic_cudnn():
            return _train_torch(cfg, on_step, log_dir)


@contextmanager
def deterministic_cudnn() -> Iterator[None]:
    """Run the block with cuDNN's deterministic kernels and no autotuning (a no-op on the CPU),
    then restore the caller's settings: a GPU run is then the same run each time it is made on
    the same GPU and software, as a CPU run is."""
    flags = torch.backends.cudnn
    old = flags.deterministic, flags.benchmark
    flags.deterministic, flags.benchmark = True, False
    try:
        yield
    finally:
        flags.deterministic, flags.benchmark = old


def _train_torch(
    cfg: RunConfig,
    on_step: Callable[[int], None] | None,
    log_dir: str | os.PathLike | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    res = resolve(cfg)
    ranks = current()
    if ranks is not None:
        check_divisible(cfg.batch_size, ranks.world_size)
        if cfg.device != "cpu" and ranks.device.type != "cuda":
            raise ConfigError(
                f"device {cfg.device!r} under a {ranks.device.type} process group: each rank "
                "trains where its backend puts it (nccl: its own GPU); drop device, or "
                "initialize the group with nccl"
            )
        log_dir = from_main(log_dir, ranks)  # every rank builds the Guard rank 0 builds
    main = ranks is None or ranks.is_main
    torch.manual_seed(cfg.seed)
    task = make_task(cfg.task, **dict(cfg.task_options))
    model, net = _build_net(cfg, res, task, ranks)
    opt = make_optimizer(res, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    guard = make_guard(
        model, opt, res.policy, log_dir if main else None, measured=log_dir is not None
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = task.batches(cfg.batch_size, gen)
    plan = None
    if cfg.faults.strip() != "none":
        from ..faults import parse as parse_faults

        plan = parse_faults(cfg.faults, seed=cfg.seed)
    before_update, after_update = _update_hooks(plan, model, opt, sched)

    def reached_target(step: int) -> bool:
        return (step + 1) % cfg.eval_every == 0 and bool(task.evaluate(model, 512)["success"])

    # Train mode once: the evaluation restores the mode it found.
    model.train()
    # A Guard that checks the weights after its step (the default) has already read that they
    # are finite when the step returns (it rolls back or raises otherwise): the loop reads them
    # itself only without one, or where a fault may write them after the step.
    guard_checks_weights = guard is not None and res.policy is not None and guard.check_weights
    run = train_loop(
        model,
        opt,
        guard,
        cfg.steps,
        _torch_forward(task, model, net, opt, batches, plan, ranks),
        guarded=res.policy is not None,
        check_weights=not guard_checks_weights or plan is not None,
        before_update=before_update,
        after_update=after_update,
        on_step=on_step,
        evaluate=reached_target if main else None,
    )
    if not main:
        assert ranks is not None  # only a rank is not the main process
        return from_main(None, ranks), run.steps
    result = _torch_result(run, task, model, guard, res.policy, plan)
    if ranks is not None:
        from_main(result, ranks)
    return result, run.steps


def _build_net(
    cfg: RunConfig, res: Resolved, task: Task, ranks: Ranks | None
) -> tuple[nn.Module, nn.Module]:
    """The run's model, and what the training forward runs: the model itself, or its DDP
    wrapper when distributed (then seeded per rank for the dropout masks)."""
    model = build_model(cfg.model, task.input_shape, task.num_outputs, **res.model_options)
    net: nn.Module = model
    if ranks is None and cfg.device != "cpu":
        model = net = model.to(cfg.device)
    if ranks is not None:
        model = model.to(ranks.device)
        if ranks.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [ranks.device] if ranks.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
        # Same init on every rank (above), independent dropout masks from here on.
        torch.manual_seed(cfg.seed + ranks.rank)
    return model, net


def _torch_forward(
    task: Task,
    model: nn.Module,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    plan: Any,
    ranks: Ranks | None,
) -> Forward:
    """The loop's ``forward``: the step's batch (faults on it, this rank's slice, moved to the
    model's device), its forward and backward passes, and the replay closure."""
    device = next(model.parameters()).device

    def forward(step: int) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        x, y = next(batches)
        if plan is not None:
            x, y = plan.on_batch(step, x, y)
        if ranks is not None:
            x, y = rank_slice((x, y), ranks.rank, ranks.world_size)
            x, y = x.to(ranks.device), y.to(ranks.device)
        elif device.type != "cpu":
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(net(x), y)
        loss.backward()  # DDP: the gradients arrive averaged over the ranks
        if ranks is not None:
            # The whole batch's loss, for the policies that read it and for the result.
            loss = mean_over_ranks(loss)

        # The replay runs the unwrapped module: no DDP collective on a local re-run.
        def replay(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            return task.loss(model(x), y)

        return loss, replay

    return forward


def _update_hooks(
    plan: Any,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """The loop's ``before_update`` (faults on the gradients and the optimizer) and
    ``after_update`` (faults after the step, then the LR schedule)."""

    def before_update(step: int) -> None:
        if plan is not None:
            plan.on_gradients(step, model)
            plan.on_optimizer(step, opt)

    def after_update(step: int) -> None:
        if plan is not None:
            plan.after_step(step, opt)
        sched.step()

    return before_update, after_update


def _torch_result(
    run: LoopRun,
    task: Task,
    model: nn.Module,
    guard: Guard | None,
    policy: str | None,
    plan: Any,
) -> dict[str, Any]:
    """The main process's result row: :func:`run_result`, and the steps rollbacks undid."""
    result = run_result(
        run,
        task.evaluate(model, 512) if run.diverged_reason is None else None,
        policy=policy,
        plan=plan,
        off_target=lambda metric: AT_CHANCE if at_chance(task, metric) else None,
    )
    policies = guard.policies if guard is not None else []
    rollback = cast("Rollback | None", next((p for p in policies if p.name == "rollback"), None))
    if rollback is not None:
        # The steps rollbacks undid: the stream went on, so their batches were skipped.
        result["skipped_data"] = [list(r) for r in rollback.skipped_steps]
    return result


def run_result(
    run: LoopRun,
    ev: dict[str, Any] | None,
    *,
    policy: str | None,
    plan: Any = None,
    off_target: Callable[[float], str | None] | None = None,
) -> dict[str, Any]:
    """A finished run's result row (what the store keeps), from what its loop measured (``run``:
    the step records, first loss, why it stopped, time to target, wall, the Guard's counters and
    time) and its final evaluation ``ev`` (``{"loss", "metric", "success"}``; None: not evaluated,
    the run diverged before the end); the one definition of a run's outcome, whichever framework
    or entry point trained. ``off_target(metric)``: a reason a final metric fails
    (``at_chance``, a non-finite metric), or None.

    ``outcome`` is one of (the rule: :mod:`gradguard.bench.outcome`):

    - ``"diverged"``: it blew up. Non-finite loss or weights, a final loss above
      :data:`~gradguard.bench.outcome.LOSS_BLOWUP` x its first (``loss_blowup``), the Guard
      halting it (its ``TrainingHalted`` reason), an ``off_target`` reason other than
      ``at_chance``, or at chance with evidence of a blow-up: the largest finite gradient norm
      above :data:`~gradguard.bench.outcome.NORM_SPIKE` (100) x the median one
      (``grad_norm_spike``), or the 10-step mean training loss risen above
      :data:`~gradguard.bench.outcome.LOSS_RISE` (2) x its first 10 steps' mean (``loss_spike``);
    - ``"did_not_learn"``: at chance with calm norms and no loss rise (``diverged_reason``
      ``at_chance``); a failure to reach the target, not a divergence;
    - ``"trained"``: neither.

    ``diverged`` is ``outcome == "diverged"``, ``did_not_learn`` is ``outcome ==
    "did_not_learn"``; ``diverged_reason`` says why for both (None: trained)."""
    if ev is None:
        ev = {"loss": math.nan, "metric": math.nan, "success": False}
    final_loss = _final_loss(run.steps)
    diverged_reason = _diverged_reason(run, final_loss, ev["metric"], off_target)
    result = _result_row(run, ev, final_loss, diverged_reason, policy)
    if plan is not None:
        result.update(_fault_fields(plan, run.steps))
    return result


def _result_row(
    run: LoopRun,
    ev: dict[str, Any],
    final_loss: float,
    diverged_reason: str | None,
    policy: str | None,
) -> dict[str, Any]:
    """:func:`run_result`'s row but for the faults: the outcome, the losses and norms, the time
    to target, the Guard's interventions and share of the time."""
    steps, wall = run.steps, run.wall
    steps_to_target, seconds_to_target = run.steps_to_target, run.seconds_to_target
    if steps_to_target is None and ev["success"] and run.diverged_reason is None:
        steps_to_target, seconds_to_target = len(steps), wall
    norms = [r["grad_norm"] for r in steps if math.isfinite(r["grad_norm"])]
    max_norm = max(norms) if norms else math.nan
    median_norm = statistics.median(norms) if norms else math.nan
    initial_loss, peak_loss = loss_levels([r["loss"] for r in steps])
    outcome = "trained" if diverged_reason is None else "diverged"
    if diverged_reason == AT_CHANCE:
        evidence = blowup_evidence(max_norm, median_norm, initial_loss, peak_loss)
        if evidence is None:
            outcome = "did_not_learn"
        else:
            diverged_reason = evidence
    return {
        "outcome": outcome,
        "diverged": outcome == "diverged",
        "did_not_learn": outcome == "did_not_learn",
        "diverged_reason": diverged_reason,
        "steps_run": len(steps),
        "final_train_loss": final_loss,
        "test_loss": float(ev["loss"]),
        "test_metric": float(ev["metric"]),
        "success": bool(ev["success"]),
        "steps_to_target": steps_to_target,
        "seconds_to_target": seconds_to_target,
        "initial_train_loss": initial_loss,
        "peak_train_loss": peak_loss,
        "max_grad_norm": max_norm,
        "median_grad_norm": median_norm,
        "interventions": {k: v for k, v in run.counters.items() if k != "steps"},
        "wall_seconds": wall,
        "guard_seconds": run.guard_seconds,
        "guard_share": run.guard_seconds / wall if wall > 0 else 0.0,
        "policy": policy,
    }


def _final_loss(steps: list[dict[str, Any]]) -> float:
    """The mean training loss of the last 10% of steps (NaN if one of them is non-finite)."""
    tail = [r["loss"] for r in steps[-max(1, len(steps) // 10) :]]
    return statistics.fmean(tail) if all(math.isfinite(v) for v in tail) else math.nan


def _diverged_reason(
    run: LoopRun,
    final_loss: float,
    metric: float,
    off_target: Callable[[float], str | None] | None,
) -> str | None:
    """Why the run failed before its blow-up evidence is weighed: the loop's reason, else the
    final loss's or the final metric's, or None."""
    if run.diverged_reason is not None:
        return run.diverged_reason
    if not math.isfinite(final_loss):
        return "nonfinite_loss"
    if run.first_loss is not None and final_loss > LOSS_BLOWUP * run.first_loss:
        return "loss_blowup"
    if off_target is not None:
        return off_target(metric)
    return None


def _fault_fields(plan: Any, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The fault plan's strikes by kind, and how the loss recovered after them."""
    strikes = plan.strikes
    struck = sorted({st.step for st in strikes})
    recover, unrecovered = steps_to_recover([r["loss"] for r in steps], struck)
    return {
        "faults": {
            k: sum(st.kind == k for st in strikes) for k in sorted({st.kind for st in strikes})
        },
        "steps_to_recover": recover,
        "unrecovered": unrecovered,
    }
