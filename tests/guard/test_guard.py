"""The Guard's own guarantees: skips leave everything bit-identical, resume is exact, AMP and
gradient accumulation are handled, the LR scale does not leak, bad input is refused clearly."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from torch import nn

import gradguard
from gradguard import ConfigError

from tests.helpers import TinyNet, assert_same, data, set_grads, snapshot, train_step

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw_fused_off": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_step_is_skipped_bit_identically(opt_name, bad):
    torch.manual_seed(0)
    model = TinyNet()
    opt = OPTIMIZERS[opt_name](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    guard = gradguard.Guard(model, opt, "default")
    for step in range(5):
        train_step(model, opt, *data(step))
        guard.step()
        sched.step()
    before = snapshot(model, opt)
    lr_before = [g["lr"] for g in opt.param_groups]
    loss = train_step(model, opt, *data(99))
    model.fc2.weight.grad[0, 0] = bad
    report = guard.step(loss=loss)
    assert report.skipped and report.skip_reason == "nonfinite_grad"
    # lr_backoff may count the skip as its second incident and cut (a scale for later steps)
    assert report.actions[0] == "skip_nonfinite"
    assert set(report.actions) <= {"skip_nonfinite", "lr_backoff"}
    assert report.layers["skip_nonfinite"] == ("fc2",)
    assert_same(before, snapshot(model, opt))
    assert [g["lr"] for g in opt.param_groups] == lr_before
    assert sched.last_epoch == 5
    assert all(p.grad is None for p in model.parameters())
    assert guard.counters["skipped"] == 1


def test_nonfinite_loss_is_skipped():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters())
    guard = gradguard.Guard(model, opt)
    train_step(model, opt, *data(0))
    before = snapshot(model, opt)
    report = guard.step(loss=torch.tensor(float("nan")))
    assert report.skipped and report.skip_reason == "nonfinite_loss"
    assert_same(before, snapshot(model, opt))


def test_without_a_guard_the_same_nan_corrupts_the_weights():
    """The control for the test above: the fault is real."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters())
    train_step(model, opt, *data(0))
    model.fc2.weight.grad[0, 0] = float("nan")
    opt.step()
    assert not torch.isfinite(model.fc2.weight).all()


def test_report_fields_and_counters():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = gradguard.Guard(model, opt, "clip_norm:1.0", layer_stats=True)
    set_grads(model, 0, scale=10.0)
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    r = guard.step()
    assert r.step == 0 and not r.skipped
    assert r.grad_norm == pytest.approx(expected)
    assert r.grad_norm_after == pytest.approx(1.0, rel=1e-5)
    assert r.actions == ("clip_norm",) and r.clipped
    assert set(r.layer_norms) == {"fc1", "fc2", "head"}
    assert math.sqrt(sum(v * v for v in r.layer_norms.values())) == pytest.approx(
        expected, rel=1e-5
    )
    set_grads(model, 1, scale=1e-3)
    r = guard.step()
    assert r.actions == () and not r.clipped
    assert guard.counters == {
        "steps": 2,
        "skipped": 0,
        "rolled_back": 0,
        "amp_overflow": 0,
        "clipped": 1,
        "acted.clip_norm": 1,
    }
    d = r.as_dict()
    assert d["step"] == 1 and d["actions"] == []


def test_calling_step_twice_on_the_same_gradients_is_refused():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, "zclip")
    train_step(model, opt, *data(0))
    guard.step()
    after_first = snapshot(model, opt)
    with pytest.warns(UserWarning, match="same gradients"):
        r = guard.step()
    assert r.skipped and r.skip_reason == "stale_grads"
    assert_same(after_first, snapshot(model, opt))
    # ZClip saw exactly one norm (ZClip#16: a second call corrupts the reference's statistics).
    assert len(guard.policies[1].state_dict()["buffer"]) == 1
    # A real new backward (even into the same grad tensors) is a new step.
    model(data(1)[0]).sum().backward()
    assert not guard.step().skipped


def test_gradient_accumulation_acts_once_on_the_summed_gradient():
    torch.manual_seed(0)
    model = TinyNet()
    ref = TinyNet()
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, "clip_norm:0.1")
    for step in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        for micro in range(4):
            x, y = data(10 * step + micro)
            (nn.functional.cross_entropy(model(x), y) / 4).backward()
            (nn.functional.cross_entropy(ref(x), y) / 4).backward()
        guard.step()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert guard.counters["steps"] == 3


def test_amp_overflow_is_the_scalers_skip_not_counted_twice():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    guard = gradguard.Guard(model, opt, "default", scaler=scaler)
    x, y = data(0)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    unscaled = [p.grad / 2.0**10 for p in model.parameters()]
    expected_norm = torch.nn.utils.get_total_norm(unscaled).item()
    r = guard.step()
    assert not r.skipped
    assert r.grad_norm == pytest.approx(expected_norm, rel=1e-5)  # measured after unscaling
    opt.zero_grad()
    before = snapshot(model, opt)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    model.fc1.weight.grad[0, 0] = float("inf")  # what an fp16 overflow leaves behind
    r = guard.step()
    assert r.skipped and r.skip_reason == "amp_overflow"
    assert scaler.get_scale() == 2.0**9  # the scaler backed off
    assert_same(before, snapshot(model, opt))
    c = guard.counters
    assert c["amp_overflow"] == 1 and c["skipped"] == 0 and "acted.skip_nonfinite" not in c


