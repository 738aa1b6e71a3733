"""reset_moments and skip_spike against the rules they name: SPAM's periodic reset schedule,
OLMo-core's skip-step warmup, and the promise that a reset keeps the spike out of the moments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard

from tests.helpers import TinyNet, data, train_step
from tests.reference.olmo_skip_reference import olmo_skips


def spam_reset_steps(n_steps: int, delta_t: int) -> list[int]:
    """SPAM (TianjinYellow/SPAM-Optimizer, galore_torch/SPAM.py): ``self.total_steps += 1`` at the
    start of each step, then ``if self.total_steps % self.update_proj_gap == 0`` reset. Returned
    as 0-based step indices."""
    total, out = 0, []
    for step in range(n_steps):
        total += 1  # noqa: SIM113 - SPAM's own counter, kept as it is written
        if total % delta_t == 0:
            out.append(step)
    return out


@pytest.mark.parametrize("every", [1, 3, 7])
def test_periodic_reset_follows_spams_schedule(every):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gradguard.Guard(model, opt, f"reset_moments:z=1e9,every={every}")
    got = []
    for step in range(25):
        train_step(model, opt, *data(step))
        if "reset_moments" in guard.step().actions:
            got.append(step)
    # Before step 0 the optimizer holds no state: a reset there changes nothing, in SPAM too.
    assert got == [s for s in spam_reset_steps(25, every) if s > 0]


def calm_then_spike(n: int, at: int, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    values = (torch.rand(n, generator=gen) * 0.2 + 1.0).tolist()
    values[at] = 1e3
    return values


@pytest.mark.parametrize("window", [16, 128])
def test_skip_spike_starts_checking_when_olmo_core_does(window):
    """A spike at each step around the end of the warmup is skipped exactly when OLMo-core's
    SkipStepOptimizer would skip it (before the first skip both rules see the same values)."""
    first = max(2, window // 2) - 1  # 0-based index of the first checked step
    for at in range(first - 3, first + 4):
        values = calm_then_spike(at + 2, at)
        model = nn.Linear(1, 1, bias=False)
        guard = gradguard.Guard(
            model, torch.optim.SGD(model.parameters(), lr=0.0), f"skip_spike:window={window}"
        )
        ours = []
        for v in values:
            model.weight.grad = torch.full((1, 1), v)
            ours.append(guard.step(loss=torch.tensor(1.0)).skipped)
        theirs = olmo_skips(values, window=window)
        assert ours[: at + 1] == theirs[: at + 1], at
        assert ours[at] == (at >= first)


def test_after_a_spike_we_differ_from_olmo_core_on_purpose():
    """OLMo-core keeps the spike in its window, so a second spike right after passes; ours does
    not let the first spike widen the deviation."""
    values = calm_then_spike(40, 20)
    values[21] = 1e3
    theirs = olmo_skips(values, window=16)
    model = nn.Linear(1, 1, bias=False)
    guard = gradguard.Guard(
        model, torch.optim.SGD(model.parameters(), lr=0.0), "skip_spike:window=16,on=grad_norm"
    )
    ours = []
    for v in values:
        model.weight.grad = torch.full((1, 1), v)
        ours.append(guard.step().skipped)
    assert theirs[20] and not theirs[21]
    assert ours[20] and ours[21]


def second_moment_after_spike(policy: str, spike: bool) -> tuple[float, float]:
    """(raw, bias-corrected) Adam second moment of the spiked element 10 steps after the spike."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gradguard.Guard(model, opt, policy)
    for step in range(50):
        train_step(model, opt, *data(step % 8))
        if spike and step == 39:
            model.fc2.weight.grad[2, 3] *= 1e4  # one element, x1e4
        guard.step()
    st = opt.state[model.fc2.weight]
    v = float(st["exp_avg_sq"][2, 3])
    return v, v / (1 - 0.999 ** float(st["step"]))


def test_reset_moments_keeps_a_spike_out_of_the_second_moment():
    clean_raw, clean_hat = second_moment_after_spike("reset_moments", spike=False)
    raw, hat = second_moment_after_spike("reset_moments", spike=True)
    bare_raw, _ = second_moment_after_spike("none", spike=True)
    assert bare_raw > 1000 * clean_raw  # the control: without the policy the spike lingers
    assert clean_hat / 10 < hat < 10 * clean_hat  # the estimate Adam divides by: as if no spike
    assert raw < 10 * clean_raw
