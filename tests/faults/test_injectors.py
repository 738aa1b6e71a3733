"""Fault injectors strike where and when scheduled (a pure function of the seed), record every
strike, touch nothing else, and harm an unguarded run while the default Guard holds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard
import gradguard.faults as faults
from gradguard.errors import ConfigError, SpecError

from tests.helpers import TinyNet

#: Tiny models train fastest on one thread (the fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


LAYERS = ("fc1", "fc2", "head")
TEACHER = torch.randn(6, 3, generator=torch.Generator().manual_seed(99))


def batch(step):
    """A learnable batch: the labels are a fixed linear teacher's argmax."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(32, 6, generator=gen)
    return x, (x @ TEACHER).argmax(1)


def fixed_grads(model, seed=0):
    """Give every parameter a known gradient (no backward: cheap); return clones by name."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


#: One spec per fault that works without extra arguments (lr_burst needs its start).
MINIMAL = {
    name: "lr_burst:at=0" if name == "lr_burst" else name for name in faults.available_faults()
}
P_BASED = ("nan", "inf", "spike", "poison", "fp16_overflow")


def drive(spec, seed, steps=150):
    """Run every hook of a plan over ``steps`` steps on fixed gradients and a fixed batch."""
    plan = faults.parse(spec, seed=seed)
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(0)
    for step in range(steps):
        plan.on_batch(step, x, y)
        fixed_grads(model)
        plan.on_gradients(step, model)
        plan.on_optimizer(step, opt)
        plan.after_step(step, opt)
    return plan


# ----- the registry: every fault honours the same contract ----------------------------------------
@pytest.mark.parametrize("name", sorted(faults.available_faults()))
def test_every_fault_is_documented_round_trips_and_runs(name):
    info = faults.available_faults()[name]
    assert info.summary and all(o.doc for o in info.options), "a fault documents itself"
    plan = faults.parse(MINIMAL[name], seed=3)
    assert faults.parse(plan.spec(), seed=3) == plan
    assert faults.parse(MINIMAL[name], seed=4) != plan  # the seed is part of the plan
    strikes = drive(MINIMAL[name] if name == "lr_burst" else f"{name}:p=0.5", 0, steps=20).strikes
    assert strikes and all(s.kind == name for s in strikes)


def test_none_is_the_empty_plan_and_does_nothing():
    plan = faults.parse("none", seed=0)
    assert len(plan) == 0 and plan.spec() == "none"
    x, y = batch(0)
    assert plan.on_batch(0, x, y) == (x, y)
    assert plan.strikes == []


def test_the_docstring_training_loop_runs():
    lines = faults.__doc__.split("\n\n")[1].splitlines()
    code = "\n".join(line[4:].split("  #")[0] for line in lines)
    model = TinyNet(width=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    env = {
        "gradguard": gradguard,
        "steps": 70,
        "model": model,
        "optimizer": optimizer,
        "guard": gradguard.Guard(model, optimizer, "default"),
        "scheduler": torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99),
        "batches": iter([batch(i % 8) for i in range(70)]),
        "loss_fn": nn.functional.cross_entropy,
    }
    exec(code, env)
    assert [(s.step, s.kind) for s in env["plan"].strikes] == [
        (56, "spike"),
        (57, "nan"),
        (69, "spike"),
    ]
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----- schedules ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", P_BASED)
def test_same_seed_same_strikes_other_seed_other_schedule(name):
    def schedule(seed):
        return [(s.step, s.where) for s in drive(f"{name}:p=0.1", seed).strikes]

    a, b, c = schedule(0), schedule(0), schedule(1)
    assert a == b and [s for s, _ in a] != [s for s, _ in c]
    assert 4 <= len(a) <= 30  # p=0.1 over 150 steps


def test_a_schedule_does_not_depend_on_the_other_faults():
    alone = [s for s in drive("nan:p=0.1", 0).strikes]
    mixed = [s for s in drive("spike:p=0.5+nan:p=0.1+poison:p=0.3", 0).strikes if s.kind == "nan"]
    assert alone == mixed


def test_at_strikes_exactly_the_given_steps():
    plan = drive("nan:at=7|0|99|7,layer=head", 0, steps=120)
    assert [(s.step, s.where) for s in plan.strikes] == [(0, "head"), (7, "head"), (99, "head")]
    assert plan.spec() == "nan:at=0|7|99,layer=head"


def test_the_default_layer_is_drawn_per_strike_among_layers_with_gradients():
    where = {s.where for s in drive("nan:p=0.3", 0).strikes}
    assert where == set(LAYERS)
    where = {s.where for s in drive("inf:p=0.3,layer=fc*", 0).strikes}
    assert where == {"fc1", "fc2"}  # a glob draws among its matches


def test_strikes_are_ordered_by_step_then_by_hook():
    plan = drive("lr_burst:at=3,steps=2+nan:at=4+poison:at=4|9", 0, steps=12)
    assert [(s.step, s.kind) for s in plan.strikes] == [
        (3, "lr_burst"),
        (4, "poison"),
        (4, "nan"),
        (4, "lr_burst"),
        (9, "poison"),
    ]


# ----- gradient faults ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_strikes_the_named_layer_at_the_step_and_nothing_else(kind):
    model = TinyNet(width=16)
    plan = faults.parse(f"{kind}:at=3,layer=fc2", seed=0)
    for step in range(6):
        clean = fixed_grads(model, seed=step)
        plan.on_gradients(step, model)
        for name, p in model.named_parameters():
            if step == 3 and name == "fc2.weight":
                bad = p.grad.view(-1)[0]
                assert math.isnan(bad) if kind == "nan" else math.isinf(bad)
                assert torch.equal(p.grad.view(-1)[1:], clean[name].view(-1)[1:])
            else:
                assert torch.equal(p.grad, clean[name]), (step, name)
    assert [(s.step, s.kind, s.where) for s in plan.strikes] == [(3, kind, "fc2")]


def test_nan_in_every_layer_with_a_star():
    model = TinyNet(width=16)
    fixed_grads(model)
    plan = faults.parse("nan:at=0,layer=*", seed=0)
    plan.on_gradients(0, model)
    for layer in LAYERS:
        assert getattr(model, layer).weight.grad.isnan().any()
    assert [s.where for s in plan.strikes] == ["*"]


def test_spike_scales_one_layer_or_all():
    model = TinyNet(width=16)
    clean = fixed_grads(model)
    plan = faults.parse("spike:at=0,layer=head,scale=1e3", seed=0)
    plan.on_gradients(0, model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, clean[name] * (1e3 if name.startswith("head") else 1.0))
    assert plan.strikes[0].detail == {"scale": 1e3}
    clean = fixed_grads(model)
    plan = faults.parse("spike:1e5,at=0,layer=*", seed=0)
    plan.on_gradients(0, model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, clean[name] * 1e5)
    assert plan.strikes[0].where == "*"


def test_a_layer_that_matches_nothing_is_a_clear_error():
    model = TinyNet(width=16)
    fixed_grads(model)
    with pytest.raises(SpecError, match=r"layer='decoder\*' matches no module.*fc1, fc2, head"):
        faults.parse("spike:at=0,layer=decoder*", seed=0).on_gradients(0, model)


def test_hooks_refuse_a_bad_step_or_model():
    plan = faults.parse("nan:at=0", seed=0)
    with pytest.raises(ConfigError, match="int >= 0"):
        plan.on_gradients(-1, TinyNet(width=16))
    with pytest.raises(ConfigError, match=r"nn\.Module"):
        plan.on_gradients(0, object())


# ----- batch, LR and AMP faults -------------------------------------------------------------------
def test_poison_scales_inputs_or_shuffles_labels_only_on_its_steps():
    x, y = batch(0)
    x0, y0 = x.clone(), y.clone()
    plan = faults.parse("poison:at=2|3,scale=1e3", seed=0)
    for step in range(5):
        px, py = plan.on_batch(step, x, y)
        assert torch.equal(px, x * 1e3 if step in (2, 3) else x) and torch.equal(py, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # the caller's batch is untouched
    plan = faults.parse("poison:shuffle,at=1", seed=0)
    for step in range(3):
        px, py = plan.on_batch(step, x, y)
        assert torch.equal(px, x)
        assert torch.equal(py, y) == (step != 1)
        assert sorted(py.tolist()) == sorted(y.tolist())  # a permutation
    assert [(s.step, s.where) for s in plan.strikes] == [(1, "labels")]


def test_poison_refuses_to_scale_token_ids():
    tokens = torch.randint(0, 10, (4, 5))
    with pytest.raises(ConfigError, match="mode=shuffle"):
        faults.parse("poison:at=0", seed=0).on_batch(0, tokens, tokens)


def test_lr_burst_multiplies_for_exactly_k_steps_and_restores_exactly():
    model = TinyNet(width=16)
    opt = torch.optim.SGD(
        [{"params": model.fc1.parameters(), "lr": 0.1}, {"params": model.head.parameters()}],
        lr=0.03,
    )
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    plan = faults.parse("lr_burst:factor=100,steps=3,at=2", seed=0)
    for step in range(7):
        base = [g["lr"] for g in opt.param_groups]
        plan.on_optimizer(step, opt)
        factor = 100 if 2 <= step < 5 else 1
        assert [g["lr"] for g in opt.param_groups] == [b * factor for b in base]
        opt.step()
        plan.after_step(step, opt)
        assert [g["lr"] for g in opt.param_groups] == base  # exactly, not approximately
        sched.step()
    assert [s.step for s in plan.strikes] == [2, 3, 4]


def test_lr_burst_never_compounds_and_keeps_a_schedulers_change():
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = faults.parse("lr_burst:factor=10,steps=5,at=0", seed=0)
    plan.on_optimizer(0, opt)
    plan.on_optimizer(1, opt)  # after_step(0) was missed: the burst is not applied on top of itself
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    opt.param_groups[0]["lr"] *= 0.5  # a scheduler stepped before after_step
    plan.after_step(1, opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_fp16_overflow_makes_the_scaler_skip_and_the_guard_report_it():
    torch.manual_seed(0)
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guard = gradguard.Guard(model, opt, "default", scaler=scaler)
    plan = faults.parse("fp16_overflow:at=2", seed=0)
    reasons, scales = [], []
    for step in range(4):
        opt.zero_grad()
        x, y = batch(step)
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        plan.on_gradients(step, model)
        before = [p.detach().clone() for p in model.parameters()]
        scales.append(scaler.get_scale())
        reasons.append(guard.step().skip_reason)
        moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        assert moved == (step != 2)  # the struck step is skipped, the others step
    assert reasons == [None, None, "amp_overflow", None]
    assert scaler.get_scale() == scales[2] / 2  # the scaler's backoff
    assert [s.step for s in plan.strikes] == [2]
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----- checkpoints --------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the scribbled legacy header
@pytest.mark.parametrize("mode", ["truncate", "garbage"])
@pytest.mark.parametrize("legacy", [False, True])
def test_corrupt_checkpoint_always_fails_to_load(tmp_path, mode, legacy):
    path = tmp_path / "ckpt.pt"
    state = {"model": TinyNet(width=16).state_dict(), "big": torch.randn(64, 64), "step": 3}
    for seed in range(8):
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        size = path.stat().st_size
        strike = faults.corrupt_checkpoint(path, mode=mode, seed=seed, step=5)
        assert (strike.step, strike.kind, strike.where) == (5, "corrupt_checkpoint", str(path))
        assert (path.stat().st_size < size) == (mode == "truncate")
        with pytest.raises(Exception):  # noqa: B017 (torch raises several types for a bad file)
            torch.load(path, weights_only=True)


def test_corrupt_checkpoint_is_deterministic_and_checks_its_mode(tmp_path):
    def damaged(seed):
        path = tmp_path / f"{seed}.pt"
        torch.save(TinyNet(width=16).state_dict(), path)
        faults.corrupt_checkpoint(path, mode="garbage", seed=seed)
        return path.read_bytes()

    torch.manual_seed(0)
    a = damaged(1)
    torch.manual_seed(0)
    assert damaged(1) == a
    torch.manual_seed(0)
    assert damaged(2) != a
    with pytest.raises(SpecError, match="truncate, garbage"):
        faults.corrupt_checkpoint(tmp_path / "1.pt", mode="shred")


# ----- end to end ---------------------------------------------------------------------------------
def train(spec, guarded, steps=40):
    torch.manual_seed(0)
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = gradguard.Guard(model, opt, "default") if guarded else None
    plan = faults.parse(spec, seed=0)
    losses = []
    for step in range(steps):
        x, y = plan.on_batch(step, *batch(step % 8))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        plan.on_gradients(step, model)
        plan.on_optimizer(step, opt)
        if guard is not None:
            guard.step(loss=loss)
        else:
            opt.step()
        plan.after_step(step, opt)
        losses.append(float(loss.detach()))
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    return finite, losses, plan.strikes


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
    ok, losses, strikes = train(spec, guarded=True)
    assert ok and [(s.step, s.kind) for s in strikes] == [(20, spec.split(":")[0])]
    assert math.isfinite(losses[-1]) and losses[-1] < 0.5 * losses[0]
    harmed_finite, harmed_losses, harmed_strikes = train(spec, guarded=False)
    assert harmed_strikes == strikes
    tail = harmed_losses[-5:]
    # Harmed: weights non-finite, or the loss non-finite or far above the guarded run's.
    assert not harmed_finite or not all(map(math.isfinite, tail)) or min(tail) > 2 * losses[-1]
    if spec.startswith(("nan", "inf")):
        assert not harmed_finite  # a NaN/Inf step reaches every weight it touches


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        "nan:p=0.02",
        pytest.param(
            "spike:p=0.02,scale=1e4",
            # Not strict: a chaotic 200-step run at the machine's thread count; the margin (1.1
            # points) is recorded in docs/reliability.md, not relied on to the last bit here.
            marks=pytest.mark.xfail(
                strict=False,
                reason="known shortfall of the default (issue 14): two of the four 1e4 spikes fall "
                "within 50 steps, lr_backoff halves the LR for the rest of this 200-step run, and "
                "it ends at 0.932 against 0.953 clean (without lr_backoff 0.967; default_v1 0.938 "
                "against its own clean 0.920). lr_backoff:events=3 fixes this case but loses the "
                "quick suite's LR 0.1 and 0.3 (0.61 and 0.49 against 0.94 and 0.86); so does "
                "lr_backoff:loss_z=3 (a spike counts only with its loss above its trend: 0.955), "
                "which loses the quick suite's LR 0.1 (0.884 against 0.933 over 10 seeds)",
            ),
        ),
    ],
)
def test_the_default_guard_keeps_accuracy_within_a_point_of_the_clean_run(spec):
    def accuracy(fault_spec):
        torch.manual_seed(0)
        model = TinyNet(width=16)
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


# ----- logit_drift --------------------------------------------------------------------------------
class BiasFreeHead(nn.Module):
    """A LayerNorm then a bias-free head, as a GPT ends."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.LayerNorm(16))
        self.head = nn.Linear(16, 5, bias=False)

    def forward(self, x):
        return self.head(self.body(x))


