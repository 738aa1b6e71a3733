"""Your own training setup, as ``gradguard advise --entry`` takes it.

``build`` returns one fresh setup; ``gradguard advise`` calls it once per probe run (in worker
processes), after seeding torch, numpy and random with the run's seed, which it also passes as
``seed``. The contract (:mod:`gradguard.advice.entry`):

- ``model``: the ``nn.Module`` to train, freshly initialized;
- ``optimizer``: ``optimizer(model) -> torch.optim.Optimizer`` at the LR you train with (the probe
  scales every param group's LR by its factors: x0.1 ... x30);
- ``loss``: ``loss(model, batch) -> Tensor``, the scalar training loss of one batch;
- ``data``: an iterable of batches in the form ``loss`` takes (a ``DataLoader`` here; it is
  iterated again at each epoch's end);
- ``evaluate`` (optional): ``evaluate(model) -> float``, a held-out score (test accuracy here;
  ``higher_is_better=False`` for a loss). Without it policies are ranked by final training loss.

Here: a 6-layer ReLU MLP on scikit-learn's handwritten digits (8x8 images, 10 classes), SGD with
momentum 0.9 at LR 0.05. Run from the repository root (so that ``examples`` is importable)::

    gradguard advise --entry examples.advise_entry:build --budget 120s --out results/advise-example
    gradguard advise --entry examples.advise_entry:build --lr 0.2 --budget 5000steps
    python -m examples.advise_entry        # the same through the Python API
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from gradguard.advice import Setup

LR = 0.05
BATCH_SIZE = 64


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, ...]:
    """Train/test tensors: a stratified 75/25 split, pixels standardized with the train split's
    mean and std (floored at one gray level, so a pixel constant in training stays bounded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    mean, std = x_tr.mean(0), x_tr.std(0).clip(min=1.0)

    def tensor(a):
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return tensor(x_tr), torch.tensor(y_tr), tensor(x_te), torch.tensor(y_te)


def build(seed: int = 0) -> Setup:
    """One fresh setup: model, optimizer factory, loss, data, evaluation."""
    x_tr, y_tr, x_te, y_te = digits()
    layers: list[nn.Module] = []
    width, d_in = 64, x_tr.shape[1]
    for _ in range(6):
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    model = nn.Sequential(*layers, nn.Linear(width, 10))

    def optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def loss(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(model: nn.Module) -> float:
        return (model(x_te).argmax(dim=1) == y_te).float().mean().item()

    data = DataLoader(
        TensorDataset(x_tr, y_tr),
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),  # the batch order follows the seed
    )
    return Setup(model=model, optimizer=optimizer, loss=loss, data=data, evaluate=evaluate)


if __name__ == "__main__":  # the guard matters: the probe's worker processes import this module
    import gradguard

    print(gradguard.advise(entry="examples.advise_entry:build", budget="120s"))
