"""A small, real experiment that shows what a Guard buys: a deep plain (no normalization, no
residual) ReLU network on scikit-learn's handwritten digits, trained with SGD + momentum at a
learning rate where it diverges without a guard.

``gradguard demo`` runs it for a few policies and prints a table. The full comparison suite across
tasks, models, learning rates and seeds is ``gradguard bench``'s job; this is the quick look.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .guard import Guard

DEMO_POLICIES = ("none", "default", "clip_norm:1.0", "autoclip:10", "skip_nonfinite+zclip+agc:0.01")


def load_digits_split(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 real handwritten images, shipped inside scikit-learn),
    stratified split, standardized with the training split's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


def deep_plain_mlp(
    depth: int = 12, width: int = 64, d_in: int = 64, classes: int = 10
) -> nn.Sequential:
    """``depth`` Linear+ReLU blocks with He (Kaiming-normal) init and no normalization: trainable at
    a small LR, explosive at a large one."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, classes))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


@dataclass
class DemoResult:
    policy: str
    lr: float
    seed: int
    nonfinite_weights: bool
    final_loss: float
    test_accuracy: float
    skipped: int
    clipped: int
    seconds: float


def run_demo(
    policy: str = "default",
    lr: float = 0.1,
    seed: int = 0,
    steps: int = 300,
    batch: int = 64,
    depth: int = 12,
) -> DemoResult:
    """Train the deep plain MLP on digits once; ``policy="none"`` trains without a Guard."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_split()
    model = deep_plain_mlp(depth)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    guard = None if policy == "none" else Guard(model, opt, policy)
    gen = torch.Generator().manual_seed(seed)
    bad = False
    loss = torch.tensor(math.nan)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x_tr), (batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
        loss.backward()
        if guard is not None:
            guard.step(loss=loss)
        else:
            opt.step()
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            bad = True
            break
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    c = guard.counters if guard is not None else {"skipped": 0, "clipped": 0}
    return DemoResult(
        policy, lr, seed, bad, float(loss.detach()), acc, c["skipped"], c["clipped"], seconds
    )


def format_table(results: list[DemoResult]) -> str:
    head = f"{'policy':34s} {'lr':>5s} {'seed':>4s} {'NaN weights':>11s} {'loss':>9s} {'test acc':>8s} {'skipped':>7s} {'clipped':>7s} {'s':>5s}"
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.policy:34s} {r.lr:5.3g} {r.seed:4d} {('yes' if r.nonfinite_weights else 'no'):>11s} {r.final_loss:9.3g} "
            f"{r.test_accuracy:8.3f} {r.skipped:7d} {r.clipped:7d} {r.seconds:5.1f}"
        )
    return "\n".join(rows)
