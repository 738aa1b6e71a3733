"""timm's adaptive gradient clipping (huggingface/pytorch-image-models ``timm/utils/agc.py``,
``adaptive_clip_grad``), run against the Guard's ``agc``.

timm ships no tests of its own for AGC, so the cases here are the rule as timm implements it (and
as the NFNets paper, Brock et al. 2021, Eq. 3, defines it), written out below:

    per unit (dim 0 of a weight; a tensor of ndim <= 1 is one unit):
        max_norm = clip_factor * max(||W_unit||, eps)
        G_unit  <- G_unit                                   if ||G_unit|| < max_norm
                   G_unit * max_norm / max(||G_unit||, 1e-6)  otherwise

and how timm's ``train.py`` uses it: ``--clip-mode agc`` passes
``model_parameters(model, exclude_head=True)`` (``timm/utils/model.py``), i.e. every parameter but
the last two registered (the classifier's weight and bias). The Guard finds the head from the
forward pass instead, so the two agree when the head is registered last and differ, on purpose,
when it is not. timm's ``norm_type`` argument has no Guard equivalent (AGC is L2 only there) and
is not ported.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradguard

from tests.reference.harness import Recorder

pytestmark = pytest.mark.filterwarnings("ignore:index_reduce:UserWarning")


# ----- the rule, as timm implements it ---------------------------------------------------------------
def unit_norms(x: torch.Tensor) -> torch.Tensor:
    """timm's unitwise_norm: the whole tensor for ndim <= 1, else per dim-0 slice (keepdim)."""
    if x.ndim <= 1:
        return x.norm(2.0)
    return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


def timm_adaptive_clip_grad(params, clip_factor=0.01, eps=1e-3):
    for p in params:
        if p.grad is None:
            continue
        w, g = p.detach(), p.grad.detach()
        max_norm = unit_norms(w).clamp(min=eps) * clip_factor
        g_norm = unit_norms(g)
        scaled = g * (max_norm / g_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(g_norm < max_norm, g, scaled))


def timm_model_parameters(model: nn.Module, exclude_head: bool):
    """timm.utils.model.model_parameters: the head is 'the last two parameters'."""
    ps = list(model.parameters())
    return ps[:-2] if exclude_head else ps


# ----- models ------------------------------------------------------------------------------------------
class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(0.7))  # a 0-dim parameter: one unit

    def forward(self, x):
        return x * self.s


class ConvNet(nn.Module):
    """Conv2d (4-D), ConvTranspose2d (dim 0 = in-channels, for timm and the Guard alike),
    LayerNorm (1-D), a 0-dim scale, an Embedding-sized Linear, a zero-initialised layer (the eps
    floor) and the classifier head, registered and run last."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.up = nn.ConvTranspose2d(6, 4, 2)
        self.norm = nn.LayerNorm(4)
        self.scale = Scale()
        self.fc = nn.Linear(4, 8)
        self.zero = nn.Linear(8, 8)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.up(torch.relu(self.conv(x))).mean(dim=(2, 3))
        h = torch.relu(self.fc(self.scale(self.norm(h))))
        return self.head(torch.relu(self.zero(h)) + h)


def build(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return ConvNet().to(dtype)


def forward_once(model: nn.Module) -> None:
    """One forward pass after the Guard exists: it learns which layer is the head from it."""
    p = next(model.parameters())
    with torch.no_grad():
        if isinstance(model, ConvNet):
            model(torch.randn(2, 3, 6, 6, dtype=p.dtype))
        else:
            model(torch.randn(2, model.d_in, dtype=p.dtype))


def unit_scaled_grads(model: nn.Module, seed: int):
    """Random gradients whose units span 1e-4..1e2 of their weight's unit norm: some clip, some
    don't, at every clip factor below."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.ndim >= 1:
            k = p.shape[0]
            g = g * torch.logspace(-4, 2, k, dtype=torch.float64).reshape(
                (-1,) + (1,) * (p.ndim - 1)
            )
        p.grad = g.to(p.dtype)


def guard_agc(model, spec, check_finite=True, lr=0.0):
    opt = Recorder(model.parameters(), lr=lr)
    guard = gradguard.Guard(model, opt, spec, check_finite=check_finite)
    forward_once(model)
    return opt, guard


# ----- the rule on every parameter ---------------------------------------------------------------------
@pytest.mark.parametrize("path", [True, False], ids=["host", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("clip_factor", "eps"), [(0.01, 1e-3), (0.02, 1e-3), (0.1, 1e-3), (1.0, 1e-1)]
)
def test_every_parameter_matches_timm(clip_factor, eps, dtype, path):
    model = build(dtype)
    ref = copy.deepcopy(model)
    unit_scaled_grads(model, 1)
    unit_scaled_grads(ref, 1)
    opt, guard = guard_agc(model, f"agc:clipping={clip_factor},eps={eps},exclude_head=false", path)
    report = guard.step()
    timm_adaptive_clip_grad(ref.parameters(), clip_factor, eps)
    for (name, _), got, q in zip(
        ref.named_parameters(), opt.seen[-1], ref.parameters(), strict=True
    ):
        assert torch.equal(got, q.grad), name  # same arithmetic as timm, bit for bit
    assert report.clipped
    # The post-clip norm the report gives is the norm of what the optimizer got.
    total = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in opt.seen[-1]]))
    assert report.grad_norm_after == pytest.approx(float(total), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_matches_timm_to_its_precision(dtype):
    """timm measures fp16/bf16 norms in the low dtype; the Guard in float32: the same rule, to the
    dtype's precision."""
    model = build(dtype)
    ref = copy.deepcopy(model)
    unit_scaled_grads(model, 2)
    unit_scaled_grads(ref, 2)
    opt, guard = guard_agc(model, "agc:clipping=0.05,exclude_head=false")
    guard.step()
    timm_adaptive_clip_grad(ref.parameters(), 0.05)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for got, q in zip(opt.seen[-1], ref.parameters(), strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), q.grad.double(), rtol=tol, atol=1e-6)


