"""adagc against pytorch-optimizer's ``AdaGC`` (4.1.0), against a readable twin of its rule written
here, and its state (round trip, exact resume, bad states refused) and parameters."""

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

from tests.helpers import set_grads

#: Steps of the runs below; warmup short enough that most of them are past it.
STEPS, WARMUP = 30, 5
#: Steps whose loss is scaled up so the clip binds (in warmup, at its end and after it).
SPIKES = {2: 50.0, 5: 30.0, 11: 100.0, 17: 1e3, 24: 20.0}


class MLP(nn.Module):
    """Three Linear layers and a 0-dim scale: 7 tensors, each with a gradient on every step
    (AdaGC's Adam counts steps per group, torch's per parameter: a parameter that misses a
    gradient gets another bias correction there; the clip of a tensor whose first gradient comes
    late is tested against the twin below)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.temp = nn.Parameter(torch.tensor(0.8))

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))) * self.temp


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)


def backward(model: MLP, step: int, maximize: bool = False) -> torch.Tensor:
    x, y = batch(step)
    loss = nn.functional.cross_entropy(model(x), y) * SPIKES.get(step, 1.0)
    (-loss if maximize else loss).backward()
    return loss


def twin_models() -> tuple[MLP, MLP]:
    torch.manual_seed(0)
    a = MLP()
    return a, copy.deepcopy(a)


def run_reference(model: MLP, steps: int = STEPS, maximize: bool = False, **kw) -> MLP:
    from pytorch_optimizer import AdaGC

    opt = AdaGC(model.parameters(), warmup_steps=WARMUP, maximize=maximize, **kw)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        backward(model, step, maximize)
        opt.step()
    return model


def run_guard(model: MLP, opt, spec: str, steps: int = STEPS, maximize: bool = False):
    guard = gradguard.Guard(model, opt, spec)
    reports = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = backward(model, step, maximize)
        reports.append(guard.step(loss=loss))
    return guard, reports


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ----- against pytorch-optimizer ---------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, None], ids=["per-tensor", "foreach"])
def test_guarded_adam_takes_the_steps_of_pytorch_optimizer_adagc(foreach):
    """THE test: Adam under ``adagc`` == AdaGC, weight decay 0, over warmup and after, with
    spikes that make the global and the per-tensor clip bind. AdaGC's own update is Adam's
    (``lerp`` first moment, ``sqrt(v) / sqrt(bc2) + eps`` denominator, ``lr / bc1`` step): this
    pins it too. Both of AdaGC's code paths (per tensor, and ``foreach`` after warmup)."""
    pytest.importorskip("pytorch_optimizer")
    ours, ref = twin_models()
    lr, betas, eps = 3e-3, (0.9, 0.99), 1e-8
    run_reference(ref, lr=lr, betas=betas, eps=eps, weight_decay=0.0, foreach=foreach)
    opt = torch.optim.Adam(ours.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    _, reports = run_guard(ours, opt, f"adagc:warmup_steps={WARMUP},eps={eps}")
    assert_same_weights(ours, ref)
    # The clip did bind, globally in warmup and per tensor after it.
    acted = ["adagc" in r.actions for r in reports]
    assert acted[2] and acted[11] and acted[17]
    assert reports[17].metrics["adagc.clipped"] >= 1.0
    assert reports[0].metrics["adagc.warmup"] == 1.0 and reports[10].metrics["adagc.warmup"] == 0.0
    # Weights moved far enough that a wrong clip would show.
    torch.manual_seed(0)
    assert (ours.fc1.weight - MLP().fc1.weight).abs().max() > 1e-2


def test_guarded_adamw_matches_adagc_default_decoupled_weight_decay():
    """AdaGC's default decay (0.1, decoupled, scaled by lr) is AdamW's: it never touches the
    gradient, so the clip sees the same one. ``maximize`` negates before the clip, a sign norms
    do not see: torch's own ``maximize`` gives the same steps."""
    pytest.importorskip("pytorch_optimizer")
    ours, ref = twin_models()
    run_reference(ref, lr=1e-2, maximize=True)  # weight_decay=0.1, weight_decouple=True
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, maximize=True)
    run_guard(ours, opt, f"adagc:warmup_steps={WARMUP}", maximize=True)
    assert_same_weights(ours, ref)


def test_coupled_weight_decay_is_where_they_differ():
    """Documented difference: AdaGC's coupled decay adds ``wd * p`` before it clips, torch's
    Adam after the Guard clipped."""
    pytest.importorskip("pytorch_optimizer")
    ours, ref = twin_models()
    run_reference(ref, lr=1e-2, weight_decay=0.5, weight_decouple=False)
    opt = torch.optim.Adam(ours.parameters(), lr=1e-2, weight_decay=0.5)
    run_guard(ours, opt, f"adagc:warmup_steps={WARMUP}")
    assert not torch.allclose(ours.fc1.weight, ref.fc1.weight, rtol=1e-5, atol=1e-6)


