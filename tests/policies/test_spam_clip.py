"""spam_clip against pytorch-optimizer's ``SPAM`` (4.1.0), against a readable twin of its rule
written here, its resume (stateless: the optimizer's state is all it reads), its parameters and
the optimizers it refuses."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import gradguard
from gradguard import ConfigError, SpecError
from gradguard.policies import parse_spec

#: Steps of the runs below and the warmup (SPAM's grad_accu_steps): most steps are past it.
STEPS, WARMUP = 40, 5
#: Steps (1-based, as SPAM counts) whose gradient gets a few entries 1e3 times too large: one in
#: the warmup (not clipped), one on its first clipped step, two after.
SPIKES = (3, 5, 12, 25)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def set_grads(m: nn.Module, step: int) -> None:
    """A fixed random gradient per step (no entry exactly 0: both runs use ``eps=0``), with spikes."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(m.parameters()):
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if step in SPIKES:
            g.view(-1)[(step + i) % g.numel()] *= 1e3
        p.grad = g


def twin(g: torch.Tensor, v: torch.Tensor, opt_step: int | None, theta: float, warmup: int):
    """The rule, entry by entry: with ``v`` the optimizer's raw ``exp_avg_sq`` before the step (None:
    the parameter's first step) and ``opt_step`` its step count before the step, an entry with
    ``g^2 > theta * v`` and ``v > 0`` becomes ``sign(g) * sqrt(theta * v``), from the parameter's
    ``warmup``-th step on (``opt_step >= warmup - 1``)."""
    out = g.clone()
    if v is None or (opt_step is not None and opt_step < warmup - 1):
        return out
    flat, vf = out.view(-1), v.reshape(-1)
    for i in range(flat.numel()):
        gi, vi = flat[i].item(), vf[i].item()
        if vi > 0 and gi * gi > theta * vi:
            flat[i] = math.copysign(math.sqrt(theta * vi), gi)
    return out


# ----- (a) against the package -------------------------------------------------------------------
@pytest.mark.parametrize("theta", [5000.0, 2.0])
@pytest.mark.parametrize("foreach", [False, True])
def test_takes_spams_steps(theta, foreach):
    """Adam(eps=0) under spam_clip == pytorch_optimizer.SPAM(eps=0, weight_decay=0) with no
    momentum reset in the run (update_proj_gap > STEPS; its LR ramp is then inactive too) and a
    full density; theta=2 binds on most steps past the warmup, so the step it starts on is tested,
    theta=5000 (the default) on the spikes only."""
    po = pytest.importorskip("pytorch_optimizer")
    ours, ref = model(), model()
    guard = gradguard.Guard(
        ours,
        torch.optim.Adam(ours.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=0.0),
        f"spam_clip:theta={theta},warmup={WARMUP}",
    )
    spam = po.SPAM(
        ref.parameters(),
        lr=1e-2,
        betas=(0.9, 0.999),
        eps=0.0,
        weight_decay=0.0,
        threshold=theta,
        grad_accu_steps=WARMUP,
        update_proj_gap=10 * STEPS,
        density=1.0,
        foreach=foreach,
    )
    acted = []
    for step in range(1, STEPS + 1):
        set_grads(ours, step)
        set_grads(ref, step)
        acted.append("spam_clip" in guard.step().actions)
        spam.step()
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"step {step}")
    assert not any(acted[: WARMUP - 1])  # SPAM's steps 1..warmup-1: no clip
    assert all(acted[s - 1] for s in SPIKES if s >= WARMUP)  # the clip bound on every spike after
    if theta == 2.0:
        assert acted[WARMUP - 1]  # and from the warmup-th step on


def test_the_clip_binds_in_spam_too():
    """The run above is not vacuous: without the clip SPAM's weights differ."""
    po = pytest.importorskip("pytorch_optimizer")
    a, b = model(), model()
    kw = dict(lr=1e-2, eps=0.0, grad_accu_steps=WARMUP, update_proj_gap=10 * STEPS)
    sa, sb = po.SPAM(a.parameters(), **kw), po.SPAM(b.parameters(), threshold=0, **kw)
    for step in range(1, 13):
        set_grads(a, step)
        set_grads(b, step)
        sa.step()
        sb.step()
    assert not torch.allclose(a[0].weight, b[0].weight, rtol=1e-6)


# ----- (b) the twin ------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["Adam", "AdamW", "NAdam", "RAdam"])
def test_each_step_is_the_twins(opt):
    """Every step's clipped gradients against the twin, on the optimizer's own state before the
    step; one entry's gradient is exactly 0 for the first steps, so its v is 0 and it is left alone
    (SPAM would zero it for good)."""
    m = model()
    optim = getattr(torch.optim, opt)(m.parameters(), lr=1e-3)
    guard = gradguard.Guard(m, optim, "spam_clip:theta=3,warmup=4")
    params = list(m.parameters())
    n_clipped = 0
    for step in range(1, 16):
        set_grads(m, step)
        if step < 8:
            params[0].grad[0, 0] = 0.0
        if step >= 8:
            params[0].grad[0, 0] = 5.0
        before = []
        for p in params:
            st = optim.state.get(p)
            v = st["exp_avg_sq"].clone() if st else None
            k = int(st["step"]) if st else None
            before.append(twin(p.grad, v, k, 3.0, 4))
        report = guard.step()
        for p, want in zip(params, before, strict=True):
            # sqrt and products as torch computes them: at most an ulp apart
            torch.testing.assert_close(p.grad, want, rtol=1e-15, atol=0)
        n_clipped += int(report.metrics.get("spam_clip.clipped", 0))
        if step == 8:  # v == 0 there: the entry's 5.0 is not clipped
            assert params[0].grad[0, 0] == 5.0
    assert n_clipped > 0


