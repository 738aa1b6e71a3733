"""Every registered policy honours the same contract (runs over ``available_policies()``, so a new
policy is tested as soon as it is registered)."""

from __future__ import annotations

import io

import pytest
import torch

import gradguard
from gradguard.policies import policy_class

from tests.helpers import MODEL_FOR, TinyNet, train_step

#: Parameters a policy cannot do without (everything else has a default).
REQUIRED = {"clip_layerwise": {"factor": 3.0}}


def make(name: str) -> gradguard.Policy:
    return policy_class(name)(**REQUIRED.get(name, {}))


def model_for(name: str) -> TinyNet:
    return MODEL_FOR.get(name, TinyNet)()


def run(model, policy, steps=60, inject=None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gradguard.Guard(model, opt, policy)
    gen = torch.Generator().manual_seed(0)
    reports = []
    for step in range(steps):
        x = torch.randn(16, 6, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        loss = train_step(model, opt, x, y)
        if inject:
            inject(step, model)
        reports.append(guard.step(loss=loss))
    return guard, opt, reports


def faults(step, model):
    if step == 30:
        model.fc2.weight.grad[0, 0] = float("nan")
    if step == 45:
        model.fc1.weight.grad.mul_(1e5)


def test_every_policy_is_listed_and_documented():
    names = gradguard.available_policies()
    assert {
        "clip_norm",
        "clip_value",
        "clip_layerwise",
        "agc",
        "autoclip",
        "zclip",
        "skip_nonfinite",
        "skip_spike",
        "reset_moments",
        "lr_backoff",
        "rollback",
    } <= set(names)
    for n in names:
        cls = policy_class(n)
        assert cls.__doc__ and len(cls.__doc__) > 80, (
            f"{n} needs a docstring: what, reference, defaults"
        )


@pytest.mark.parametrize("name", gradguard.available_policies())
def test_no_nan_reaches_the_weights(name):
    torch.manual_seed(0)
    model = model_for(name)
    guard, opt, reports = run(model, make(name), inject=faults)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for state in opt.state.values():
        for v in state.values():
            assert torch.isfinite(v).all()
    assert reports[30].skipped
    assert guard.counters["steps"] == 60


def _held(model, opt):
    """What a policy must leave alone: the weights, the buffers, the optimizer's state, and which
    parameters have a gradient (their values are the stats' to change)."""
    tensors = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    state = [
        {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
        for st in (opt.state.get(p, {}) for p in model.parameters())
    ]
    return tensors, state, [p.grad is None for p in model.parameters()]


def _same_held(a, b) -> bool:
    (ta, sa, ga), (tb, sb, gb) = a, b
    return (
        ga == gb
        and all(torch.equal(x, y) for x, y in zip(ta, tb, strict=True))
        and all(
            x.keys() == y.keys()
            and all(
                torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
                for k in x
            )
            for x, y in zip(sa, sb, strict=True)
        )
    )


@pytest.mark.parametrize("name", gradguard.available_policies())
def test_a_policy_decides_and_the_guard_acts(name, monkeypatch):
    """No policy touches the model or the optimizer itself: across every ``apply`` (on steps with
    a NaN and a spike, where rollback restores and reset_moments resets) the weights, buffers,
    optimizer state and the set of gradients are as they were; the Guard does what it decided."""
    torch.manual_seed(0)
    model = model_for(name)
    policy = make(name)
    seen: dict[str, object] = {}
    real_apply = type(policy).apply

    def watched(self, ctx):
        before = _held(model, ctx.optimizer)
        real_apply(self, ctx)
        after = _held(model, ctx.optimizer)
        assert _same_held(before, after), f"{name}.apply changed the model or the optimizer"
        seen["asked"] = seen.get("asked", False) or bool(ctx.restore or ctx.reset or ctx.drop)

    monkeypatch.setattr(type(policy), "apply", watched)
    guard, _, reports = run(model, policy, inject=faults)
    assert guard.counters["steps"] == 60
    if name in ("rollback", "reset_moments"):
        # The two that change model or optimizer state did ask, and the Guard carried it out.
        assert seen["asked"]
        if name == "rollback":
            assert reports[30].rolled_back
        else:
            assert policy.state["resets"] >= 1 and "reset_moments" in reports[45].actions


@pytest.mark.parametrize("name", gradguard.available_policies())
def test_state_round_trips_through_weights_only_load(name):
    torch.manual_seed(0)
    guard, _, _ = run(model_for(name), make(name), inject=faults)
    buf = io.BytesIO()
    torch.save(guard.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh_model = model_for(name)
    fresh = gradguard.Guard(fresh_model, torch.optim.Adam(fresh_model.parameters()), make(name))
    fresh.load_state_dict(loaded)
    again = fresh.state_dict()

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a.cpu(), b.cpu())
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return a == b

    assert same(guard.state_dict(), again)


@pytest.mark.parametrize(
    "name", [n for n in gradguard.available_policies() if policy_class(n).kind != "clip"]
)
def test_quiet_run_is_left_alone_by_detectors(name):
    """On a healthy run, skip/rollback/reset policies never fire (clipping ones may engage)."""
    torch.manual_seed(0)
    guard, _, reports = run(model_for(name), make(name))
    assert not any(r.skipped for r in reports)
    assert guard.counters["skipped"] == 0 and guard.counters["rolled_back"] == 0
