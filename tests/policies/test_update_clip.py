"""update_clip: the update measured from the weights (against the update computed here from
copies of the weights), the per-layer bound applied exactly, and when it measures exactly."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

import gradguard
from gradguard.errors import IntegrityError
from gradguard.layout import ParamLayout
from gradguard.updates import UpdateProbe


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )


def batch(step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(32, 20, generator=gen), torch.randint(0, 5, (32,), generator=gen)


def backward(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    for p in model.parameters():
        p.grad = None
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def layer_ratios(before: list[torch.Tensor], model: nn.Module) -> list[float]:
    """The reference: per Linear layer, ||w_new - w_old|| / ||w_old|| over its weight and bias."""
    params = list(model.parameters())
    out = []
    for i in range(0, len(params), 2):
        d = sum(float((params[k].detach() - before[k]).double().square().sum()) for k in (i, i + 1))
        w = sum(float(before[k].double().square().sum()) for k in (i, i + 1))
        out.append(math.sqrt(d / w))
    return out


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_measured_update_is_the_weights_change(name, check):
    model = net()
    opt = OPTIMIZERS[name](model.parameters())
    probe = UpdateProbe(ParamLayout.build(model, opt), samples=256)
    for step in range(6):
        backward(model, step)
        before = [p.detach().clone() for p in model.parameters()]
        mode = "exact" if step % 2 == 0 else "sample"
        probe.before(mode, check=check)  # unchecked: sampled steps estimate ||w|| from the sample
        opt.step()
        got = probe.after()
        want = layer_ratios(before, model)
        assert got.exact == (mode == "exact") and got.finite
        # Exact to float32 rounding; a sample of 256 of 1280 or 4096 elements to a few percent.
        tol = 1e-5 if mode == "exact" else 0.15  # float32 norms
        assert list(got.ratio) == pytest.approx(want, rel=tol), (name, step, mode)


def test_an_lr_burst_is_bounded_per_layer_exactly():
    """SGD without momentum: the applied update must be s_l * (-lr g) with s_l = cap / ratio."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # mode=exact: the history holds exact ratios (sampled ones are estimates), as the twin here
    guard = gradguard.Guard(model, opt, "update_clip:factor=3,mode=exact")
    history: list[list[float]] = []
    for step in range(40):
        burst = 30 <= step < 35
        opt.param_groups[0]["lr"] = 5.0 if burst else 0.05
        backward(model, step)
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        report = guard.step()
        got = layer_ratios(before, model)
        if not burst:
            history.append(got)
            assert "update_clip" not in report.actions, step
            continue
        assert report.metrics["update_clip.exact"] == 1.0
        params = list(model.parameters())
        for layer in range(3):
            level = math.exp(statistics.median(math.log(h[layer]) for h in history[-32:]))
            cap = min(3 * level, 0.03)  # max_ratio
            full = (
                5.0
                * math.sqrt(
                    sum(float(grads[k].double().square().sum()) for k in (2 * layer, 2 * layer + 1))
                )
                / math.sqrt(
                    sum(
                        float(before[k].double().square().sum()) for k in (2 * layer, 2 * layer + 1)
                    )
                )
            )
            s = min(1.0, cap / full)
            # float32 weights: an update of ~1e-3 of them is rounded to ~1e-4 of itself
            assert got[layer] == pytest.approx(min(full, cap), rel=1e-3), (step, layer)
            for k in (2 * layer, 2 * layer + 1):
                torch.testing.assert_close(
                    params[k].detach(), before[k] - s * 5.0 * grads[k], rtol=1e-5, atol=1e-6
                )
        history.append([min(g, 1e9) for g in got])


