"""What several test modules share: small models with known layers, their data, gradient setters,
bit-identical snapshots, and a command line that kills a bench mid-run. The fixtures are in
``conftest.py``; import these as ``from tests.helpers import TinyNet``."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """Three layers with known names: ``fc1``, ``fc2``, ``head`` (+ a parameter-free activation)."""

    def __init__(self, d_in: int = 6, width: int = 8, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class AttnNet(TinyNet):
    """TinyNet with attention between ``fc1`` and ``fc2``: ``fc1``'s 8 features are 2 tokens of 4,
    attended by an ``nn.MultiheadAttention`` (2 heads), for the policies that need attention
    (``qk_clip``). The same input and output as TinyNet."""

    def __init__(self, d_in: int = 6, width: int = 8, d_out: int = 3):
        super().__init__(d_in, width, d_out)
        self.attn = nn.MultiheadAttention(width // 2, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x)).view(x.shape[0], 2, -1)
        h = self.attn(h, h, h, need_weights=False)[0].reshape(x.shape[0], -1)
        return self.head(torch.relu(self.fc2(h)))


#: The model a registry-driven test trains a policy on: TinyNet, unless the policy needs more.
MODEL_FOR = {"qk_clip": AttnNet}


def data(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch for TinyNet: ``n`` inputs of 6 features and labels in 0..2."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def set_grads(model: nn.Module, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    """Give every parameter a fixed random gradient; return clones of what was set."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
        out.append(p.grad.clone())
    return out


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Deep copy of weights and every optimizer state tensor, for bit-identical comparisons."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": [
            {
                k: (v.clone() if isinstance(v, torch.Tensor) else v)
                for k, v in opt.state.get(p, {}).items()
            }
            for p in model.parameters()
        ],
    }


def assert_same(a: dict, b: dict) -> None:
    for x, y in zip(a["params"], b["params"], strict=True):
        assert torch.equal(x, y)
    for sa, sb in zip(a["state"], b["state"], strict=True):
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k


def slow_except(cases: list, *fast) -> list:
    """``cases`` for ``pytest.mark.parametrize`` with every case but ``fast`` marked ``slow``: the
    full suite runs them all, the fast one (``-m "not slow"``) the few that take distinct paths.
    The test ids are those of the plain cases. A fast case that is not among ``cases`` is an
    error, not a silent loss of the fast suite's coverage."""
    missing = [f for f in fast if f not in cases]
    if missing:
        raise ValueError(f"slow_except: fast cases not among the cases: {missing}")
    return [
        c
        if c in fast
        else pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow)
        for c in cases
    ]


#: ``python -c KILL_MID_RUN N K gradguard-args...``: the gradguard command line, in a process that
#: kills itself with SIGKILL (``kill -9``) at step K of its (N+1)-th run, so a test kills a bench
#: or advise mid-run after exactly N finished runs, whatever the machine's speed or load (runs
#: train in that process: pass ``--workers 1``).
KILL_MID_RUN = """
import os, signal, sys
from gradguard.bench import runner
from gradguard.cli import main

after, at_step = int(sys.argv[1]), int(sys.argv[2])
real, calls = runner.train_run, []

def die(step):
    if step == at_step:
        os.kill(os.getpid(), signal.SIGKILL)

def killing(cfg, on_step=None, log_dir=None):
    calls.append(cfg)
    return real(cfg, on_step=die if len(calls) > after else on_step, log_dir=log_dir)

runner.train_run = killing
sys.exit(main(sys.argv[3:]))
"""
