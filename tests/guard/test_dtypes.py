"""Every dtype and gradient layout torch trains with is measured and clipped right: float16,
bfloat16, float32, float64, complex, sparse COO, mixed dtypes; norms that overflow float32 stay
finite; parameters a Guard cannot guard are refused at construction."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from gradguard import ConfigError, Guard, available_policies
from gradguard.stats import foreach_norms

from tests.helpers import AttnNet

ALL_POLICIES = [*available_policies(), "default"]
# Policies whose every parameter has a default (clip_layerwise needs a threshold).
SPECS = [n if n != "clip_layerwise" else "clip_layerwise:factor=3" for n in ALL_POLICIES]


def linear_pair(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)).to(dtype)


def give_grads(model: nn.Module, seed: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.01, 1.0, 50.0])
def test_clip_norm_is_bit_identical_to_torch(dtype, scale):
    ours = linear_pair(dtype)
    ref = copy.deepcopy(ours)
    give_grads(ours, 1, scale)
    give_grads(ref, 1, scale)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    report = Guard(ours, opt, policy="clip_norm:0.5").step()
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    ref_opt.step()
    assert report.grad_norm == expected.item()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_float64_norms_are_float64():
    model = linear_pair(torch.float64)
    give_grads(model, 2)
    g = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="none", layer_stats=True)
    rep = g.step()
    exact = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))
    # float32 would keep ~7 digits; float64 keeps them all.
    assert rep.grad_norm == pytest.approx(exact, rel=1e-13)


def test_complex_parameters_clip_as_torch_does():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, dtype=torch.complex64))
    q = nn.Parameter(p.detach().clone())
    p.grad = torch.randn(5, dtype=torch.complex64) * 10
    q.grad = p.grad.clone()
    Guard(None, torch.optim.SGD([p], lr=0.1), policy="clip_norm:1.0").step()
    torch.nn.utils.clip_grad_norm_([q], 1.0)
    torch.optim.SGD([q], lr=0.1).step()
    assert torch.equal(p, q)


def test_complex_clip_value_is_refused_with_the_fix():
    p = nn.Parameter(torch.randn(5, dtype=torch.complex64))
    with pytest.raises(ConfigError, match=r"complex.*clip_norm"):
        Guard(None, torch.optim.SGD([p], lr=0.1), policy="clip_value:1.0")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_norms_accumulate_in_float32(dtype):
    model = linear_pair(dtype)
    # fp16's own sum of squares overflows at 256^2: 300 per element would read as inf.
    give_grads(model, 3, scale=300.0)
    g = Guard(model, torch.optim.SGD(model.parameters(), lr=0.0), policy="none")
    rep = g.step()
    exact = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    assert rep.grad_norm == pytest.approx(exact, rel=1e-5)
    assert not rep.skipped


@pytest.mark.parametrize(
    ("dtype", "value"),
    [(torch.float32, 1e20), (torch.bfloat16, 1e25), (torch.float64, 1e200)],
)
def test_huge_finite_gradients_are_finite_not_skipped(dtype, value):
    """torch's own norm overflows here (inf); the Guard's does not, and does not skip."""
    model = linear_pair(dtype)
    for p in model.parameters():
        p.grad = torch.full_like(p, value)
    n = sum(p.numel() for p in model.parameters())
    assert not torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    g = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="clip_norm:1.0")
    rep = g.step()
    assert not rep.skipped
    assert rep.grad_norm == pytest.approx(float(value) * math.sqrt(n), rel=1e-2)
    assert rep.grad_norm_after == pytest.approx(1.0, rel=1e-3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_real_nan_is_still_nonfinite_after_the_rescue():
    model = linear_pair(torch.float32)
    give_grads(model, 4)
    model[0].weight.grad[0, 0] = float("nan")
    rep = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1)).step()
    assert rep.skipped and rep.skip_reason == "nonfinite_grad"


class SparseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 4, sparse=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.emb(x).mean(1))


def test_sparse_gradients_clip_as_the_dense_twin():
    torch.manual_seed(0)
    sparse = SparseNet()
    dense = copy.deepcopy(sparse)
    dense.emb.sparse = False
    x = torch.randint(0, 20, (8, 5))  # repeated indices: an uncoalesced gradient
    for m in (sparse, dense):
        (m(x).pow(2).sum() * 100).backward()
    assert sparse.emb.weight.grad.is_sparse and not sparse.emb.weight.grad.is_coalesced()
    Guard(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), policy="clip_norm:0.5").step()
    torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.5)
    torch.optim.SGD(dense.parameters(), lr=0.1).step()
    for a, b in zip(sparse.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_sparse_norms_count_repeated_indices_once_summed():
    i = torch.tensor([[0, 0, 1]])
    v = torch.tensor([3.0, 1.0, 2.0])
    t = torch.sparse_coo_tensor(i, v, (3,), check_invariants=True)  # row 0 holds 3 + 1 = 4
    assert foreach_norms([t])[0].item() == pytest.approx(math.sqrt(16 + 4))


def test_mixed_dtypes_clip_as_torch_does():
    torch.manual_seed(0)
    a32, a64 = nn.Linear(3, 3), nn.Linear(3, 3).double()
    b32, b64 = copy.deepcopy(a32), copy.deepcopy(a64)
    for m in (a32, a64, b32, b64):
        for p in m.parameters():
            p.grad = torch.ones_like(p) * 2
    params_a = [*a32.parameters(), *a64.parameters()]
    params_b = [*b32.parameters(), *b64.parameters()]
    rep = Guard(None, torch.optim.SGD(params_a, lr=0.1), policy="clip_norm:1.0").step()
    total = torch.nn.utils.clip_grad_norm_(params_b, 1.0)
    torch.optim.SGD(params_b, lr=0.1).step()
    assert rep.grad_norm == pytest.approx(total.item(), rel=1e-12)
    for x, y in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["float64", "bfloat16", "complex64", "sparse"])
@pytest.mark.parametrize("spec", SPECS)
def test_every_policy_trains_every_dtype_and_layout(spec, kind):
    if kind == "complex64" and spec.startswith("clip_value"):
        pytest.skip("clip_value refuses complex gradients (tested above)")
    if kind in ("complex64", "sparse") and spec.startswith("spam_clip"):
        # Complex: refused (tests/policies/test_spam_clip.py); sparse: no optimizer that keeps
        # Adam's exp_avg_sq takes sparse gradients (torch's Adam raises on them).
        pytest.skip("spam_clip needs Adam's second moment: no complex or sparse gradients")
    if kind in ("complex64", "sparse") and spec.startswith("qk_clip"):
        # Attention logits are real (softmax takes no complex scores), and no attention module
        # has sparse weights: qk_clip needs an attention model of a real dtype.
        pytest.skip("qk_clip needs attention: real dtypes, dense weights")
    torch.manual_seed(0)
    if spec.startswith("qk_clip"):
        dt = getattr(torch, kind)
        model = AttnNet(d_in=4).to(dt)
        x = torch.randn(8, 4, dtype=dt)
    elif kind == "sparse":
        model: nn.Module = SparseNet()
        x = torch.randint(0, 20, (8, 5))
    else:
        dt = getattr(torch, kind)
        model = linear_pair(dt)
        x = torch.randn(8, 4, dtype=dt)
    # spam_clip reads Adam's second moment (it refuses SGD): it trains under Adam.
    adam = spec.startswith("spam_clip")
    opt = (torch.optim.Adam if adam else torch.optim.SGD)(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = Guard(model, opt, policy=spec)
        for _ in range(30):
            opt.zero_grad()
            out = model(x)
            loss = out.abs().sum() if out.is_complex() else out.float().square().mean()
            loss.backward()
            guard.step(loss=loss)
    assert guard.counters["steps"] == 30
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_integer_parameters_are_refused_at_construction():
    p = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ConfigError, match="int64"):
        Guard(None, torch.optim.SGD([p], lr=0.1))


def test_meta_parameters_are_refused_at_construction():
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(ConfigError, match=r"meta.*to_empty"):
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
