"""One probe run of a user's entry point, trained the way the bench trains its own runs.

The bench runner calls :func:`train_entry` for stored configs whose ``trainer`` is
``gradguard.advice.runs:train_entry`` (see :func:`gradguard.bench.runner.train_stored`), so entry
runs share the bench's SQLite rows, workers, resume and progress bar. It returns what
:func:`gradguard.bench.train.train_run` returns: the same result keys (those that need a bench task,
such as the time to its success criterion, are None) and the same per-step metrics.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

TRAINER = "gradguard.advice.runs:train_entry"


@dataclass(frozen=True)
class EntryRun:
    """The stored config of one entry-point run (its ``as_dict()`` is the database row's config)."""

    entry: str
    digest: str
    lr: float
    mitigation: str
    seed: int
    steps: int
    threads: int = 1  # torch intra-op threads it trains with, as a bench run's RunConfig.threads

    def as_dict(self) -> dict[str, Any]:
        return {
            "trainer": TRAINER,
            "entry": self.entry,
            "digest": self.digest,
            "lr": self.lr,
            "mitigation": self.mitigation,
            "seed": self.seed,
            "steps": self.steps,
            "threads": self.threads,
        }


def train_entry(
    cfg: dict[str, Any], log_dir: str | os.PathLike | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train the entry point ``cfg["entry"]`` for ``cfg["steps"]`` steps at ``cfg["lr"]`` under the
    Guard policy ``cfg["mitigation"]`` (``"none"``: no Guard); return (result, per-step metrics).

    Divergence is called as the bench calls it: non-finite weights (or, unguarded, a non-finite
    loss), a final training loss (mean of the last 10% of steps) non-finite or above 10x the first.
    ``log_dir``: record telemetry there (an unguarded run gets a measuring-only Guard, which trains
    exactly as the bare optimizer does). Trains with ``cfg["threads"]`` torch threads (1 for a row
    stored without it), whatever the caller had, as a bench run does.
    """
    from ..bench.train import pinned_threads

    with pinned_threads(int(cfg.get("threads", 1))):
        return _train_entry(cfg, log_dir)


def _train_entry(
    cfg: dict[str, Any], log_dir: str | os.PathLike | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import torch

    from ..bench.loop import make_guard, train_loop
    from ..bench.train import run_result
    from . import entry as E

    text = cfg["entry"]
    digest = E.entry_digest(text)
    if cfg.get("digest") and digest != cfg["digest"]:
        raise ConfigError(
            f"entry point {text!r} changed since this probe was planned; rerun gradguard advise "
            "(with a fresh --out to start over)"
        )
    setup = E.build_setup(E.load_entry(text), int(cfg["seed"]), text)
    model = setup.model
    opt = E.make_optimizer(setup, text)
    E.set_lr(opt, float(cfg["lr"]))
    policy = None if cfg["mitigation"] == "none" else cfg["mitigation"]
    guard = make_guard(model, opt, policy, log_dir)
    data = E.batches(setup.data, text)

    def forward(step: int) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        model.train()
        batch = next(data)
        opt.zero_grad(set_to_none=True)
        loss = E.loss_value(setup, model, batch, text)
        loss.backward()

        def replay(b: Any = batch) -> Any:
            return setup.loss(model, b)

        return loss, replay

    run = train_loop(
        model,
        opt,
        guard,
        int(cfg["steps"]),
        forward,
        guarded=policy is not None,
        params=[p for g in opt.param_groups for p in g["params"]],
    )
    metric = E.evaluate(setup, model, text) if run.diverged_reason is None else math.nan
    result = run_result(
        run,
        {"loss": math.nan, "metric": metric, "success": False},
        policy=policy,
        off_target=lambda m: (
            "nonfinite_metric" if setup.evaluate is not None and not math.isfinite(m) else None
        ),
    )
    return result, run.steps
