"""GuardedOptimizer and the Guard's two-phase step (before_step/after_step), the pieces the
framework integrations stand on: each must do exactly what Guard.step does."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from gradguard import ConfigError, GradGuardError, Guard
from gradguard.optim import GuardedOptimizer, unwrap_guarded

SPEC = "skip_nonfinite+zclip:warmup=3+clip_norm:0.5+lr_backoff:factor=0.5,events=2,recover=3"


def _setup(opt_name="adam"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


def _batches(n=12):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)
    ]


def _loss(model, x, y, step):
    loss = nn.functional.cross_entropy(model(x), y)
    if step in (4, 7):
        loss = loss * float("nan")  # non-finite steps: skipped, and lr_backoff reacts to them
    if step == 9:
        loss = loss * 1e3  # a spike: clipped
    return loss


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _two_phase(guard, opt, loss):
    pending = guard.before_step(loss)
    opt.step()  # what a framework does: it always steps
    return guard.after_step(pending)


def _run_step(opt_name, step=lambda guard, opt, loss: guard.step(loss)):
    model, opt = _setup(opt_name)
    guard = Guard(model, opt, SPEC)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.7)
    reports = []
    for i, (x, y) in enumerate(_batches()):
        opt.zero_grad()
        loss = _loss(model, x, y, i)
        loss.backward()
        reports.append(step(guard, opt, loss))
        sched.step()
    return model, opt, guard, reports


@pytest.mark.parametrize("opt_name", ["adam", "momentum"])
def test_two_phase_step_equals_step(opt_name):
    """before_step + the framework's own optimizer.step() + after_step == Guard.step, exactly:
    the skip (gradients dropped) leaves params and optimizer state as Guard.step's skip does, and
    the LR scale is applied to that one step only."""
    ref_model, ref_opt, ref_guard, ref_reports = _run_step(opt_name)
    model, opt, guard, reports = _run_step(opt_name, _two_phase)
    assert torch.equal(_flat(model), _flat(ref_model))
    assert [r.skipped for r in reports] == [r.skipped for r in ref_reports]
    assert sum(r.skipped for r in reports) == 2
    assert any(r.lr_scale != 1.0 for r in reports)  # lr_backoff acted, and still equal
    assert [r.lr_scale for r in reports] == [r.lr_scale for r in ref_reports]
    assert guard.counters == ref_guard.counters
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    for p, rp in zip(model.parameters(), ref_model.parameters(), strict=True):
        for k, v in ref_opt.state[rp].items():
            assert torch.equal(torch.as_tensor(opt.state[p][k]), torch.as_tensor(v)), k


def test_two_phase_misuse_is_refused():
    model, opt = _setup()
    guard = Guard(model, opt)
    model(torch.randn(2, 6)).sum().backward()
    pending = guard.before_step()
    with pytest.raises(GradGuardError, match="twice"):
        guard.before_step()
    opt.step()
    guard.after_step(pending)
    with pytest.raises(GradGuardError, match="before_step"):
        guard.after_step(pending)


@pytest.mark.parametrize("opt_name", ["adam", "momentum"])
def test_guarded_optimizer_equals_guard_step(opt_name):
    ref_model, ref_opt, ref_guard, ref_reports = _run_step(opt_name)

    model, inner = _setup(opt_name)
    opt = GuardedOptimizer(inner, model=model, policy=SPEC)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.7)  # schedulers accept the wrapper
    for i, (x, y) in enumerate(_batches()):
        opt.zero_grad()
        loss = _loss(model, x, y, i)
        loss.backward()
        opt.step()
        assert opt.last_report.skipped == ref_reports[i].skipped
        sched.step()
    assert torch.equal(_flat(model), _flat(ref_model))
    assert opt.guard.counters == ref_guard.counters
    assert opt.param_groups is inner.param_groups
    assert [g["lr"] for g in inner.param_groups] == [g["lr"] for g in ref_opt.param_groups]


def test_closure_loss_reaches_the_guard():
    model, inner = _setup()
    opt = GuardedOptimizer(inner, model=model, policy="skip_spike:warmup=2,on=both")
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    out = opt.step(closure)
    assert isinstance(out, torch.Tensor)
    # skip_spike needs the loss; with it the Guard recorded this step's loss in its statistics.
    assert opt.guard.counters["steps"] == 1
    assert opt.guard.policies[-1].state_dict()["loss"] == [pytest.approx(out.item())]


def test_state_dict_round_trip_resumes_the_guard():
    model, inner = _setup()
    opt = GuardedOptimizer(inner, model=model, policy="skip_nonfinite+zclip:warmup=2")
    for i, (x, y) in enumerate(_batches(6)):
        opt.zero_grad()
        loss = _loss(model, x, y, i)
        loss.backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["gradguard"]["counters"]["skipped"] == 1

    model2 = copy.deepcopy(model)
    opt2 = GuardedOptimizer(
        torch.optim.Adam(model2.parameters(), lr=0.05),
        model=model2,
        policy="skip_nonfinite+zclip:warmup=2",
    )
    opt2.load_state_dict(state)
    assert opt2.guard.counters == opt.guard.counters
    assert opt2.guard.policies[1].state.keys() == opt.guard.policies[1].state.keys()
    # The wrapper's containers follow the wrapped optimizer, which load_state_dict replaced.
    assert opt2.param_groups is opt2.optimizer.param_groups
    assert opt2.state is opt2.optimizer.state
    # A plain optimizer state dict loads too (the Guard starts fresh).
    opt3 = GuardedOptimizer(torch.optim.Adam(model2.parameters(), lr=0.05), model=model2)
    opt3.load_state_dict(inner.state_dict())
    assert opt3.guard.counters["steps"] == 0


def test_hooks_registered_on_the_wrapper_fire_on_the_real_step():
    model, inner = _setup()
    opt = GuardedOptimizer(inner, model=model, policy="none")
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(o))
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    assert calls == [inner]


def test_grad_scaler_with_the_wrapper():
    """A framework's GradScaler.step(guarded): the scaler unscales, then the Guard measures."""
    model, inner = _setup("momentum")
    ref_model, ref_opt = _setup("momentum")
    opt = GuardedOptimizer(inner, model=model, policy="clip_norm:0.1")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _batches(1)[0]
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    nn.functional.cross_entropy(ref_model(x), y).backward()
    nn.utils.clip_grad_norm_(ref_model.parameters(), 0.1)
    ref_opt.step()
    torch.testing.assert_close(_flat(model), _flat(ref_model))


def test_misuse_is_refused():
    model, inner = _setup()
    opt = GuardedOptimizer(inner, model=model)
    with pytest.raises(ConfigError, match="already"):
        GuardedOptimizer(opt)
    with pytest.raises(ConfigError, match="before wrapping"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ConfigError, match=r"torch\.optim\.Optimizer"):
        GuardedOptimizer(object())  # type: ignore[arg-type]


def test_unwrap_finds_the_guarded_optimizer_in_framework_wrappers():
    model, inner = _setup()
    opt = GuardedOptimizer(inner, model=model)

    class FrameworkWrapper:  # like accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert unwrap_guarded(FrameworkWrapper(FrameworkWrapper(opt))) is opt
    assert unwrap_guarded(inner) is None
    assert unwrap_guarded(None) is None
