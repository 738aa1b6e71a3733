"""No non-finite weight comes out of a Guard step by any path: after every step the weights (and
the optimizer state) are finite, or the Guard raised its own error naming the cause; a chain with
rollback restores instead; a run that only skips ends in a clear error, not a silent stall."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradguard import ConfigError, GradGuardError, Guard
from gradguard.errors import IntegrityError, StallError, TrainingHalted

from tests.helpers import TinyNet, data


def backward(model: nn.Module, opt: torch.optim.Optimizer, scale: float = 1.0) -> torch.Tensor:
    x, y = data()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y) * scale
    loss.backward()
    return loss


def all_finite(model: nn.Module, opt: torch.optim.Optimizer) -> bool:
    ts = [p.detach() for p in model.parameters()]
    ts += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in ts if t.is_floating_point())


def setup(policy: str = "default", opt: str = "adam", **kw):
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = (
        torch.optim.Adam(model.parameters(), lr=1e-3)
        if opt == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    return model, optimizer, Guard(model, optimizer, policy=policy, **kw)


def warm(model, opt, guard, steps: int = 3) -> None:
    for _ in range(steps):
        guard.step(loss=backward(model, opt))


# (+inf leaves the weights finite, m / inf = 0: check_state=True catches it, tested below)
@pytest.mark.parametrize("value", [math.nan, -math.inf, -1.0])
def test_a_corrupted_adam_second_moment_is_named(value):
    model, opt, guard = setup()
    warm(model, opt, guard)
    opt.state[model.fc2.weight]["exp_avg_sq"][0, 0] = value
    backward(model, opt)
    with pytest.raises(IntegrityError, match=r"exp_avg_sq.*fc2\.weight") as e:
        guard.step()
    assert e.value.reason == "nonfinite_state"


def test_a_nan_momentum_buffer_is_named():
    model, opt, guard = setup(opt="sgd")
    warm(model, opt, guard)
    opt.state[model.head.bias]["momentum_buffer"][1] = math.nan
    backward(model, opt)
    with pytest.raises(IntegrityError, match=r"momentum_buffer.*head\.bias"):
        guard.step()


def test_with_rollback_a_corrupted_state_is_rolled_back_not_raised():
    model, opt, guard = setup(policy="default+rollback:every=1")
    warm(model, opt, guard)
    opt.state[model.fc1.weight]["exp_avg"][0, 0] = math.nan
    backward(model, opt)
    rep = guard.step()
    assert rep.rolled_back and rep.skipped
    assert all_finite(model, opt)
    warm(model, opt, guard)  # and training goes on
    assert all_finite(model, opt)


@pytest.mark.parametrize(
    ("key", "value"),
    [("lr", math.inf), ("lr", math.nan), ("weight_decay", math.inf), ("betas", (0.9, math.nan))],
)
def test_non_finite_hyperparameters_are_refused_before_anything_changes(key, value):
    model, opt, guard = setup()
    warm(model, opt, guard)
    before = [p.detach().clone() for p in model.parameters()]
    policy_state = guard.state_dict()
    opt.param_groups[0][key] = value
    backward(model, opt)
    with pytest.raises(IntegrityError, match=f"param group 0 has {key}") as e:
        guard.step()
    assert e.value.reason == "nonfinite_hyperparameter"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert str(guard.state_dict()) == str(policy_state)


def test_a_param_group_added_after_the_guard_is_refused():
    model, opt, guard = setup()
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra]})
    backward(model, opt)
    extra.grad = torch.ones(3)
    with pytest.raises(ConfigError, match="add_param_group"):
        guard.step()


def test_a_bf16_update_that_overflows_is_caught_with_skip_nonfinite_alone():
    p = nn.Parameter(torch.full((4,), 3.0e38, dtype=torch.bfloat16))
    opt = torch.optim.SGD([p], lr=1.0)
    guard = Guard(None, opt, policy="skip_nonfinite")
    p.grad = torch.full((4,), -1.0e38, dtype=torch.bfloat16)  # finite; w - lr*g overflows
    with pytest.raises(IntegrityError, match=r"overflowed.*bfloat16") as e:
        guard.step()
    assert e.value.reason == "nonfinite_weights"


def test_a_poisoned_policy_state_cannot_write_nan_weights():
    model, opt, guard = setup(policy="autoclip")
    warm(model, opt, guard, 5)
    ac = guard.policies[-1]
    for v in ac.state.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v.fill_(math.nan)
    backward(model, opt)
    with pytest.raises(GradGuardError):
        guard.step()


def test_huge_finite_gradients_that_overflow_adams_moments_are_caught():
    model, opt, guard = setup(policy="none")
    warm(model, opt, guard)
    backward(model, opt)
    for p in model.parameters():
        p.grad.fill_(1e25)  # finite; its square is not, in float32
    with pytest.raises(IntegrityError, match="exp_avg_sq"):
        guard.step()


def test_check_state_catches_an_infinite_moment_that_leaves_the_weights_finite():
    model, opt, guard = setup()
    warm(model, opt, guard)
    opt.state[model.fc1.weight]["exp_avg_sq"].fill_(math.inf)
    backward(model, opt)
    guard.step()  # by default only the weights are read: they are finite, so no error
    model, opt, guard = setup(check_state=True)
    warm(model, opt, guard)
    opt.state[model.fc1.weight]["exp_avg_sq"].fill_(math.inf)  # update m / inf = 0: weights finite
    backward(model, opt)
    with pytest.raises(IntegrityError, match="exp_avg_sq"):
        guard.step()


class WritesNaN(torch.optim.SGD):
    """An optimizer whose step always leaves a NaN weight (a bug in user code)."""

    def step(self, closure=None):
        super().step(closure)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = math.nan


def test_a_step_that_leaves_nan_weights_is_never_a_good_step_for_rollback():
    torch.manual_seed(0)
    model = TinyNet()
    opt = WritesNaN(model.parameters(), lr=0.1)
    guard = Guard(model, opt, policy="rollback:every=1,max_consecutive=3")
    with pytest.raises(TrainingHalted, match="4 times in a row") as e:
        for _ in range(10):
            guard.step(loss=backward(model, opt))
            assert all_finite(model, opt)
    assert e.value.reason == "rollback_exhausted"
    assert guard.counters["rolled_back"] == 3


def test_a_run_that_only_skips_ends_in_a_stall_error():
    model, opt, guard = setup(max_consecutive_skips=10)
    with pytest.raises(StallError, match=r"last 10 steps.*nonfinite_grad x10") as e:
        for _ in range(30):
            backward(model, opt, scale=math.nan)
            guard.step()
    assert e.value.reason == "stalled"
    assert guard.counters["skipped"] == 10


def test_good_steps_reset_the_stall_count_and_none_disables_it():
    model, opt, guard = setup(max_consecutive_skips=3)
    for i in range(12):
        backward(model, opt, scale=math.nan if i % 3 else 1.0)
        guard.step()
    model, opt, guard = setup(max_consecutive_skips=None)
    for _ in range(30):
        backward(model, opt, scale=math.nan)
        guard.step()
    assert guard.counters["skipped"] == 30


def test_bad_max_consecutive_skips_is_refused():
    with pytest.raises(ConfigError, match="max_consecutive_skips"):
        setup(max_consecutive_skips=0)


CORRUPTIONS = ["grad", "loss", "lr", "weight_decay", "exp_avg", "exp_avg_sq", "neg_sq", "weight"]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    how=st.lists(st.sampled_from(CORRUPTIONS), min_size=1, max_size=3),
    value=st.sampled_from([math.nan, math.inf, -math.inf, 1e38]),
    policy=st.sampled_from(["default", "skip_nonfinite", "zclip", "clip_norm:1.0", "agc"]),
    at=st.integers(0, 3),
)
def test_any_corruption_ends_finite_or_in_the_guards_own_error(how, value, policy, at):
    """Whatever is corrupted and however, after each Guard step the weights and the optimizer
    state are finite, or the Guard raised one of its own errors."""
    model, opt, guard = setup(policy=policy, check_state=True)
    for step in range(6):
        loss = backward(model, opt)
        if step == at:
            for h in how:
                if h == "grad":
                    model.fc1.weight.grad[0, 0] = value
                elif h == "loss":
                    loss = loss * value
                elif h in ("lr", "weight_decay"):
                    # (a finite 1e38 LR is torch's own error, raised inside its step)
                    opt.param_groups[0][h] = value if not math.isfinite(value) else 1e3
                elif h == "weight":
                    with torch.no_grad():
                        model.fc2.bias[0] = value
                elif opt.state:
                    key = "exp_avg_sq" if h == "neg_sq" else h
                    opt.state[model.head.weight][key][0, 0] = -1.0 if h == "neg_sq" else value
        try:
            guard.step(loss=loss)
        except GradGuardError:
            return
        assert all_finite(model, opt), (how, value, policy, at)


def test_huge_but_finite_weights_are_finite_for_the_bench_and_rollback():
    """A float32 norm of 1e30-sized weights overflows; neither the bench's divergence check nor
    rollback's snapshot rule may take that for a NaN."""
    from gradguard.bench.loop import params_finite
    from gradguard.snapshot import capture
    from gradguard.snapshot import params_finite as snapshot_params_finite

    model, opt, guard = setup(policy="rollback:every=1")
    with torch.no_grad():
        model.fc1.weight.fill_(1e30)
    assert params_finite(model)
    assert snapshot_params_finite(guard.layout) and capture(guard.layout, opt) is not None
    with torch.no_grad():
        model.fc1.weight[0, 0] = math.nan
    assert not params_finite(model) and not snapshot_params_finite(guard.layout)
    assert capture(guard.layout, opt) is None