def _drifted(model, spec, steps):
    """Run ``steps`` struck steps of ``spec`` (forward, backward, hook, no optimizer): the logits
    of a fixed batch before and after, and the plan."""
    plan = faults.parse(spec, seed=0)
    x, _ = batch(0)
    with torch.no_grad():
        before = model(x)
    for step in range(steps):
        model.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        plan.on_gradients(step, model)
    with torch.no_grad():
        after = model(x)
    return before, after, plan


@pytest.mark.parametrize(("direction", "sign"), [("down", -1.0), ("up", 1.0)])
def test_logit_drift_moves_every_logit_of_a_biased_head_by_rate_and_no_probability(direction, sign):
    torch.manual_seed(0)
    model = TinyNet(width=16)
    before, after, plan = _drifted(model, f"logit_drift:rate=0.25,direction={direction},p=1", 8)
    assert torch.allclose(after - before, torch.full_like(before, sign * 2.0), atol=1e-5)
    assert torch.allclose(after.softmax(-1), before.softmax(-1), atol=1e-6)  # the loss is blind
    assert [(s.step, s.where) for s in plan.strikes] == [(i, "head") for i in range(8)]


def test_logit_drift_moves_a_bias_free_heads_rows_along_its_mean_input():
    torch.manual_seed(0)
    model = BiasFreeHead()
    before, after, plan = _drifted(model, "logit_drift:rate=0.5,p=1", 9)
    # the first strike only hooks the head (no forward seen yet): 8 moves of 0.5
    assert [s.step for s in plan.strikes] == list(range(1, 9))
    moved = after - before
    # every logit of a row moved by the same amount: no probability changed ...
    assert torch.allclose(moved, moved[:, :1].expand_as(moved), atol=1e-4)
    assert torch.allclose(after.softmax(-1), before.softmax(-1), atol=1e-5)
    # ... and the batch's mean logit by rate a strike (its inputs are the mean's direction)
    assert float(moved.mean()) == pytest.approx(-4.0, rel=1e-4)


def test_logit_drift_names_its_layer_or_says_how():
    with pytest.raises(faults.FaultSpecError, match=r"no nn\.Linear; name the output layer"):
        faults.parse("logit_drift:p=1").on_gradients(0, nn.Sequential(nn.Conv1d(2, 2, 1)))
    with pytest.raises(faults.FaultSpecError, match=r"layer='nope' matches no nn\.Linear"):
        faults.parse("logit_drift:p=1,layer=nope").on_gradients(0, TinyNet(width=4))
    model = TinyNet(width=4)
    plan = faults.parse("logit_drift:rate=1,p=1,layer=fc1")
    head_bias = model.head.bias.detach().clone()
    plan.on_gradients(0, model)
    assert torch.equal(model.head.bias, head_bias) and plan.strikes[0].where == "fc1"
