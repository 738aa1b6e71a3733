"""The bench's Keras variant trainer: the seed document's TensorFlow scenario (an MLP with Dropout,
SGD with momentum, scikit-learn's handwritten digits) through the same :class:`RunConfig`, tasks,
batches, faults and result rows as the torch bench (:func:`gradguard.bench.train.train_run`).

What is shared with a torch run of the same config: the task and its train/test split, the batch
order (drawn from the same ``torch.Generator``), the LR schedule, the fault schedule and the result
fields. What is Keras's own: the model (``keras_mlp``, see
:func:`gradguard.bench.keras_train.keras_mlp`), its initial weights (seeded by
``keras.utils.set_random_seed``), the optimizer (``keras.optimizers``; weight decay is Keras's
decoupled one) and the step: a ``tf.function`` (XLA with ``jit_compile=True``) that computes the
gradients, injects the scheduled gradient faults and calls
:meth:`GuardedOptimizer.apply <gradguard.keras.GuardedOptimizer.apply>`.

``guard_seconds`` and ``guard_share`` are NaN: the Guard runs inside the compiled step and its
time cannot be told apart from the rest.

The run's ``threads`` is TensorFlow's intra-op pool as well as torch's. TensorFlow sets its pools
once, when its runtime starts: a process where it already ran with another count refuses the run
(ConfigError) rather than train it with threads its config does not name; the bench runner trains
such runs in a fresh worker process. Op determinism (``enable_op_determinism``) is not switched on:
it is process-wide and matters for GPU kernels, and on the CPU a fixed intra-op count gives the
same result run after run.
"""

from __future__ import annotations

import fnmatch
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import torch

from ..errors import ConfigError
from ..faults import parse as parse_faults
from ..faults.base import FaultSpecError, Strike, uniform
from ..keras.callback import GuardTelemetry
from ..keras.optimizer import GuardedOptimizer, _np
from . import keras_train
from .config import Resolved, RunConfig, resolve
from .loop import LoopRun
from .tasks import Task, make_task
from .train import at_chance, lr_lambda, run_result

_GAINS = {"relu": math.sqrt(2.0), "tanh": 5.0 / 3.0}


def build_model(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    depth: int,
    width: int,
    activation: str,
    leak: float,
    dropout: float,
    norm: str,
    init_scale: float,
    jit_compile: bool = False,
) -> keras.Model:
    """The ``keras_mlp`` model (options: :func:`gradguard.bench.keras_train.keras_mlp`).

    Kernels are He-normal with the activation's gain (as torch's ``kaiming_normal_``, head
    included) times ``init_scale``; biases zero. BatchNorm and LayerNorm use torch's momentum and
    epsilon, so both benches normalize alike."""
    if depth < 1 or width < 1:
        raise ConfigError(f"keras_mlp: depth and width must be >= 1, got {depth}, {width}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"keras_mlp: dropout={dropout!r} must be in [0, 1)")
    if not (init_scale > 0 and math.isfinite(init_scale)):
        raise ConfigError(f"keras_mlp: init_scale={init_scale!r} must be a positive number")
    if leak < 0:
        raise ConfigError(f"keras_mlp: leak={leak!r} must be >= 0")
    gain = math.sqrt(2.0 / (1.0 + leak**2)) if activation == "leaky_relu" else _GAINS[activation]

    def kernel_init() -> keras.initializers.Initializer:
        return keras.initializers.VarianceScaling(
            scale=(gain * init_scale) ** 2, mode="fan_in", distribution="untruncated_normal"
        )

    layers: list[keras.layers.Layer] = [
        keras.Input(input_shape),
        keras.layers.Flatten(name="flatten"),
    ]
    for i in range(depth):
        layers.append(keras.layers.Dense(width, kernel_initializer=kernel_init(), name=f"fc{i}"))
        if norm == "batch":
            layers.append(
                keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"norm{i}")
            )
        elif norm == "layer":
            layers.append(keras.layers.LayerNormalization(epsilon=1e-5, name=f"norm{i}"))
        if activation == "leaky_relu":
            layers.append(keras.layers.LeakyReLU(negative_slope=leak, name=f"act{i}"))
        else:
            layers.append(keras.layers.Activation(activation, name=f"act{i}"))
        if dropout > 0:
            layers.append(keras.layers.Dropout(dropout, name=f"drop{i}"))
    layers.append(keras.layers.Dense(num_outputs, kernel_initializer=kernel_init(), name="head"))
    return keras.Sequential(layers, name="keras_mlp")


