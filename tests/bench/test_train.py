"""The bench's optimizers: foreach kernels (a few calls a step, where torch's CPU default loops
over the tensors) that take the same steps as torch's default loop, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard.bench.config import RunConfig, resolve
from gradguard.bench.train import make_optimizer


def _trained(make_opt) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_the_bench_optimizer_takes_torchs_default_steps_bit_for_bit(name):
    res = resolve(RunConfig(optimizer=name, lr=0.05, weight_decay=1e-3))
    opt = make_optimizer(res, [nn.Parameter(torch.zeros(1))])
    assert all(g["foreach"] for g in opt.param_groups)
    defaults = {
        k: v for k, v in opt.defaults.items() if k in ("lr", "momentum", "nesterov", "weight_decay")
    }
    loop = {"sgd": torch.optim.SGD, "momentum": torch.optim.SGD, "nesterov": torch.optim.SGD}.get(
        name, torch.optim.Adam if name == "adam" else torch.optim.AdamW
    )
    assert type(opt) is loop
    ours = _trained(lambda ps: make_optimizer(res, ps))
    theirs = _trained(lambda ps: loop(ps, **defaults, foreach=False))
    assert torch.equal(ours, theirs)