# ----- against a readable twin of the rule -------------------------------------------------------
def adagc_twin(grads_per_step, lambda_abs=1.0, lambda_rel=1.05, beta=0.98, warmup=100, eps=1e-8):
    """AdaGC's clip, one tensor at a time in float64 Python: each step's list of gradients
    (None: no gradient) -> the clipped gradients."""
    gamma: dict[int, float] = {}
    out = []
    for t, grads in enumerate(grads_per_step, start=1):
        total = math.sqrt(sum(float(g.double().norm()) ** 2 for g in grads if g is not None))
        clipped = []
        for k, g in enumerate(grads):
            if g is None:
                clipped.append(None)
                continue
            norm = float(g.double().norm())
            if t < warmup or k not in gamma:
                h = min(lambda_abs / (total + eps), 1.0)
                gamma[k] = norm * h if k not in gamma else min(gamma[k], norm * h)
            else:
                h = min(lambda_rel * max(gamma[k], eps) / max(norm, eps), 1.0)
                gamma[k] = beta * gamma[k] + (1 - beta) * norm * h
            clipped.append(g.double() * h)
        out.append(clipped)
    return out


class Probe(gradguard.Policy):
    """Records the gradients as the chain left them (a policy after adagc)."""

    name = "probe"

    def __init__(self):
        super().__init__()
        self.seen: list[list[torch.Tensor | None]] = []

    def apply(self, ctx) -> None:
        row: list[torch.Tensor | None] = [None] * len(ctx.stats.layout.params)
        for g, i in zip(ctx.stats.grads, ctx.stats.param_index, strict=True):
            row[i] = g.detach().clone()
        self.seen.append(row)
        # The running norms stay exact after adagc's scaling (no re-measure needed).
        torch.testing.assert_close(
            ctx.stats.param_norms,
            torch.stack([g.norm() for g in ctx.stats.grads]),
            rtol=1e-5,
            atol=1e-12,
        )


def test_the_rule_matches_its_readable_twin():
    """Random gradients of changing scale (spikes, a tensor without a gradient for a while, a
    tensor that only appears after warmup); float64 so the comparison is tight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).double()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)  # the weights stay put; only the gradients matter
    probe = Probe()
    (policy,) = parse_spec("adagc:lambda_abs=2.0,lambda_rel=1.1,beta=0.9,warmup_steps=4")
    guard = gradguard.Guard(model, opt, [policy, probe], check_finite=False)
    gen = torch.Generator().manual_seed(3)
    given = []
    for t in range(25):
        scale = {1: 40.0, 6: 80.0, 12: 0.01, 13: 500.0}.get(t, 1.0)
        grads = []
        for k, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale * (k + 1)
            if (k == 1 and 8 <= t < 11) or (k == 3 and t < 9):
                g = None  # no gradient this step (k=3: its first comes after warmup)
            p.grad = g
            grads.append(None if g is None else g.clone())
        given.append(grads)
        guard.step()
    want = adagc_twin(given, lambda_abs=2.0, lambda_rel=1.1, beta=0.9, warmup=4)
    for t, (mine, theirs) in enumerate(zip(probe.seen, want, strict=True)):
        for k, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert (a is None) == (b is None), (t, k)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0, msg=f"step {t}, tensor {k}")
    # The per-tensor clip bound after warmup, and not every tensor on every step.
    assert policy.state["step"] == 25 and bool(policy.state["seen"].all())


def test_a_spiking_tensor_is_scaled_to_its_own_level_and_the_others_are_not():
    """After warmup the clip is per tensor: a spike in one tensor scales that tensor alone, to
    ``lambda_rel * gamma`` (its EMA of clipped norms); a global clip would shrink them all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay put
    guard = gradguard.Guard(model, opt, "adagc:warmup_steps=2", check_finite=False)
    (policy,) = guard.policies
    for seed in range(10):
        set_grads(model, seed, scale=0.01)
        guard.step()
    gamma = policy.state["gamma"].clone()
    given = set_grads(model, 99, scale=0.01)
    model[0].weight.grad.mul_(1e4)
    report = guard.step()
    grads = [p.grad for p in model.parameters()]
    torch.testing.assert_close(grads[0].norm(), 1.05 * gamma[0], rtol=1e-5, atol=0.0)
    below = [k for k in range(1, 4) if float(given[k].norm()) <= 1.05 * float(gamma[k])]
    assert below  # (the seed gives some)
    for k in below:
        assert torch.equal(grads[k], given[k]), k  # below its own level: untouched
    assert report.layers["adagc"][0] == "0"


