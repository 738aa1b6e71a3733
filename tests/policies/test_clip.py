"""clip_norm / clip_value against torch's own functions; clip_layerwise against a reference."""

from __future__ import annotations

import math

import pytest
import torch

import gradguard

from tests.helpers import TinyNet, set_grads


class Recorder(torch.optim.SGD):
    """SGD with lr=0 that records the gradients it was asked to apply."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append(
            [p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None]
        )
        return super().step(closure)


def guarded(policy: str, **kw):
    torch.manual_seed(0)
    model = TinyNet()
    opt = Recorder(model.parameters())
    return model, opt, gradguard.Guard(model, opt, policy, **kw)


@pytest.mark.parametrize("check_finite", [True, False], ids=["host_path", "device_path"])
@pytest.mark.parametrize("scale", [0.01, 1.0, 50.0, 3e4])
@pytest.mark.parametrize("max_norm", [0.5, 1.0, 7.0, 0.123])
def test_clip_norm_equals_torch_bitwise(scale, max_norm, check_finite):
    model, opt, guard = guarded(f"clip_norm:{max_norm}", check_finite=check_finite)
    ref_model = TinyNet()
    ref_model.load_state_dict(model.state_dict())
    grads = set_grads(model, 11, scale)
    for p, g in zip(ref_model.parameters(), grads, strict=True):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm, foreach=True)
    report = guard.step()
    for got, want in zip(opt.seen[-1], [p.grad for p in ref_model.parameters()], strict=True):
        assert torch.equal(got, want)
    assert report.grad_norm == ref_norm.item()
    assert report.clipped == (ref_norm.item() + 1e-6 > max_norm)
    assert report.grad_norm_after == pytest.approx(min(ref_norm.item(), max_norm), rel=1e-5)


@pytest.mark.parametrize("norm_type", [1.0, 3.0, math.inf])
def test_clip_norm_other_orders_match_torch(norm_type):
    model, opt, guard = guarded(f"clip_norm:max_norm=0.3,norm_type={norm_type}")
    grads = set_grads(model, 12, 2.0)
    params = [torch.nn.Parameter(g.clone()) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 0.3, norm_type=norm_type, foreach=True)
    guard.step()
    for got, p in zip(opt.seen[-1], params, strict=True):
        torch.testing.assert_close(got, p.grad)


@pytest.mark.parametrize("limit", [0.01, 0.5, 10.0])
def test_clip_value_equals_torch(limit):
    model, opt, guard = guarded(f"clip_value:{limit}")
    grads = set_grads(model, 13)
    report = guard.step()
    for got, g in zip(opt.seen[-1], grads, strict=True):
        assert torch.equal(got, g.clamp(-limit, limit))
    hit = any(bool((g.abs() > limit).any()) for g in grads)
    assert ("clip_value" in report.actions) == hit
    assert report.grad_norm_after == pytest.approx(
        torch.linalg.vector_norm(
            torch.stack([g.clamp(-limit, limit).norm() for g in grads])
        ).item(),
        rel=1e-5,
    )


def test_clip_layerwise_fixed_threshold_clips_only_the_loud_layer():
    model, opt, guard = guarded("clip_layerwise:max_norm=1.0")
    set_grads(model, 14, 0.01)
    model.fc2.weight.grad.mul_(1e4)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    report = guard.step()
    after = dict(zip([n for n, _ in model.named_parameters()], opt.seen[-1], strict=True))
    fc2 = math.sqrt(after["fc2.weight"].norm() ** 2 + after["fc2.bias"].norm() ** 2)
    assert fc2 == pytest.approx(1.0, rel=1e-5)
    for n in ("fc1.weight", "fc1.bias", "head.weight", "head.bias"):
        assert torch.equal(after[n], before[n])
    # Direction inside the layer is kept.
    cos = torch.nn.functional.cosine_similarity(
        after["fc2.weight"].flatten(), before["fc2.weight"].flatten(), dim=0
    )
    assert cos.item() == pytest.approx(1.0, abs=1e-6)
    assert report.layers["clip_layerwise"] == ("fc2",)


def layerwise_reference(
    norm_seq: list[list[float]], factor: float, beta: float, warmup: int
) -> list[list[float]]:
    """Per-layer clip coefficient sequence for the running-norm mode, written out plainly."""
    n_layers = len(norm_seq[0])
    ema = [0.0] * n_layers
    count = [0] * n_layers
    out = []
    for norms in norm_seq:
        coefs = []
        for i, x in enumerate(norms):
            if count[i] >= warmup:
                thr = factor * ema[i] / (1 - beta ** count[i])
                c = min(1.0, thr / (x + 1e-6))
            else:
                c = 1.0
            coefs.append(c)
            ema[i] = beta * ema[i] + (1 - beta) * x * c
            count[i] += 1
        out.append(coefs)
    return out


def test_clip_layerwise_running_norm_matches_reference():
    model, opt, guard = guarded("clip_layerwise:factor=2,beta=0.9,warmup=5")
    gen = torch.Generator().manual_seed(0)
    layer_of = {
        "fc1": ["fc1.weight", "fc1.bias"],
        "fc2": ["fc2.weight", "fc2.bias"],
        "head": ["head.weight", "head.bias"],
    }
    names = [n for n, _ in model.named_parameters()]
    seq_norms, coefs_seen = [], []
    for step in range(40):
        set_grads(model, 100 + step, 1.0 + 0.1 * torch.rand((), generator=gen).item())
        if step in (12, 25):
            model.fc1.weight.grad.mul_(30.0)
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        seq_norms.append(
            [math.sqrt(sum(raw[n].norm().item() ** 2 for n in ps)) for ps in layer_of.values()]
        )
        guard.step()
        got = dict(zip(names, opt.seen[-1], strict=True))
        coefs_seen.append(
            [got[ps[0]].norm().item() / raw[ps[0]].norm().item() for ps in layer_of.values()]
        )
    ref = layerwise_reference(seq_norms, factor=2.0, beta=0.9, warmup=5)
    for got, want in zip(coefs_seen, ref, strict=True):
        assert got == pytest.approx(want, rel=1e-4)
    assert min(c[0] for c in coefs_seen) < 0.2  # the injected spikes were clipped
