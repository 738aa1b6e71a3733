"""Fault injectors strike where and when scheduled (a pure function of the seed), record every
strike, and harm an unguarded run while the default Guard holds; bad fault specs get the project's
own error, never another exception."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard
from gradguard import faults
from gradguard.errors import SpecError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


TEACHER = torch.randn(6, 3, generator=torch.Generator().manual_seed(99))


def batch(step):
    """A learnable batch: the labels are a fixed linear teacher's argmax."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(32, 6, generator=gen)
    return x, (x @ TEACHER).argmax(1)


def grads_of(model):
    model.zero_grad()
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_same_seed_same_strikes_other_seed_other_schedule():
    def schedule(seed):
        plan = faults.parse("nan:p=0.1", seed=seed)
        model = Net()
        for step in range(200):
            grads_of(model)
            plan.on_gradients(step, model)
        return [(s.step, s.where) for s in plan.strikes]

    a, b, c = schedule(0), schedule(0), schedule(1)
    assert a == b and a != c
    assert 8 <= len(a) <= 35  # p=0.1 over 200 steps


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_strikes_the_named_layer_at_the_step(kind):
    torch.manual_seed(0)
    model = Net()
    plan = faults.parse(f"{kind}:at=3,layer=fc2", seed=0)
    for step in range(6):
        clean = grads_of(model)
        plan.on_gradients(step, model)
        for name, p in model.named_parameters():
            hit = step == 3 and name == "fc2.weight"
            if hit:
                bad = p.grad.view(-1)[0]
                assert math.isnan(bad) if kind == "nan" else math.isinf(bad)
                assert torch.equal(p.grad.view(-1)[1:], clean[name].view(-1)[1:])
            else:
                assert torch.equal(p.grad, clean[name]), (step, name)
    assert [(s.step, s.kind, s.where) for s in plan.strikes] == [(3, kind, "fc2")]


def test_spike_scales_one_layer_or_all():
    torch.manual_seed(0)
    model = Net()
    clean = grads_of(model)
    faults.parse("spike:at=0,layer=head,scale=1e3", seed=0).on_gradients(0, model)
    for name, p in model.named_parameters():
        want = clean[name] * (1e3 if name.startswith("head") else 1.0)
        torch.testing.assert_close(p.grad, want)
    clean = grads_of(model)
    plan = faults.parse("spike:at=0,layer=*,scale=1e5", seed=0)
    plan.on_gradients(0, model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, clean[name] * 1e5)
    assert plan.strikes[0].where == "*"


def test_poison_scales_inputs_or_shuffles_labels_only_on_its_step():
    x, y = batch(0)
    plan = faults.parse("poison:at=2,scale=1e3", seed=0)
    for step in range(4):
        px, py = plan.on_batch(step, x, y)
        assert torch.equal(px, x * 1e3 if step == 2 else x) and torch.equal(py, y)
    plan = faults.parse("poison:at=1,mode=shuffle", seed=0)
    px, py = plan.on_batch(1, x, y)
    assert torch.equal(px, x) and not torch.equal(py, y)
    assert sorted(py.tolist()) == sorted(y.tolist())


def test_lr_burst_multiplies_for_k_steps_and_restores_exactly():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    plan = faults.parse("lr_burst:factor=100,steps=3,at=2", seed=0)
    seen, expected = [], []
    for step in range(7):
        base = opt.param_groups[0]["lr"]
        plan.on_optimizer(step, opt)
        seen.append(opt.param_groups[0]["lr"])
        expected.append(base * (100 if 2 <= step < 5 else 1))
        plan.after_step(step, opt)
        assert opt.param_groups[0]["lr"] == base  # restored exactly, before the scheduler
        sched.step()
    assert seen == pytest.approx(expected)
    assert [s.step for s in plan.strikes] == [2, 3, 4]


def test_fp16_overflow_makes_the_scaler_skip_and_the_guard_report_it():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guard = gradguard.Guard(model, opt, "default", scaler=scaler)
    plan = faults.parse("fp16_overflow:at=2", seed=0)
    reasons = []
    for step in range(4):
        opt.zero_grad()
        x, y = batch(step)
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        plan.on_gradients(step, model)
        before = scaler.get_scale()
        r = guard.step()
        reasons.append(r.skip_reason)
        if step == 2:
            assert scaler.get_scale() == before / 2
    assert reasons == [None, None, "amp_overflow", None]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("mode", ["truncate", "garbage"])