def make_optimizer(res: Resolved) -> keras.optimizers.Optimizer:
    """The Keras counterpart of the bench's torch optimizer (its LR is set before every step)."""
    cfg = res.config
    wd = cfg.weight_decay or None
    if res.optimizer == "sgd":
        return keras.optimizers.SGD(cfg.lr, weight_decay=wd)
    if res.optimizer in ("momentum", "nesterov"):
        return keras.optimizers.SGD(
            cfg.lr, momentum=res.momentum, nesterov=res.optimizer == "nesterov", weight_decay=wd
        )
    if res.optimizer == "adam":
        return keras.optimizers.Adam(cfg.lr, weight_decay=wd)
    return keras.optimizers.AdamW(cfg.lr, weight_decay=cfg.weight_decay)


def evaluate(model: keras.Model, task: Task, batch_size: int = 512) -> dict[str, float]:
    """Test loss (cross-entropy), accuracy and success on the task's test split, in inference
    mode; a non-finite output row counts as wrong (as :meth:`Task.evaluate`)."""
    x, y = task.test[0].numpy(), task.test[1].numpy()
    logits = np.concatenate(
        [_np(model(x[i : i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
    ).astype(np.float64)
    with np.errstate(all="ignore"):
        top = logits.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        loss = float(np.mean(logz - logits[np.arange(len(y)), y]))
    finite = np.isfinite(logits).all(axis=1)
    acc = float(np.mean((logits.argmax(axis=1) == y) & finite))
    result: dict[str, float] = {"loss": loss, "accuracy": acc, "metric": acc}
    result["success"] = task.criterion.holds(result)
    return result


class _GradFaults:
    """The plan's gradient faults (nan, inf, spike) on the Keras layout's layers, drawn exactly as
    the torch injectors draw them (same schedule, same layer pick among the layers with a
    gradient); each strike is recorded on its fault, so ``plan.strikes`` lists them."""

    def __init__(self, plan: Any, layout: Any):
        self.faults = [f for f in plan.faults if f.name in ("nan", "inf", "spike")]
        self.layout = layout
        self.layers = list(layout.layer_names)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def _pick(self, fault: Any, step: int) -> list[int]:
        pattern = fault.values.get("layer")
        chosen = list(range(len(self.layers)))
        if not chosen or pattern == "*":
            return chosen
        if pattern is not None:
            chosen = [i for i in chosen if fnmatch.fnmatchcase(self.layers[i], pattern)]
            if not chosen:
                raise FaultSpecError(
                    f"fault {fault.name!r}: layer={pattern!r} matches no layer with a gradient; "
                    f"layers with one: {', '.join(self.layers)}"
                )
        k = int(uniform(fault.seed, fault.name, step, salt=1) * len(chosen))
        return [chosen[min(k, len(chosen) - 1)]]

    def at(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per variable: (replace the first element?, by what, scale)."""
        n = len(self.layout)
        mark, value, scale = np.zeros(n, bool), np.zeros(n, np.float32), np.ones(n, np.float32)
        for f in self.faults:
            if not f.scheduled(step):
                continue
            picked = self._pick(f, step)
            members = [
                [i for i, li in enumerate(self.layout.layer_of) if li == lj] for lj in picked
            ]
            where = (
                "*" if f.values.get("layer") == "*" else ",".join(self.layers[i] for i in picked)
            )
            if f.name == "spike":
                for m in members:
                    scale[m] *= f.values["scale"]
                detail = {"scale": f.values["scale"]}
            else:
                v = math.nan if f.name == "nan" else math.inf
                for m in members:  # one element is enough: it poisons every norm and update
                    first = next((i for i in m if self.layout.sizes[i] > 0), None)
                    if first is not None:
                        mark[first], value[first] = True, v
                detail = {"value": v}
            if picked:
                f.strikes.append(Strike(step, f.name, where, detail))
        return mark, value, scale


def _lr_burst(plan: Any, step: int) -> float:
    factor = 1.0
    for f in plan.faults:
        if f.name == "lr_burst" and f.scheduled(step):
            factor *= f.values["factor"]
            f.strikes.append(Strike(step, f.name, "lr", {"factor": f.values["factor"]}))
    return factor


def _pin_threads(n: int) -> None:
    """TensorFlow's intra-op pool at the run's ``threads`` (torch's are pinned by the caller,
    :func:`gradguard.bench.train.train_run`), or a ConfigError: TensorFlow fixes its pools when
    its runtime starts, so a process where it already ran with another count cannot train the
    run as its config says (the bench runner then trains it in a fresh worker process)."""
    if not keras_train.pin_tf_threads(n):
        import tensorflow as tf

        have = tf.config.threading.get_intra_op_parallelism_threads()
        raise ConfigError(
            f"TensorFlow already runs in this process with {have or 'its default number of'} "
            f"intra-op threads and cannot change them; this run trains with threads={n}: train "
            "it in a fresh process (gradguard train, or gradguard bench, which does)"
        )


def train_run(
    cfg: RunConfig,
    on_step: Callable[[int], None] | None = None,
    log_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one ``keras_*`` configuration with the TensorFlow backend; return (result, per-step
    metrics) with the fields of :func:`gradguard.bench.train.train_run`.

    ``log_dir``: record the Guard's telemetry there (:class:`GuardTelemetry`); an unguarded run
    then gets a measuring-only GuardedOptimizer (policy ``none``, no finiteness skip), which
    trains exactly as the bare optimizer does.
    """
    _check_trainable_here(cfg)
    _pin_threads(cfg.threads)
    res = resolve(cfg)
    setup = _build_run(cfg, res, log_dir)
    run = _train_steps(cfg, setup, _compiled_step(setup), on_step)
    if setup.telemetry is not None:
        setup.telemetry.close()

    result = run_result(
        run,
        evaluate(setup.model, setup.task) if run.diverged_reason is None else None,
        policy=res.policy,
        plan=setup.plan,
        off_target=lambda metric: "at_chance" if at_chance(setup.task, metric) else None,
    )
    result["framework"] = f"keras {keras.__version__} ({keras.backend.backend()})"
    return result, run.steps


def _check_trainable_here(cfg: RunConfig) -> None:
    """Refuse a run this process cannot train: Keras on another backend, or distributed."""
    if keras.backend.backend() != "tensorflow":
        raise ConfigError(
            f"the Keras bench trains with the TensorFlow backend, but Keras runs on "
            f"{keras.backend.backend()!r}: set KERAS_BACKEND=tensorflow"
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ConfigError(f"model {cfg.model}: the Keras bench variant trains in one process")


@dataclass
class _KerasRun:
    """What a Keras bench run trains with, built from its config."""

    task: Task
    model: keras.Model
    inner: keras.optimizers.Optimizer  # the optimizer the GuardedOptimizer wraps: it has the LR
    opt: GuardedOptimizer
    variables: list[Any]
    guarded: bool  # a policy guards the run (else a measuring-only GuardedOptimizer)
    jit: bool
    telemetry: GuardTelemetry | None
    plan: Any  # the fault plan, or None
    grad_faults: _GradFaults | None


def _build_run(cfg: RunConfig, res: Resolved, log_dir: str | os.PathLike | None) -> _KerasRun:
    """The task, the seeded model, the guarded optimizer, the telemetry and the fault plan."""
    opts = {**keras_train.model_options(cfg.model), **res.model_options}
    task = make_task(cfg.task, **dict(cfg.task_options))
    if task.kind != "classify":
        raise ConfigError(
            f"model {cfg.model} classifies; task {cfg.task!r} is a {task.kind} task (use digits, "
            "mnist or temporal_order)"
        )
    keras.utils.set_random_seed(cfg.seed)
    jit = bool(opts.pop("jit_compile"))
    model = build_model(task.input_shape, task.num_outputs, **opts)
    inner = make_optimizer(res)
    guarded = res.policy is not None
    opt = GuardedOptimizer(inner, res.policy if guarded else "none", check_finite=guarded)
    variables = list(model.trainable_variables)
    opt.build(variables)
    telemetry = None
    if log_dir is not None:
        telemetry = GuardTelemetry(log_dir, optimizer=opt)
        telemetry.set_model(model)
    plan = parse_faults(cfg.faults, seed=cfg.seed) if cfg.faults.strip() != "none" else None
    grad_faults = _GradFaults(plan, opt.layout) if plan is not None else None
    return _KerasRun(task, model, inner, opt, variables, guarded, jit, telemetry, plan, grad_faults)


def _compiled_step(setup: _KerasRun) -> Callable[..., Any]:
    """``train_step(x, y, mark, value, scale) -> loss``: the gradients, the scheduled gradient
    faults, and the guarded update, as one ``tf.function``."""
    import tensorflow as tf

    model, opt, variables = setup.model, setup.opt, setup.variables
    inject = bool(setup.grad_faults)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=setup.jit, reduce_retracing=True)
    def train_step(x: Any, y: Any, mark: Any, value: Any, scale: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, variables)
        if inject:  # static: a fault-free run's graph has no injection at all
            grads = [_inject(g, mark[i], value[i], scale[i]) for i, g in enumerate(grads)]
        opt.apply(grads, variables)
        return loss

    return train_step


def _train_steps(
    cfg: RunConfig,
    setup: _KerasRun,
    train_step: Callable[..., Any],
    on_step: Callable[[int], None] | None,
) -> LoopRun:
    """Train ``cfg.steps`` steps and return what was measured, as the torch loop's
    :class:`LoopRun` (``guard_seconds`` NaN: the Guard runs inside the compiled step)."""
    model, task, plan, telemetry = setup.model, setup.task, setup.plan, setup.telemetry
    fault_arrays = _fault_arrays(setup.grad_faults, len(setup.variables))
    schedule = lr_lambda(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = task.batches(cfg.batch_size, gen)
    run = LoopRun(guard_seconds=math.nan)  # the Guard runs inside the compiled step: not separable
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        x, y = next(batches)
        if plan is not None:
            x, y = plan.on_batch(step, x, y)
        burst = _lr_burst(plan, step) if plan is not None else 1.0
        setup.inner.learning_rate.assign(cfg.lr * schedule(step) * burst)
        mark, value, scale = fault_arrays(step)
        loss_val = float(train_step(x.numpy(), y.numpy(), mark, value, scale))
        if run.first_loss is None and math.isfinite(loss_val):
            run.first_loss = loss_val
        info = setup.opt.last_step()
        assert info is not None
        run.steps.append(_step_record(step, loss_val, info))
        if telemetry is not None:
            telemetry.record(loss_val)
        if on_step is not None:
            on_step(step)
        if not all(np.isfinite(_np(v)).all() for v in model.variables):
            run.diverged_reason = "nonfinite_weights"
            break
        if not setup.guarded and not math.isfinite(loss_val):
            run.diverged_reason = "nonfinite_loss"
            break
        due = (step + 1) % cfg.eval_every == 0 and run.steps_to_target is None
        if due and evaluate(model, task)["success"]:
            run.steps_to_target, run.seconds_to_target = step + 1, time.perf_counter() - t0
    run.wall = time.perf_counter() - t0
    run.counters = setup.opt.counters if setup.guarded else {}
    return run


def _fault_arrays(
    grad_faults: _GradFaults | None, n: int
) -> Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``step -> (mark, value, scale)`` for the compiled step: the scheduled gradient faults, or
    arrays that change nothing when the run has none."""
    if grad_faults:  # there are gradient faults: draw the step's
        return grad_faults.at
    no_mark, no_value, no_scale = np.zeros(n, bool), np.zeros(n, np.float32), np.ones(n, np.float32)
    return lambda _step: (no_mark, no_value, no_scale)


def _step_record(step: int, loss: float, info: dict[str, Any]) -> dict[str, Any]:
    """One step's record, as the torch loop's, from the GuardedOptimizer's last step."""
    return {
        "step": step,
        "loss": loss,
        "grad_norm": info["grad_norm"],
        "grad_norm_after": info["grad_norm_after"],
        "clipped": info["clipped"],
        "skipped": info["skipped"],
        "lr": info["lr"],
    }


def _inject(g: Any, mark: Any, value: Any, scale: Any) -> Any:
    """``g * scale`` with its first element replaced by ``value`` where ``mark`` (a NaN or Inf)."""
    import tensorflow as tf

    g = g * tf.cast(scale, g.dtype)
    flat = tf.reshape(g, [-1])
    first = tf.where(mark, tf.cast(value, g.dtype), flat[0])
    return tf.reshape(tf.concat([first[None], flat[1:]], 0), tf.shape(g))
