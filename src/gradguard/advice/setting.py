"""What is being advised: a bench task/model configuration or a user's entry point, behind one
interface: the stored config of a run at a given LR, policy, seed and length; the user's LR; which
way the score points; and a short timing of a few steps (for budgets in seconds, and to decide
whether worker processes pay).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..bench.tasks import Task

#: Steps per probe run when nothing else says (the bench's RunConfig default, too).
DEFAULT_STEPS = 300


def scaled_lr(lr: float, factor: float) -> float:
    """``lr * factor`` to 6 significant digits, so that 0.1 x 3 is stored and shown as 0.3."""
    return float(f"{lr * factor:.6g}")


@dataclass(frozen=True)
class Timing:
    """Seconds to build one run (task/data, model, optimizer) and seconds per training step."""

    setup_s: float
    step_s: float


class BenchSetting:
    """A bench configuration (:class:`~gradguard.bench.config.RunConfig`): its runs are RunConfigs
    trained by :func:`gradguard.bench.train.train_run`."""

    kind = "bench"

    def __init__(self, config: Any, steps: int | None = None):
        from ..bench.config import RunConfig, resolve

        if isinstance(config, Mapping):
            config = RunConfig.from_dict(dict(config))
        if not isinstance(config, RunConfig):
            raise ConfigError(
                f"config must be a RunConfig or a dict of its settings, got {type(config).__name__}"
            )
        if config.mitigation != "none":
            raise ConfigError(
                f"config has mitigation {config.mitigation!r}: advise chooses the mitigation; "
                "leave it 'none' (compare model/optimizer variants with gradguard bench)"
            )
        resolve(config)  # every setting valid, before anything runs
        self.config = config
        self.threads = config.threads  # every run's intra-op threads (part of its identity)
        self.lr = float(config.lr)
        self.max_steps = int(steps if steps is not None else config.steps)
        self._task: Task | None = None

    @property
    def task(self) -> Task:
        if self._task is None:
            from ..bench.tasks import make_task

            self._task = make_task(self.config.task, **dict(self.config.task_options))
        return self._task

    @property
    def higher_is_better(self) -> bool:
        return self.task.higher_is_better

    @property
    def metric_name(self) -> str:
        return f"test {self.task.metric_name}"

    def label(self) -> str:
        c = self.config
        opts = " ".join(
            f"{k}={v}" for k, v in {**dict(c.task_options), **dict(c.model_options)}.items()
        )
        extra = [f"batch {c.batch_size}"]
        for name, default in (("weight_decay", 0.0), ("warmup", 0), ("schedule", "constant")):
            if getattr(c, name) != default:
                extra.append(f"{name} {getattr(c, name)}")
        if c.faults != "none":
            extra.append(f"faults {c.faults}")
        return " ".join(
            x
            for x in (f"{c.task}/{c.model}/{c.optimizer} lr={c.lr:g}", opts, ", ".join(extra))
            if x
        )

    def slug(self) -> str:
        c = self.config
        return f"{c.task}-{c.model}-{c.optimizer}-lr{c.lr:g}"

    def request(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config.as_dict()}

    def run(self, lr: float, mitigation: str, seed: int, steps: int):
        """The RunConfig of one probe run (one evaluation, at the end)."""
        return replace(
            self.config, lr=lr, mitigation=mitigation, seed=seed, steps=steps, eval_every=steps
        )

    def timing(self, steps: int = 20) -> Timing:
        """Time building a run and ``steps`` unguarded training steps, in this process (a worker
        imports and caches once, then builds per run: the build is timed warm)."""
        import torch

        from ..bench.config import resolve
        from ..bench.models import build_model
        from ..bench.tasks import make_task
        from ..bench.train import make_optimizer

        cfg = replace(self.config, steps=steps)
        res = resolve(cfg)

        def build() -> tuple[Any, Any, Any, Any]:
            torch.manual_seed(0)
            task = make_task(cfg.task, **dict(cfg.task_options))
            model = build_model(cfg.model, task.input_shape, task.num_outputs, **res.model_options)
            opt = make_optimizer(res, model.parameters())
            return task, model, opt, task.batches(cfg.batch_size, torch.Generator().manual_seed(0))

        def train(task: Any, model: Any, opt: Any, batches: Any, n: int) -> None:
            for _ in range(n):
                x, y = next(batches)
                opt.zero_grad(set_to_none=True)
                task.loss(model(x), y).backward()
                opt.step()

        first = build()  # once untimed: imports and caches, paid once per worker process
        train(*first, 2)
        first[0].evaluate(first[1], 512)
        t0 = time.perf_counter()
        task, model, opt, batches = build()
        t1 = time.perf_counter()
        train(task, model, opt, batches, steps)
        t2 = time.perf_counter()
        task.evaluate(model, 512)
        t3 = time.perf_counter()
        return Timing(setup_s=(t1 - t0) + (t3 - t2), step_s=(t2 - t1) / steps)


class EntrySetting:
    """A user's entry point (see :mod:`gradguard.advice.entry`): its runs are
    :class:`~gradguard.advice.runs.EntryRun` s trained by :func:`~gradguard.advice.runs.train_entry`."""

    kind = "entry"

    def __init__(self, entry: str, lr: float | None = None, steps: int | None = None):
        from .entry import check_entry, entry_digest

        info = check_entry(entry)
        if lr is not None and (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float))
            or not math.isfinite(lr)
            or lr <= 0
        ):
            raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
        self.entry = entry
        self.digest = entry_digest(entry)
        self.threads = 1  # every run's torch threads (EntryRun.threads)
        self.lr = float(lr) if lr is not None else info.lr
        self.own_lr = info.lr
        self.max_steps = int(steps if steps is not None else DEFAULT_STEPS)
        self.has_evaluate = info.has_evaluate
        self._higher = info.higher_is_better if info.has_evaluate else False

    @property
    def higher_is_better(self) -> bool:
        return self._higher

    @property
    def metric_name(self) -> str:
        return "eval score" if self.has_evaluate else "train loss"

    def label(self) -> str:
        own = "" if self.lr == self.own_lr else f" (its optimizer's own: {self.own_lr:g})"
        return f"{self.entry} lr={self.lr:g}{own}"

    def slug(self) -> str:
        return self.entry.replace(":", "-").replace(".", "_") + f"-lr{self.lr:g}"

    def request(self) -> dict[str, Any]:
        return {"kind": self.kind, "entry": self.entry, "digest": self.digest, "lr": self.lr}

    def run(self, lr: float, mitigation: str, seed: int, steps: int):
        from .runs import EntryRun

        return EntryRun(self.entry, self.digest, lr, mitigation, seed, steps, self.threads)

    def timing(self, steps: int = 20) -> Timing:
        from . import entry as E

        fn = E.load_entry(self.entry)

        def build() -> tuple[Any, Any, Any]:
            setup = E.build_setup(fn, 0, self.entry)
            return setup, E.make_optimizer(setup, self.entry), E.batches(setup.data, self.entry)

        def train(setup: Any, opt: Any, data: Any, n: int) -> None:
            for _ in range(n):
                batch = next(data)
                opt.zero_grad(set_to_none=True)
                E.loss_value(setup, setup.model, batch, self.entry).backward()
                opt.step()

        first = build()  # once untimed: the module's imports and caches
        train(*first, 2)
        t0 = time.perf_counter()
        setup, opt, data = build()
        t1 = time.perf_counter()
        train(setup, opt, data, steps)
        t2 = time.perf_counter()
        E.evaluate(setup, setup.model, self.entry)
        t3 = time.perf_counter()
        return Timing(setup_s=(t1 - t0) + (t3 - t2), step_s=(t2 - t1) / steps)


def make_setting(
    config: Any = None,
    entry: str | None = None,
    lr: float | None = None,
    steps: int | None = None,
    settings: Mapping[str, Any] | None = None,
) -> BenchSetting | EntrySetting:
    """The setting from ``advise``'s arguments: a bench config (a RunConfig, a dict, or RunConfig
    fields as keyword settings) or an entry point (with an optional LR)."""
    from ..bench.config import RunConfig

    settings = dict(settings or {})
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if entry is not None:
        if config is not None or settings:
            extra = ", ".join(["config"] * (config is not None) + sorted(settings))
            raise ConfigError(
                f"give either an entry point or a bench configuration, not both (got entry and {extra})"
            )
        return EntrySetting(entry, lr=lr, steps=steps)
    names = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(names))}"
        )
    if lr is not None:
        settings["lr"] = lr
    if config is None:
        base: dict[str, Any] = {}
    elif isinstance(config, RunConfig):
        base = config.as_dict()
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise ConfigError(
            f"config must be a RunConfig or a dict of its settings, got {type(config).__name__}"
        )
    return BenchSetting(RunConfig.from_dict({**base, **settings}), steps=steps)