@pytest.mark.parametrize(
    "spec", ["rollback+lr_backoff:events=1", "skip_spike:window=4,warmup=2", "clip_norm"]
)
def test_amp_overflow_is_no_incident_for_any_policy(spec):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    guard = gradguard.Guard(model, opt, spec, scaler=scaler, check_finite=False)
    reasons = []
    for step in range(6):
        opt.zero_grad()
        x, y = data(step)
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if step == 4:
            model.fc1.weight.grad[0, 0] = float("inf")
        reasons.append(guard.step().skip_reason)
    assert reasons == [None] * 4 + ["amp_overflow", None]
    c = guard.counters
    assert c["amp_overflow"] == 1 and c["skipped"] == 0 and c["rolled_back"] == 0
    assert not any(k.startswith("acted.") and v for k, v in c.items() if k != "acted.clip_norm")


def test_user_may_unscale_first():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    guard = gradguard.Guard(model, opt, "clip_norm:1", scaler=scaler)
    x, y = data(0)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    assert not guard.step().skipped


def test_bf16_grads_are_guarded():
    torch.manual_seed(0)
    model = TinyNet().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, "default")
    x, y = data(0)
    nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
    assert not guard.step().skipped
    model(x.bfloat16()).sum().backward()
    model.head.bias.grad[0] = float("nan")
    r = guard.step()
    assert r.skipped and r.layers["skip_nonfinite"] == ("head",)


def test_params_without_grads_are_fine():
    torch.manual_seed(0)
    model = TinyNet()
    frozen = nn.Linear(3, 3)  # in the optimizer, never used
    opt = torch.optim.Adam([*model.parameters(), *frozen.parameters()])
    guard = gradguard.Guard(model, opt, "skip_nonfinite+agc+zclip+reset_moments")
    for step in range(30):
        train_step(model, opt, *data(step))
        assert not guard.step().skipped
    assert all(p.grad is None for p in frozen.parameters())


CHAINS = [
    "default",
    "skip_nonfinite+autoclip:10",
    "clip_layerwise:factor=2,warmup=3+agc:0.05",
    "skip_spike:window=8+reset_moments:warmup=3+lr_backoff:events=1",
    "zclip:warmup=5+rollback:every=7+lr_backoff:events=1,window=5,recover=10",
]


def run_steps(model, opt, guard, start, stop, fault_steps=(37, 63, 71)):
    out = []
    for step in range(start, stop):
        loss = train_step(model, opt, *data(step))
        if step in fault_steps:
            model.fc1.weight.grad.mul_(1e4 if step != 63 else float("nan"))
        out.append(json.dumps(guard.step(loss=loss).as_dict(), sort_keys=True))  # NaN-safe equality
    return out


@pytest.mark.parametrize("spec", CHAINS)
def test_resume_from_a_checkpoint_is_exact(spec, tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gradguard.Guard(model, opt, spec)
    full = run_steps(model, opt, guard, 0, 100)
    final = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gradguard.Guard(model, opt, spec)
    first = run_steps(model, opt, guard, 0, 50)
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()},
        tmp_path / "ck.pt",
    )

    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    model = TinyNet()
    model.load_state_dict(ck["model"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.load_state_dict(ck["opt"])
    guard = gradguard.Guard(model, opt, spec)
    guard.load_state_dict(ck["guard"])
    second = run_steps(model, opt, guard, 50, 100)
    assert first + second == full
    for a, b in zip(model.parameters(), final, strict=True):
        assert torch.equal(a, b)


def test_loading_another_chains_state_is_refused():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = gradguard.Guard(model, opt, "zclip").state_dict()
    with pytest.raises(ConfigError, match="saved Guard ran the chain skip_nonfinite\\+zclip"):
        gradguard.Guard(model, opt, "autoclip").load_state_dict(state)
    with pytest.raises(ConfigError, match="not a Guard state dict"):
        gradguard.Guard(model, opt, "zclip").load_state_dict({"model": 1})


def test_bad_arguments_are_refused_clearly():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"needs a torch\.optim\.Optimizer"):
        gradguard.Guard(model, model.parameters())
    with pytest.raises(ConfigError, match=r"must be the nn\.Module"):
        gradguard.Guard(opt, opt)
    guard = gradguard.Guard(model, opt)
    train_step(model, opt, *data(0))
    with pytest.raises(ConfigError, match="scalar tensor"):
        guard.step(loss=torch.ones(3))
    with pytest.raises(ConfigError, match="tensor or a number"):
        guard.step(loss="0.5")


def test_check_finite_false_leaves_a_sync_free_chain():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, "clip_norm+zclip+autoclip", check_finite=False)
    assert [p.name for p in guard.policies] == ["clip_norm", "zclip", "autoclip"]
    assert not guard._needs_host
    default = gradguard.Guard(model, opt, "zclip")
    assert [p.name for p in default.policies] == ["skip_nonfinite", "zclip"]


def test_state_dict_loads_with_weights_only():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, "default+autoclip+rollback")
    for step in range(30):
        train_step(model, opt, *data(step))
        guard.step()
    buf = io.BytesIO()
    torch.save(guard.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["step"] == 30
