"""Test plumbing shared by the policy tests (not a reference algorithm itself).

- ``Recorder``: an optimizer that records the gradients it is asked to apply (and optionally does
  a plain SGD update), so a test sees exactly what the Guard handed to ``optimizer.step()``.
- ``spiky_norms``: a fixed-seed sequence of target global norms: a log-normal baseline with a slow
  drift, finite spikes x10..x1000, and a few NaN/Inf steps.
- ``set_grads_to_norm``: assign ``p.grad`` for every parameter so that the global L2 norm is the
  target (or plant a NaN/Inf), returning float64 copies of what was set.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class Recorder(torch.optim.Optimizer):
    """Records ``p.grad.clone()`` for every parameter at each ``step``; SGD update if ``lr > 0``."""

    def __init__(self, params, lr: float = 0.0):
        super().__init__(params, {"lr": lr})
        self.seen: list[list[torch.Tensor | None]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append(
            [
                None if p.grad is None else p.grad.detach().clone()
                for group in self.param_groups
                for p in group["params"]
            ]
        )
        for group in self.param_groups:
            if group["lr"]:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
        return None


def spiky_norms(
    n: int,
    seed: int,
    n_spikes: int = 8,
    n_nonfinite: int = 4,
    first_event: int = 30,
    sigma: float = 0.25,
) -> list[float]:
    """``n`` target norms: exp(N(drift, sigma)) baseline, spikes x10..x1000, NaN/Inf steps."""
    rng = np.random.default_rng(seed)
    drift = np.linspace(0.0, 0.7, n)  # slow upward trend, as norms do early in training
    norms = np.exp(drift + sigma * rng.standard_normal(n))
    events = rng.choice(np.arange(first_event, n), size=n_spikes + n_nonfinite, replace=False)
    for k in events[:n_spikes]:
        norms[k] *= 10.0 ** rng.uniform(1.0, 3.0)
    out = [float(x) for x in norms]
    for j, k in enumerate(events[n_spikes:]):
        out[k] = (math.nan, math.inf, -math.inf)[j % 3]
    return out


def set_grads_to_norm(model: torch.nn.Module, target: float, seed: int) -> list[torch.Tensor]:
    """Give every parameter a random gradient with global L2 norm ``target``.

    A non-finite ``target`` plants that value in one element of one gradient (the others stay
    finite). Returns float64 copies of the gradients as set (in ``model.parameters()`` order).
    """
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    dirs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    total = math.sqrt(sum(float((d * d).sum()) for d in dirs))
    out = []
    bad = int(torch.randint(len(params), (1,), generator=gen)) if not math.isfinite(target) else -1
    for i, (p, d) in enumerate(zip(params, dirs, strict=True)):
        g = d * ((target if math.isfinite(target) else 1.0) / total)
        if i == bad:
            g.view(-1)[0] = target
        p.grad = g.to(p.dtype)
        out.append(p.grad.detach().to(torch.float64).clone())
    return out


def global_norm(grads: list[torch.Tensor]) -> float:
    """float64 global L2 norm (inf/nan propagate)."""
    return math.sqrt(sum(float((g.to(torch.float64) ** 2).sum()) for g in grads))
