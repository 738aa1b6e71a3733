"""reset_moments: it zeroes only the spiked parameter's optimizer state (and leaves state it does
not know alone), follows SPAM's periodic reset schedule, and keeps the spike out of the moments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard
from gradguard.policies import reset_param_state_

from tests.helpers import TinyNet, data, train_step


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


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-3),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, amsgrad=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    ],
)
def test_reset_moments_zeroes_only_the_spiked_parameter(make_opt):
    torch.manual_seed(0)
    model = TinyNet()
    opt = make_opt(model.parameters())
    guard = gradguard.Guard(model, opt, "reset_moments:z=6,warmup=10")
    for step in range(30):
        train_step(model, opt, *data(step))
        assert "reset_moments" not in guard.step().actions
    train_step(model, opt, *data(30))
    model.fc2.weight.grad.mul_(1e3)
    before = model.fc2.weight.detach().clone()
    r = guard.step()
    assert r.actions == ("reset_moments",) and r.layers["reset_moments"] == ("fc2",)
    # The spiked weight did not move, and its spiking gradient is in none of its moments.
    assert torch.equal(model.fc2.weight, before)
    names = [n for n, _ in model.named_parameters()]
    for name, p in zip(names, model.parameters(), strict=True):
        st = opt.state[p]
        for k, v in st.items():
            if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                continue
            if name == "fc2.weight":
                assert torch.equal(v, torch.zeros_like(v)), k
            else:
                assert not torch.equal(v, torch.zeros_like(v))
    if "step" in opt.state[model.fc2.weight]:
        assert float(opt.state[model.fc2.weight]["step"]) == 0.0
        assert float(opt.state[model.fc1.weight]["step"]) == 31.0
    # The next step is an ordinary first step for fc2.weight.
    train_step(model, opt, *data(31))
    guard.step()
    assert not torch.equal(model.fc2.weight, before)


def test_reset_param_state_helper_leaves_unknown_state_alone():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p]["custom"] = "keep"
    assert sorted(reset_param_state_(opt, p)) == ["exp_avg", "exp_avg_sq", "step"]
    assert opt.state[p]["custom"] == "keep"
    assert reset_param_state_(opt, nn.Parameter(torch.ones(2))) == []