def test_the_first_step_is_bounded_before_any_history():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=1e3)  # a catastrophic first step
    guard = gradguard.Guard(model, opt, "update_clip:max_ratio=0.5")
    backward(model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    report = guard.step()
    assert "update_clip" in report.actions
    assert max(layer_ratios(before, model)) == pytest.approx(0.5, rel=1e-5)


def test_an_adam_blow_up_with_normal_gradients_is_caught():
    """Second moments shrunk to ~0 (as after a long run of tiny gradients): the gradient norm
    is normal, the update is not. Auto mode measures by sample, reports the miss, then bounds
    the following steps exactly."""
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gradguard.Guard(model, opt, "update_clip:warmup=5,hold=10")
    for step in range(30):
        backward(model, step)
        guard.step()
    for p in model.parameters():
        opt.state[p]["exp_avg_sq"].mul_(1e-12)
    reports = []
    ratios = []
    for step in range(30, 34):
        backward(model, step)
        before = [p.detach().clone() for p in model.parameters()]
        reports.append(guard.step())
        ratios.append(max(layer_ratios(before, model)))
    assert reports[0].metrics["update_clip.missed"] == 1.0  # sampled, too late to undo
    assert reports[0].metrics["update_clip.exact"] == 0.0
    assert "update_clip" in reports[1].actions  # the next step: measured exactly, bounded
    # ...and its first moment scaled with it: the steps after it stay within the bound on
    # their own, while the second moments are still ~0.
    for r in reports[1:]:
        assert r.metrics["update_clip.exact"] == 1.0
    assert max(ratios[1:]) <= 0.03 * 1.0001
    assert max(ratios[1:]) < ratios[0] / 10


def test_a_zero_initialized_layer_is_not_bounded():
    model = net()
    with torch.no_grad():
        model[4].weight.zero_()
        model[4].bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard = gradguard.Guard(model, opt, "update_clip:max_ratio=0.01")
    backward(model, 0)
    guard.step()
    assert float(model[4].weight.detach().abs().sum()) > 0  # it learned from zero
    assert guard.state_dict()["policies"][-1]["state"]["history"][2][0] != 0  # NaN: no entry


def test_the_framework_path_is_bounded_too():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=1e3)
    guard = gradguard.Guard(model, opt, "update_clip:max_ratio=0.5")
    backward(model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    pending = guard.before_step()
    opt.step()  # the framework's step
    report = guard.after_step(pending)
    assert "update_clip" in report.actions
    assert max(layer_ratios(before, model)) == pytest.approx(0.5, rel=1e-5)


def test_the_measurement_is_the_weight_integrity_check():
    class NaNWriter(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[3] = math.nan

    model = net()
    guard = gradguard.Guard(model, NaNWriter(model.parameters(), lr=0.1), "default")
    backward(model, 0)
    with pytest.raises(IntegrityError, match=r"overflowed|non-finite|NaN"):
        guard.step()


def test_state_round_trips_and_resumes_exactly():
    def run(steps, state=None):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        guard = gradguard.Guard(model, opt, "update_clip:factor=2,window=4")
        if state is not None:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
            guard.load_state_dict(state[2])
        out = []
        for step in steps:
            opt.param_groups[0]["lr"] = 1.0 if step in (12, 13) else 0.05
            backward(model, step)
            out.append(guard.step().metrics)
        return out, (model.state_dict(), opt.state_dict(), guard.state_dict())

    whole, _ = run(range(16))
    first, saved = run(range(8))
    rest, _ = run(range(8, 16), saved)
    assert first + rest == whole


@pytest.mark.parametrize(
    "spec",
    [
        "update_clip:factor=1",
        "update_clip:max_ratio=0",
        "update_clip:mode=fast",
        "update_clip:window=0",
    ],
)
def test_bad_parameters_are_refused(spec):
    with pytest.raises(gradguard.SpecError):
        gradguard.policies.parse_spec(spec)


def test_auto_mode_measures_an_lr_jump_exactly():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gradguard.Guard(model, opt, "update_clip:warmup=3")
    exact = []
    for step in range(20):
        opt.param_groups[0]["lr"] = 5.0 if step == 12 else 0.05
        backward(model, step)
        exact.append(guard.step().metrics["update_clip.exact"])
    assert exact[:3] == [1.0] * 3 and exact[3:12] == [0.0] * 9  # warmup, then sampled
    assert exact[12] == 1.0  # the jump: exact, so bounded


def test_the_row_median_is_numpys_nanmedian():
    import warnings

    import numpy as np

    from gradguard.policies.update import _row_medians

    rng = np.random.default_rng(0)
    for _ in range(100):
        h = rng.normal(size=(6, 8))
        h[rng.random(h.shape) < 0.4] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an all-NaN row
            want = np.nanmedian(h, axis=1)
        np.testing.assert_allclose(_row_medians(h), want, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sampled_and_exact_measurements_agree_across_dtypes(dtype):
    model = net().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = UpdateProbe(ParamLayout.build(model, opt), samples=4096)  # every element sampled
    x, y = batch(0)
    nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    probe.before("sample")
    opt.step()
    got = probe.after()
    want = [
        math.sqrt(
            sum(float((p.detach().double() - b.double()).square().sum()) for p, b in pair)
            / sum(float(b.double().square().sum()) for _, b in pair)
        )
        for pair in zip(
            *[iter(list(zip(model.parameters(), before, strict=True)))] * 2, strict=True
        )
    ]
    assert list(got.ratio) == pytest.approx(want, rel=1e-5)


FIRST_MOMENT = {
    "momentum": (lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9), "momentum_buffer"),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=0.1), "exp_avg"),
}