# ----- state -----------------------------------------------------------------------------------
def test_state_round_trips_and_a_resumed_run_is_exact():
    """Stop mid-run (after warmup), save everything, resume in a fresh process-like setup: the
    weights equal the uninterrupted run's bit for bit."""
    whole, half = twin_models()
    spec = f"adagc:warmup_steps={WARMUP}"
    opt = torch.optim.Adam(whole.parameters(), lr=3e-3)
    run_guard(whole, opt, spec)

    opt_a = torch.optim.Adam(half.parameters(), lr=3e-3)
    guard_a = gradguard.Guard(half, opt_a, spec)
    for step in range(12):
        opt_a.zero_grad(set_to_none=True)
        guard_a.step(loss=backward(half, step))
    buf = io.BytesIO()
    torch.save(
        {"model": half.state_dict(), "opt": opt_a.state_dict(), "guard": guard_a.state_dict()}, buf
    )
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    (policy_state,) = [p["state"] for p in saved["guard"]["policies"] if p["name"] == "adagc"]
    assert policy_state["step"] == 12 and policy_state["gamma"].shape == (7,)

    resumed = MLP()
    resumed.load_state_dict(saved["model"])
    opt_b = torch.optim.Adam(resumed.parameters(), lr=3e-3)
    opt_b.load_state_dict(saved["opt"])
    guard_b = gradguard.Guard(resumed, opt_b, spec)
    guard_b.load_state_dict(saved["guard"])
    for step in range(12, STEPS):
        opt_b.zero_grad(set_to_none=True)
        guard_b.step(loss=backward(resumed, step))
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def trained_guard(steps: int = 8) -> gradguard.Guard:
    model, _ = twin_models()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard, _ = run_guard(model, opt, "adagc:warmup_steps=3", steps=steps)
    return guard


def adagc_state(state: dict) -> dict:
    return next(p["state"] for p in state["policies"] if p["name"] == "adagc")


def _gamma(value):
    def f(st):
        st["gamma"] = st["gamma"].clone()
        st["gamma"][1] = value

    return f


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (_gamma(math.nan), ["adagc", "gamma", "nan", "finite"]),
        (_gamma(math.inf), ["adagc", "gamma", "inf"]),
        (_gamma(-1.0), ["adagc", "gamma", ">= 0"]),
        (lambda st: st.update(gamma=st["gamma"][:3]), ["adagc", "gamma", "(7,)"]),
        (lambda st: st.update(gamma=st["gamma"].tolist()), ["adagc", "gamma", "tensor"]),
        (lambda st: st.update(seen=st["seen"].float()), ["adagc", "seen", "bool"]),
        (lambda st: st.update(step=-1), ["adagc", "step=-1", ">= 0"]),
        (lambda st: st.update(step=2.5), ["adagc", "step=2.5", "integer"]),
        (lambda st: st.pop("seen"), ["adagc", "no seen"]),
        (lambda st: st.update(extra=1), ["adagc", "extra"]),
    ],
)
def test_a_bad_saved_state_is_refused_and_changes_nothing(mutate, words):
    state = copy.deepcopy(trained_guard().state_dict())
    mutate(adagc_state(state))
    guard = trained_guard(steps=2)
    before = copy.deepcopy(adagc_state(guard.state_dict()))
    with pytest.raises(ConfigError) as e:
        guard.load_state_dict(state)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    after = adagc_state(guard.state_dict())
    assert after["step"] == before["step"] and torch.equal(after["gamma"], before["gamma"])


# ----- parameters --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("adagc:lambda_abs=0", "lambda_abs must be a finite number > 0"),
        ("adagc:lambda_abs=-1", "lambda_abs"),
        ("adagc:lambda_abs=inf", "lambda_abs"),
        ("adagc:lambda_rel=nan", "lambda_rel"),
        ("adagc:lambda_rel=0", "lambda_rel"),
        ("adagc:beta=1", r"beta must be in \[0, 1\)"),
        ("adagc:beta=-0.1", "beta"),
        ("adagc:beta=nan", "beta"),
        ("adagc:warmup_steps=-1", "warmup_steps must be an integer >= 0"),
        ("adagc:warmup_steps=1.5", "warmup_steps"),
        ("adagc:eps=0", "eps must be a finite number > 0"),
        ("adagc:nope=1", "unknown parameter 'nope'"),
    ],
)
def test_bad_parameters_are_refused(spec, words):
    with pytest.raises(SpecError, match=words):
        parse_spec(spec)


def test_python_api_refuses_the_same():
    with pytest.raises(SpecError, match="beta"):
        gradguard.adagc(beta=1.5)
    with pytest.raises(SpecError, match="warmup_steps"):
        gradguard.adagc(warmup_steps=True)


def test_defaults_are_pytorch_optimizers():
    p = gradguard.adagc()
    assert (p.lambda_abs, p.lambda_rel, p.beta, p.warmup_steps, p.eps) == (
        1.0,
        1.05,
        0.98,
        100,
        1e-8,
    )
    (q,) = parse_spec(p.spec())
    assert q.params() == p.params()
    try:
        import inspect

        from pytorch_optimizer import AdaGC
    except ImportError:
        return
    ref = inspect.signature(AdaGC).parameters
    for k in ("lambda_abs", "lambda_rel", "beta", "warmup_steps", "eps"):
        assert ref[k].default == getattr(p, k), k
