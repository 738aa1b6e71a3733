"""The task record: a data source, a loss, an evaluation and the success criterion."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import ConfigError
from .checks import _check_int

KINDS = ("classify", "regress", "lm")


@dataclass(frozen=True)
class Criterion:
    """When a run counts as a success: ``result[key] <op> threshold`` (and the loss is finite).

    ``source`` says where the threshold comes from, so a bench report can print it.
    """

    key: str
    op: str  # ">=", "<=" or "<"
    threshold: float
    source: str

    def holds(self, result: dict[str, float]) -> bool:
        value = result[self.key]
        if not math.isfinite(value) or not math.isfinite(result["loss"]):
            return False
        if self.op == ">=":
            return value >= self.threshold
        if self.op == "<=":
            return value <= self.threshold
        return value < self.threshold

    def __str__(self) -> str:
        return f"{self.key} {self.op} {self.threshold:.4g}"


@dataclass(eq=False)
class Task:
    """One bench task: data, loss, evaluation and success measure.

    ``train`` and ``test`` are ``(x, y)`` CPU tensors: ``x`` float32 of shape
    ``(N, *input_shape)`` (long for ``kind="lm"``), ``y`` long class ids (classify), float32
    targets of shape ``(N,)`` (regress) or long next-token ids of shape ``(N, context)`` (lm).
    A model for the task maps ``x`` to ``(B, num_outputs)`` logits (classify), ``(B,)`` or
    ``(B, 1)`` predictions (regress) or ``(B, context, num_outputs)`` logits (lm).

    ``metric`` is the task's success measure (accuracy, MSE or bits per character) and
    ``higher_is_better`` says which way it points; ``chance_metric`` is what a model that learned
    nothing about the inputs scores, which the bench uses to call a run "at chance".
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    num_outputs: int
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    metric_name: str
    higher_is_better: bool
    chance_metric: float
    criterion: Criterion
    options: dict[str, object] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)
    # kind="lm": the training character stream; batches() cuts windows at random offsets from it
    # (every offset, not only the stride-`context` windows stored in `train`).
    train_stream: torch.Tensor | None = None
    # kind="regress": a test example is an error when |prediction - target| > tolerance.
    tolerance: float | None = None

    # -- training ---------------------------------------------------------------------------

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss, mean over the batch: cross-entropy (classify), MSE (regress),
        cross-entropy over every position (lm)."""
        if self.kind == "classify":
            return F.cross_entropy(outputs, targets)
        if self.kind == "regress":
            return F.mse_loss(_as_predictions(outputs, targets), targets)
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator,
        *,
        steps: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches drawn from ``generator``: the same generator state gives the same
        batches. Endless unless ``steps`` is given.

        classify/regress: epochs of random permutations (every example once per epoch; a batch
        that straddles two epochs takes its rest from the next permutation). lm: windows of
        ``context + 1`` characters at uniformly random offsets of the training stream.
        """
        _check_int("batch_size", batch_size, minimum=1, where="Task.batches")
        if steps is not None:
            _check_int("steps", steps, minimum=0, where="Task.batches")
        done = 0
        if self.train_stream is not None:
            stream = self.train_stream
            context = self.input_shape[0]
            offsets = torch.arange(context + 1)
            while steps is None or done < steps:
                starts = torch.randint(0, len(stream) - context, (batch_size,), generator=generator)
                windows = stream[starts[:, None] + offsets]
                yield windows[:, :-1], windows[:, 1:]
                done += 1
            return
        x, y = self.train
        pending = torch.empty(0, dtype=torch.long)
        while steps is None or done < steps:
            while len(pending) < batch_size:
                pending = torch.cat([pending, torch.randperm(len(x), generator=generator)])
            idx, pending = pending[:batch_size], pending[batch_size:]
            yield x[idx], y[idx]
            done += 1

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 500) -> dict[str, float]:
        """Score ``model`` on the whole test split, in eval mode (its mode is restored after).

        Returns ``loss`` (the training loss over the test split), ``metric`` (the success
        measure), ``success`` (the task's criterion, never true with a non-finite loss) and
        the task's extra measures: ``accuracy`` (classify, lm), ``error_rate`` (regress, the
        fraction of test examples off by more than the tolerance). Non-finite outputs count
        as wrong.
        """
        _check_int("batch_size", batch_size, minimum=1, where="Task.evaluate")
        device, dtype = _device_and_dtype(model)
        x, y = self.test
        was_training = model.training
        model.eval()
        loss_sum, hits, elements = 0.0, 0, 0
        try:
            for i in range(0, len(x), batch_size):
                xb = x[i : i + batch_size].to(device)
                if xb.is_floating_point() and dtype is not None:
                    xb = xb.to(dtype)
                yb = y[i : i + batch_size].to(device)
                out = model(xb).float()
                count = yb.numel()
                loss_sum += float(self.loss(out, yb)) * count
                hits += int(self._hits(out, yb))
                elements += count
        finally:
            model.train(was_training)
        loss = loss_sum / elements
        result: dict[str, float] = {"loss": loss}
        if self.kind == "classify":
            result["accuracy"] = result["metric"] = hits / elements
        elif self.kind == "regress":
            result["metric"] = loss  # the MSE
            result["error_rate"] = 1.0 - hits / elements
        else:
            result["metric"] = loss / math.log(2)  # nats -> bits per character
            result["accuracy"] = hits / elements
        result["success"] = self.criterion.holds(result)
        return result

    def _hits(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Examples (classify, regress) or positions (lm) the model got right."""
        if self.kind == "regress":
            err = _as_predictions(out, targets) - targets
            # `<=` is false for NaN, so a non-finite prediction counts as an error
            assert self.tolerance is not None  # a regress task has one
            return (err.abs() <= self.tolerance).sum()
        finite = torch.isfinite(out).all(dim=-1)
        return ((out.argmax(dim=-1) == targets) & finite).sum()

    def describe(self) -> str:
        """One line: what the task is and what counts as success."""
        better = "higher" if self.higher_is_better else "lower"
        return (
            f"{self.name}: {self.kind}, input {self.input_shape}, {self.num_outputs} outputs, "
            f"{len(self.train[0])} train / {len(self.test[0])} test; metric {self.metric_name} "
            f"({better} is better, chance {self.chance_metric:.4g}); success: {self.criterion}"
        )


def _as_predictions(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Regression outputs as shaped like the targets: ``(B, 1)`` -> ``(B,)``."""
    if outputs.shape == targets.shape:
        return outputs
    if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1:
        return outputs.squeeze(-1)
    raise ConfigError(
        f"a regression model must output shape {tuple(targets.shape)} or "
        f"{(*targets.shape, 1)}, got {tuple(outputs.shape)}; give the model one output"
    )


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else None)
    return torch.device("cpu"), None