@pytest.mark.parametrize("moments", [True, False], ids=["moments", "no-moments"])
@pytest.mark.parametrize("name", list(FIRST_MOMENT))
def test_a_bounded_step_scales_the_first_moment_with_it(name, moments):
    """Against the same optimizer stepped alone: the bounded layers' weights move ``s`` times its
    update and (moments=true) their first-moment buffers hold ``s`` times its buffer; the second
    moments are the optimizer's own."""
    make, key = FIRST_MOMENT[name]
    ref_model, model = net(), net()
    ref_opt, opt = make(ref_model.parameters()), make(model.parameters())
    flag = "true" if moments else "false"
    guard = gradguard.Guard(model, opt, f"update_clip:mode=exact,max_ratio=0.01,moments={flag}")
    backward(ref_model, 0)
    backward(model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    ref_opt.step()
    report = guard.step()
    assert "update_clip" in report.actions
    full = layer_ratios(before, ref_model)
    ref, got = list(ref_model.parameters()), list(model.parameters())
    for layer in range(3):
        s = min(1.0, 0.01 / full[layer])
        assert s < 1.0, layer  # every layer is over the bound at these LRs
        for k in (2 * layer, 2 * layer + 1):
            want = before[k] + s * (ref[k].detach() - before[k])
            torch.testing.assert_close(got[k].detach(), want, rtol=1e-5, atol=1e-7)
            buf, ref_buf = opt.state[got[k]][key], ref_opt.state[ref[k]][key]
            torch.testing.assert_close(buf, s * ref_buf if moments else ref_buf)
            if name == "adam":
                torch.testing.assert_close(
                    opt.state[got[k]]["exp_avg_sq"], ref_opt.state[ref[k]]["exp_avg_sq"]
                )


def test_the_next_momentum_step_builds_on_the_step_taken():
    """SGD with momentum: after a bounded first step (buffer ``s g0``), the second update is
    ``lr (mu s g0 + g1)``, what the optimizer would take had its first step been ``s`` times its
    own."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    guard = gradguard.Guard(model, opt, "update_clip:mode=exact,max_ratio=0.01,factor=1e6")
    backward(model, 0)
    g0 = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    guard.step()
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    scales = [float(b.flatten()[0] / g.flatten()[0]) for b, g in zip(bufs, g0, strict=True)]
    for s, b, g in zip(scales, bufs, g0, strict=True):
        assert 0 < s < 1
        torch.testing.assert_close(b, s * g)
    # The second step: the bound (0.01, factor 1e6 keeps the level out of it) no longer binds
    # once the LR is small.
    opt.param_groups[0]["lr"] = 1e-4
    backward(model, 1)
    g1 = [p.grad.clone() for p in model.parameters()]
    mid = [p.detach().clone() for p in model.parameters()]
    assert "update_clip" not in guard.step().actions
    for p, m, b, g in zip(model.parameters(), mid, bufs, g1, strict=True):
        torch.testing.assert_close(p.detach(), m - 1e-4 * (0.9 * b + g))
    assert all(
        not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True)
    )


def _bound_run(spec: str, lr: float, steps: int = 40, losses=None) -> list:
    """``losses``: the loss given to each step (the Guard takes it as the caller's); none given,
    the Guard gets no loss."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    guard = gradguard.Guard(model, opt, spec)
    out = []
    for step in range(steps):
        backward(model, step)
        loss = None if losses is None else torch.tensor(losses[step])
        out.append(guard.step(loss=loss))
    return out


def _unstable_steps(reports) -> list[int]:
    return [i for i, r in enumerate(reports) if r.metrics.get("update_clip.unstable") == 1.0]


def test_a_bound_that_keeps_binding_is_an_incident_for_lr_backoff():
    """persist=8 of 16: with every step over the bound, the 9th and 17th steps are incidents
    (the count starts afresh after each); lr_backoff (2 incidents in its window) halves the LR at
    the second one."""
    reports = _bound_run("update_clip:mode=exact+lr_backoff", lr=5.0, steps=30)
    assert all("update_clip" in r.actions for r in reports)  # every step bounded
    assert _unstable_steps(reports) == [8, 16, 24]
    scales = [r.lr_scale for r in reports]
    assert scales[:16] == [1.0] * 16 and scales[16] == 0.5
    assert scales[24] == 0.5  # one more incident: the count after a cut starts afresh


def test_bounded_steps_that_bring_the_loss_down_are_not_an_incident():
    """The same bound binding on every step: with a falling loss (later half's median below the
    earlier half's) no incident; with a flat or rising loss, one every 8 bounded steps."""
    rng = torch.Generator().manual_seed(0)
    noise = (0.05 * torch.randn(40, generator=rng)).tolist()
    falling = [2.0 * 0.97**i + n for i, n in enumerate(noise)]
    flat = [2.0 + n for n in noise]
    rising = [2.0 * 1.02**i + n for i, n in enumerate(noise)]
    spec = "update_clip:mode=exact+lr_backoff"
    reports = _bound_run(spec, lr=5.0, steps=40, losses=falling)
    assert all("update_clip" in r.actions for r in reports)
    assert _unstable_steps(reports) == []
    assert all(r.lr_scale == 1.0 for r in reports)
    for losses in (flat, rising):
        reports = _bound_run(spec, lr=5.0, steps=40, losses=losses)
        assert _unstable_steps(reports) == [8, 16, 24, 32], losses[:3]
        assert reports[16].lr_scale == 0.5


def test_the_progress_test_is_the_halves_median():
    from gradguard.policies.update import _improving

    assert not _improving([3.0, 2.0, 1.0])  # fewer than 8: no evidence
    assert _improving([5, 5, 5, 5, 4, 4, 4, 4])
    assert not _improving([4, 4, 4, 4, 4, 4, 4, 4])
    # One wild loss in the later half does not hide the progress (a median, not a mean).
    assert _improving([5, 5, 5, 5, 4, 4, 4, 400])
    # An odd count: the middle value belongs to neither half.
    assert _improving([9, 9, 9, 9, 100, 1, 1, 1, 1])


def test_persistence_is_off_at_zero_and_quiet_on_a_healthy_run():
    off = _bound_run("update_clip:mode=exact,persist=0+lr_backoff", lr=5.0, steps=20)
    assert all(r.lr_scale == 1.0 and "update_clip.unstable" not in r.metrics for r in off)
    healthy = _bound_run("update_clip+lr_backoff", lr=0.05, steps=40)
    assert all(r.lr_scale == 1.0 and "update_clip.unstable" not in r.metrics for r in healthy)


@pytest.mark.parametrize(
    "change",
    [
        {"bound_at": [1, 2, 99]},  # a step after `steps`
        {"bound_at": [-1]},
        {"bound_at": "3"},
        {"unstable": 1},
    ],
)
def test_a_bad_persistence_state_is_refused(change):
    model = net()
    guard = gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), "update_clip")
    (policy,) = [p for p in guard.policies if p.name == "update_clip"]
    state = policy.state_dict()
    state["steps"] = 10
    policy.check_state(state)  # the state as saved loads
    state.update(change)
    with pytest.raises(gradguard.ConfigError, match="update_clip"):
        policy.check_state(state)