def test_metrics_count_the_clipped_entries():
    m = model()
    guard = gradguard.Guard(m, torch.optim.Adam(m.parameters()), "spam_clip:theta=5000,warmup=2")
    for step in range(1, 5):
        set_grads(m, step)
        if step == 4:
            m[0].weight.grad[1, 2] = 1e6
            m[2].bias.grad[0] = -1e6
        ctx_report = guard.step()
    assert ctx_report.actions == ("spam_clip",)
    assert int(ctx_report.metrics["spam_clip.clipped"]) >= 2
    assert m[0].weight.grad[1, 2] < 1e6 and m[2].bias.grad[0] > -1e6


def test_reset_moments_restarts_the_warmup():
    """reset_moments:every=N (reset_step=True, the default) restarts Adam's step count: the clip
    pauses for warmup-1 steps, the reset step included."""
    m = model()
    guard = gradguard.Guard(
        m, torch.optim.Adam(m.parameters()), "reset_moments:every=10+spam_clip:theta=1.5,warmup=3"
    )
    acted = []
    for step in range(1, 21):
        set_grads(m, step)
        acted.append("spam_clip" in guard.step().actions)
    # 1-based steps 10 and 20 reset (SPAM's schedule): steps 10, 11 are the pause.
    assert not acted[0] and not acted[1]
    assert not acted[9] and not acted[10]
    assert acted[11]


# ----- (c) resume --------------------------------------------------------------------------------
def test_resume_is_exact():
    """Stateless: a run saved (Guard + optimizer) and resumed takes the uninterrupted run's steps."""
    spec = "spam_clip:theta=2,warmup=3"
    a = model()
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2)
    ga = gradguard.Guard(a, oa, spec)
    b = model()
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2)
    gb = gradguard.Guard(b, ob, spec)
    for step in range(1, 7):
        set_grads(a, step)
        ga.step()
        set_grads(b, step)
        gb.step()
    buf = io.BytesIO()
    torch.save({"m": b.state_dict(), "o": ob.state_dict(), "g": gb.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    c = model()
    c.load_state_dict(saved["m"])
    oc = torch.optim.AdamW(c.parameters(), lr=1e-2)
    oc.load_state_dict(saved["o"])
    gc = gradguard.Guard(c, oc, spec)
    gc.load_state_dict(saved["g"])
    for step in range(7, 15):
        set_grads(a, step)
        ga.step()
        set_grads(c, step)
        gc.step()
    for p, q in zip(a.parameters(), c.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert copy.deepcopy(ga.policies[-1].state_dict()) == {}


# ----- (d) parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        "spam_clip:theta=0",
        "spam_clip:theta=-1",
        "spam_clip:theta=inf",
        "spam_clip:theta=nan",
        "spam_clip:theta=abc",
        "spam_clip:warmup=-1",
        "spam_clip:warmup=1.5",
        "spam_clip:theta=5000,warmup=true",
    ],
)
def test_bad_parameters(spec):
    with pytest.raises(SpecError):
        parse_spec(spec)


def test_defaults_are_pytorch_optimizers():
    (p,) = parse_spec("spam_clip")
    assert (p.theta, p.warmup) == (5000.0, 20)
    po = pytest.importorskip("pytorch_optimizer")
    s = po.SPAM([nn.Parameter(torch.zeros(2))])
    assert (s.threshold, s.grad_accu_steps) == (p.theta, p.warmup)


# ----- (e) refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["SGD", "RMSprop", "Adagrad", "Adamax"])
def test_optimizers_without_a_second_moment_are_refused(opt):
    m = model()
    kw = {"lr": 0.1} if opt == "SGD" else {}
    with pytest.raises(ConfigError, match=r"exp_avg_sq.*Adam-family"):
        gradguard.Guard(m, getattr(torch.optim, opt)(m.parameters(), **kw), "spam_clip")


def test_a_third_party_optimizer_without_one_is_refused_before_the_clip():
    """Lion has betas but no exp_avg_sq: refused on the first step its state shows it."""
    po = pytest.importorskip("pytorch_optimizer")
    m = model()
    guard = gradguard.Guard(m, po.Lion(m.parameters()), "spam_clip")
    set_grads(m, 1)
    guard.step()
    set_grads(m, 2)
    w = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ConfigError, match="Lion does not keep"):
        guard.step()
    for p, q in zip(m.parameters(), w, strict=True):
        assert torch.equal(p, q)


def test_complex_parameters_are_refused():
    p = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ConfigError, match="complex"):
        gradguard.Guard(None, torch.optim.Adam([p]), "spam_clip")