def test_units_are_bounded_and_direction_kept():
    """The paper's guarantee: after clipping, every unit's ||G|| <= clip * max(||W||, eps), and a
    clipped unit keeps its direction."""
    model = build(torch.float64)
    unit_scaled_grads(model, 3)
    raw = [p.grad.clone() for p in model.parameters()]
    opt, guard = guard_agc(model, "agc:clipping=0.01,exclude_head=false")
    guard.step()
    for p, g0, g1 in zip(model.parameters(), raw, opt.seen[-1], strict=True):
        bound = unit_norms(p.detach()).clamp(min=1e-3) * 0.01
        assert torch.all(unit_norms(g1) <= bound * (1 + 1e-12))
        units = (1, -1) if g0.ndim <= 1 else (g0.shape[0], -1)
        a, b = g0.reshape(units), g1.reshape(units)
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        assert torch.all(cos > 1 - 1e-12)


def test_zero_weights_use_the_eps_floor():
    """timm/NFNets: a zero-initialised weight's units may still move, by clip * eps."""
    model = build(torch.float64)
    unit_scaled_grads(model, 4)
    opt, guard = guard_agc(model, "agc:clipping=0.01,eps=0.001,exclude_head=false")
    guard.step()
    names = [n for n, _ in model.named_parameters()]
    for name in ("zero.weight", "zero.bias"):
        g = opt.seen[-1][names.index(name)]
        assert torch.all(unit_norms(g) <= 0.01 * 1e-3 * (1 + 1e-12))
        assert torch.all(unit_norms(g) > 0)


def test_gradient_below_the_bound_is_untouched():
    model = build()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    raw = [p.grad.clone() for p in model.parameters()]
    opt, guard = guard_agc(model, "agc:clipping=0.01,exclude_head=false")
    report = guard.step()
    for got, r in zip(opt.seen[-1], raw, strict=True):
        assert torch.equal(got, r)
    assert not report.clipped


# ----- the head, as timm's train.py excludes it ---------------------------------------------------------
@pytest.mark.parametrize("path", [True, False], ids=["host", "device"])
def test_default_excludes_the_head_like_timm_train(path):
    """Head registered last: the Guard's default equals timm with model_parameters(exclude_head=True)."""
    model = build()
    ref = copy.deepcopy(model)
    unit_scaled_grads(model, 5)
    unit_scaled_grads(ref, 5)
    opt, guard = guard_agc(model, "agc:0.01", path)
    guard.step()
    timm_adaptive_clip_grad(timm_model_parameters(ref, exclude_head=True), 0.01)
    for got, q in zip(opt.seen[-1], ref.parameters(), strict=True):
        assert torch.equal(got, q.grad)
    # and the head really was left alone
    assert torch.equal(opt.seen[-1][-1], ref.head.bias.grad)


class HeadFirst(nn.Module):
    d_in = 5

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Linear(5, 8)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_head_registered_first_differs_from_timm_on_purpose():
    """timm's [:-2] would leave ``body`` unclipped and clip the real head; the Guard excludes the
    layer the forward pass runs last (README: 'instead of timm's [:-2] heuristic')."""
    torch.manual_seed(0)
    model = HeadFirst()
    ref = copy.deepcopy(model)
    timm_ref = copy.deepcopy(model)
    for m in (model, ref, timm_ref):
        unit_scaled_grads(m, 6)
    opt, guard = guard_agc(model, "agc:0.01")
    guard.step()
    timm_adaptive_clip_grad(ref.body.parameters(), 0.01)  # every parameter but the real head
    for got, q in zip(opt.seen[-1], ref.parameters(), strict=True):
        assert torch.equal(got, q.grad)
    timm_adaptive_clip_grad(timm_model_parameters(timm_ref, exclude_head=True), 0.01)
    assert not torch.equal(opt.seen[-1][0], timm_ref.head.weight.grad)  # timm clipped the head


# ----- in a training loop: AGC reads the weights as they move --------------------------------------------
class MLP(nn.Module):
    d_in = 6

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.scale = Scale()
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.scale(self.norm(torch.relu(self.fc1(x))))
        return self.head(torch.relu(self.fc2(h)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_training_loop_matches_timm_loop(dtype):
    """timm's loop (loss.backward(); adaptive_clip_grad(model_parameters(model, True)); SGD step)
    against the Guard with SGD, 20 steps on the same batches: same weights, bit for bit."""
    torch.manual_seed(0)
    ours = MLP().to(dtype)
    theirs = copy.deepcopy(ours)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(theirs.parameters(), lr=0.5, momentum=0.9)
    guard = gradguard.Guard(ours, opt, "agc:0.02")
    gen = torch.Generator().manual_seed(7)
    for _ in range(20):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64).to(dtype) * 3
        y = torch.randint(0, 5, (8,), generator=gen)
        for model, o in ((ours, opt), (theirs, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        guard.step()
        timm_adaptive_clip_grad(timm_model_parameters(theirs, exclude_head=True), 0.02)
        ref_opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    assert guard.counters["acted.agc"] > 0