def test_corrupt_checkpoint_fails_to_load(tmp_path, mode):
    path = tmp_path / "ckpt.pt"
    torch.save(Net().state_dict(), path)
    faults.corrupt_checkpoint(path, mode=mode, seed=3)
    with pytest.raises(Exception):  # noqa: B017 (torch raises several types for a bad file)
        torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    "spec",
    [
        "nan:at=20,layer=fc2",
        "inf:at=20,layer=fc1",
        "spike:at=20,scale=1e6,layer=*",
        "poison:at=20,scale=1e6",
    ],
)
def test_unguarded_run_is_harmed_and_the_default_guard_holds(spec):
    def train(guarded):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        guard = gradguard.Guard(model, opt, "default") if guarded else None
        plan = faults.parse(spec, seed=0)
        losses = []
        for step in range(40):
            x, y = plan.on_batch(step, *batch(step % 8))
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            plan.on_gradients(step, model)
            if guard is not None:
                guard.step(loss=loss)
            else:
                opt.step()
            losses.append(float(loss.detach()))
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        return finite, losses, plan.strikes

    ok, clean_losses, strikes = train(True)
    assert ok and [s.step for s in strikes] == [20]
    assert math.isfinite(clean_losses[-1]) and clean_losses[-1] < 0.5 * clean_losses[0]
    harmed_finite, harmed_losses, _ = train(False)
    tail = harmed_losses[-5:]
    # Harmed: weights non-finite, or the loss non-finite or far above the guarded run's.
    assert (
        not harmed_finite or not all(map(math.isfinite, tail)) or min(tail) > 2 * clean_losses[-1]
    )


# ----- bad input -------------------------------------------------------------------------------
GRAMMAR = st.lists(
    st.tuples(
        st.sampled_from([*faults.available_faults(), "nope", "", "NaN"]),
        st.lists(
            st.tuples(
                st.sampled_from(["p", "at", "layer", "scale", "factor", "steps", "mode", "q", ""]),
                st.sampled_from(
                    [
                        "0.01",
                        "2",
                        "-1",
                        "1e4",
                        "abc",
                        "",
                        "inf",
                        "nan",
                        "1.5",
                        "*",
                        "fc1",
                        "shuffle",
                        "1e400",
                    ]
                ),
            ),
            max_size=3,
        ),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(GRAMMAR, st.sampled_from(["+", "++", "+ "]))
def test_near_miss_specs_parse_or_raise_spec_errors(parts, joiner):
    text = joiner.join(
        n + (":" + ",".join(f"{k}={v}" for k, v in kv) if kv else "") for n, kv in parts
    )
    try:
        plan = faults.parse(text, seed=0)
    except SpecError as e:
        assert str(e)
    else:
        assert faults.parse(plan.spec(), seed=0).spec() == plan.spec()  # round trip


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_parses_or_raises_a_spec_error(text):
    try:
        faults.parse(text, seed=0)
    except SpecError as e:
        assert str(e)


@pytest.mark.parametrize(
    "spec",
    [
        "nan:at=100,layer=fc2",
        "inf:at=100,layer=fc1",
        "spike:at=100,scale=1e6,layer=*",
        "poison:at=100,scale=1e6",
        "nan:p=0.02",
        "spike:p=0.02,scale=1e4",
    ],
)
def test_the_default_guard_keeps_accuracy_within_a_point_of_the_clean_run(spec):
    def accuracy(fault_spec):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        guard = gradguard.Guard(model, opt, "default")
        plan = faults.parse(fault_spec, seed=0)
        for step in range(200):
            x, y = plan.on_batch(step, *batch(step % 50))
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            plan.on_gradients(step, model)
            guard.step(loss=loss)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        x = torch.cat([batch(1000 + i)[0] for i in range(16)])
        with torch.no_grad():
            return (model(x).argmax(1) == (x @ TEACHER).argmax(1)).float().mean().item()

    assert accuracy(spec) >= accuracy("none") - 0.01
