"""PyTorch's own clip-grad test cases, run through the Guard.

Ported from pytorch/pytorch ``test/test_nn.py`` (re-expressed, not copied):

- ``TestNNDeviceType.test_clip_grad_norm``: an ``nn.Linear(10, 10)`` with weight gradient
  ``arange(1, 101)`` and bias gradient ``1/1000``, ``max_norm=2``, norm types 0.5, 1.5, 2, 4, inf,
  ``foreach`` False/True; the clipped norm is ``max_norm``, every element is scaled by one factor;
  small gradients (``rand/10000``, ``1/500``) are left exactly alone; a single tensor behaves as a
  one-element list; the decomposed API (``get_total_norm``) gives the same total.
- ``TestNNDeviceType.test_clip_grad_value``: weight gradient ``arange(-50, 50)/5``, bias ``2``,
  ``clip_value=2.5``, with and without a bias gradient, ``foreach`` False/True, single tensor.
- ``TestNNDeviceType.test_clip_grad_norm_error_if_nonfinite``: a float64 parameter of ten ones whose gradient
  is a scalar (in every element or one), optionally after a parameter with gradient 1; scalars
  +-inf, nan, +-2e22, +-2e200; torch raises exactly when the total norm of that order is
  non-finite. The Guard has no ``error_if_nonfinite``: by design it skips a step whose gradient
  holds a NaN/Inf (weights, optimizer state untouched) and never treats a finite gradient as
  non-finite, so where torch raises for a finite gradient whose p-norm merely overflows (2e200),
  the Guard must clip it correctly instead.

Torch's negative and zero norm types are not ported: ``clip_norm`` refuses them with a SpecError
(checked below). ``test_clip_grad_norm_multi_device`` (two Linear(10, 10) on two GPUs, ones
gradients, ``max_norm=0.5``, norm types 2 and inf) is ported on one device: its expected values are
those of the same model on one device.

Every case compares (a) against torch's own function on a copy of the same gradients (bit for bit
where the README claims it: float32, float64, complex) and (b) against clip_grad_norm_'s documented
rule, ``g * min(1, max_norm / (||g||_p + 1e-6))``, recomputed below in float64 without overflow.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_, clip_grad_value_, get_total_norm

import gradguard

from tests.reference.harness import Recorder

INF = math.inf
NORM_TYPES = [0.5, 1.5, 2.0, 4.0, INF]  # test_clip_grad_norm's parametrization
PATHS = {"host": True, "device": False}  # check_finite: the Guard's host-float / device-tensor path

# float64 layer norms use index_reduce_, which torch flags as beta.
pytestmark = pytest.mark.filterwarnings("ignore:index_reduce:UserWarning")


# ----- the rule, written out -------------------------------------------------------------------------
def wide(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.complex128 if t.is_complex() else torch.float64)


def pnorm_exact(grads: list[torch.Tensor], p: float) -> float:
    """The total p-norm of the gradients viewed as one vector, in float64, never overflowing:
    everything is divided by the largest magnitude first."""
    mags = [wide(g).abs() for g in grads if g is not None]
    m = max((float(a.max()) for a in mags if a.numel()), default=0.0)
    if m == 0.0 or not math.isfinite(m):
        return m
    if p == INF:
        return m
    return m * float(sum(((a / m) ** p).sum() for a in mags)) ** (1.0 / p)


def clip_norm_rule(grads: list[torch.Tensor], max_norm: float, p: float) -> list[torch.Tensor]:
    """clip_grad_norm_'s documented rule: one factor min(1, max_norm / (total + 1e-6))."""
    coef = min(1.0, max_norm / (pnorm_exact(grads, p) + 1e-6))
    return [None if g is None else wide(g) * coef for g in grads]


def torch_clip_norm(grads, dtype, max_norm, p, foreach=None, **kw):
    """torch.nn.utils.clip_grad_norm_ on fresh parameters holding copies of ``grads``."""
    params = [nn.Parameter(torch.zeros(g.shape, dtype=dtype)) for g in grads]
    for q, g in zip(params, grads, strict=True):
        q.grad = g.to(dtype).clone()
    total = clip_grad_norm_(params, max_norm, norm_type=p, foreach=foreach, **kw)
    return total, [q.grad for q in params]


# ----- driving the Guard -----------------------------------------------------------------------------
def linear_with_grads(dtype, weight_grad, bias_grad):
    torch.manual_seed(0)
    lin = nn.Linear(10, 10).to(dtype)
    lin.weight.grad = weight_grad.to(dtype).clone().view_as(lin.weight)
    lin.bias.grad = None if bias_grad is None else bias_grad.to(dtype).clone().view_as(lin.bias)
    return lin


def guard_step(model, spec, check_finite=True, params=None):
    """One Guard step; returns (report, the gradients the optimizer was handed or None if skipped)."""
    opt = Recorder(model.parameters() if params is None else params)
    report = gradguard.Guard(model, opt, spec, check_finite=check_finite).step()
    return report, (opt.seen[-1] if opt.seen else None)


def big_grads():
    return torch.arange(1.0, 101).view(10, 10), torch.ones(10).div(1000)


def small_grads():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(10, 10, generator=gen).div(10000), torch.ones(10).div(500)


# ----- TestNNDeviceType.test_clip_grad_norm ----------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_large_gradients(norm_type, foreach, dtype, path):
    gw, gb = big_grads()
    lin = linear_with_grads(dtype, gw, gb)
    raw = [lin.weight.grad.clone(), lin.bias.grad.clone()]
    report, seen = guard_step(lin, f"clip_norm:max_norm=2,norm_type={norm_type}", PATHS[path])
    total, want = torch_clip_norm(raw, dtype, 2.0, norm_type, foreach=foreach)
    # (a) torch's own function, bit for bit (README: bit-identical for float32/float64).
    for got, exp in zip(seen, want, strict=True):
        assert torch.equal(got, exp)
    # torch's assertions: the clipped norm is max_norm, one factor scales every element.
    assert pnorm_exact(seen, norm_type) == pytest.approx(2.0, rel=1e-5)
    ratios = torch.cat([(g / r).flatten() for g, r in zip(seen, raw, strict=True)])
    assert float(ratios.max() - ratios.min()) <= 1e-6 * float(ratios.abs().max())
    # (b) the documented rule, in float64.
    for got, exp in zip(seen, clip_norm_rule(raw, 2.0, norm_type), strict=True):
        torch.testing.assert_close(
            wide(got), exp, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0
        )
    assert report.clipped and not report.skipped
    # The report holds the L2 norm (as clip_grad_norm_ returns it for norm_type=2).
    l2 = get_total_norm(raw, norm_type=2.0, foreach=foreach)
    assert report.grad_norm == float(l2)
    if norm_type == 2.0:
        assert report.grad_norm == float(total)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_small_gradients_untouched(norm_type, dtype, path):
    gw, gb = small_grads()
    lin = linear_with_grads(dtype, gw, gb)
    raw = [lin.weight.grad.clone(), lin.bias.grad.clone()]
    report, seen = guard_step(lin, f"clip_norm:max_norm=2,norm_type={norm_type}", PATHS[path])
    for got, r in zip(seen, raw, strict=True):
        assert torch.equal(got, r)  # torch: scale == 1
    assert not report.clipped
    assert report.grad_norm_after == report.grad_norm


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_single_tensor_as_list(norm_type):
    """torch: clip_grad_norm_(p1) == clip_grad_norm_([p2]); the Guard over one bare parameter
    (no module) does the same."""
    g = torch.arange(1.0, 101).view(10, 10)
    p1 = nn.Parameter(torch.randn(10, 10))
    p1.grad = g.clone()
    clip_grad_norm_(p1, 2.0, norm_type=norm_type)
    p2 = nn.Parameter(torch.randn(10, 10))
    p2.grad = g.clone()
    _, seen = guard_step(None, f"clip_norm:max_norm=2,norm_type={norm_type}", params=[p2])
    assert torch.equal(seen[0], p1.grad)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_param_without_grad(norm_type):
    """A parameter without a gradient is ignored by torch; the Guard leaves it without one."""
    gw, _ = big_grads()
    lin = linear_with_grads(torch.float32, gw, None)
    raw = [lin.weight.grad.clone()]
    _, seen = guard_step(lin, f"clip_norm:max_norm=2,norm_type={norm_type}")
    _, want = torch_clip_norm(raw, torch.float32, 2.0, norm_type)
    assert torch.equal(seen[0], want[0])
    assert seen[1] is None


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Linear(10, 10)
        self.layer2 = nn.Linear(10, 10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_clip_grad_norm_multi_device_case_on_one_device(norm_type, path):
    torch.manual_seed(0)
    model = TwoLayers()
    ref = TwoLayers()
    for m in (model, ref):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
    report, seen = guard_step(model, f"clip_norm:max_norm=0.5,norm_type={norm_type}", PATHS[path])
    expected = clip_grad_norm_(ref.parameters(), 0.5, norm_type=norm_type)
    for got, q in zip(seen, ref.parameters(), strict=True):
        assert torch.equal(got, q.grad)
    if norm_type == 2.0:
        assert report.grad_norm == float(expected)


@pytest.mark.parametrize("path", PATHS)
def test_clip_grad_norm_no_gradients_at_all(path):
    """torch returns a total norm of 0 and touches nothing when no parameter has a gradient."""
    lin = linear_with_grads(torch.float32, torch.zeros(100), None)
    lin.weight.grad = None
    assert float(clip_grad_norm_(list(lin.parameters()), 2.0)) == 0.0
    report, seen = guard_step(lin, "clip_norm:2", PATHS[path])
    assert seen == [None, None]
    assert report.grad_norm == 0.0 and not report.clipped and not report.skipped


@pytest.mark.parametrize("norm_type", [0.5, 2.0, 4.0])
def test_clip_grad_norm_zero_size_gradient(norm_type):
    """A zero-element gradient (a (3, 0) weight) contributes nothing to the norm; the others are
    clipped as without it, as torch does."""
    empty = nn.Parameter(torch.zeros(3, 0))
    empty.grad = torch.zeros(3, 0)
    w = nn.Parameter(torch.zeros(4, 2))
    w.grad = torch.full((4, 2), 3.0)
    raw = [empty.grad.clone(), w.grad.clone()]
    report, seen = guard_step(
        None, f"clip_norm:max_norm=1,norm_type={norm_type}", params=[empty, w]
    )
    _, want = torch_clip_norm(raw, torch.float32, 1.0, norm_type)
    assert seen[0].shape == (3, 0)
    assert torch.equal(seen[1], want[1])
    assert not report.skipped


def test_clip_grad_norm_inf_with_a_zero_size_gradient():
    empty = nn.Parameter(torch.zeros(3, 0))
    empty.grad = torch.zeros(3, 0)
    w = nn.Parameter(torch.zeros(4, 2))
    w.grad = torch.full((4, 2), 3.0)
    _, seen = guard_step(None, "clip_norm:max_norm=1,norm_type=inf", params=[empty, w])
    torch.testing.assert_close(seen[1], torch.full((4, 2), 3.0 / (3.0 + 1e-6)))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_complex_like_torch(norm_type, dtype):
    """Beyond torch's test: complex gradients (clip_grad_norm_ measures |z|), bit for bit."""
    gen = torch.Generator().manual_seed(1)
    w = nn.Parameter(torch.zeros(6, 4, dtype=dtype))
    b = nn.Parameter(torch.zeros(6, dtype=dtype))
    w.grad = torch.randn(6, 4, dtype=dtype, generator=gen) * 5
    b.grad = torch.randn(6, dtype=dtype, generator=gen) * 5
    raw = [w.grad.clone(), b.grad.clone()]
    _, seen = guard_step(None, f"clip_norm:max_norm=2,norm_type={norm_type}", params=[w, b])
    _, want = torch_clip_norm(raw, dtype, 2.0, norm_type)
    for got, exp in zip(seen, want, strict=True):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_mixed_float32_float64_like_torch(norm_type):
    """Beyond torch's test: a float32 and a float64 parameter (torch stacks their norms, promoted
    to float64); bit for bit."""
    gen = torch.Generator().manual_seed(2)
    a = nn.Parameter(torch.zeros(5, 3))
    b = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    for q in (a, b):
        q.grad = (torch.randn(q.shape, generator=gen, dtype=torch.float64) * 3).to(q.dtype)
    raw = [a.grad.clone(), b.grad.clone()]
    _, seen = guard_step(None, f"clip_norm:max_norm=1,norm_type={norm_type}", params=[a, b])
    ref = [nn.Parameter(torch.zeros_like(r)) for r in raw]
    for q, r in zip(ref, raw, strict=True):
        q.grad = r.clone()
    clip_grad_norm_(ref, 1.0, norm_type=norm_type)
    for got, q in zip(seen, ref, strict=True):
        assert torch.equal(got, q.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_low_precision_follows_the_rule(norm_type, dtype):
    """Beyond torch's test: fp16/bf16 gradients. torch measures their norm in the low dtype (for
    fp16 and norm_type=0.5 the total of these gradients overflows and torch zeroes them); the
    Guard accumulates in float32, so it is compared with the rule, to the dtype's precision."""
    gw, gb = big_grads()
    lin = linear_with_grads(dtype, gw, gb)
    raw = [lin.weight.grad.clone(), lin.bias.grad.clone()]
    _, seen = guard_step(lin, f"clip_norm:max_norm=2,norm_type={norm_type}")
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for got, exp in zip(seen, clip_norm_rule(raw, 2.0, norm_type), strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(wide(got), exp, rtol=tol, atol=1e-7)


@pytest.mark.parametrize("norm_type", [0.0, -1.0, -2.0, -INF])
def test_norm_types_torch_allows_but_clip_norm_refuses(norm_type):
    """torch's error_if_nonfinite test also runs norm types 0 and negatives; clip_norm refuses
    them (a 0-'norm' counts nonzeros and a negative one shrinks with the gradient: neither bounds
    a step)."""
    with pytest.raises(gradguard.SpecError, match="norm_type"):
        gradguard.clip_norm(max_norm=1.0, norm_type=norm_type)


# ----- TestNNDeviceType.test_clip_grad_value ---------------------------------------------------------
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("foreach", [False, True])
def test_clip_grad_value(foreach, with_bias, dtype):
    gw = torch.arange(-50.0, 50).view(10, 10).div_(5)
    gb = torch.ones(10).mul_(2) if with_bias else None
    lin = linear_with_grads(dtype, gw, gb)
    raw = [lin.weight.grad.clone(), None if gb is None else lin.bias.grad.clone()]
    report, seen = guard_step(lin, "clip_value:2.5")
    ref = [
        nn.Parameter(torch.zeros(10, 10, dtype=dtype)),
        nn.Parameter(torch.zeros(10, dtype=dtype)),
    ]
    for q, g in zip(ref, raw, strict=True):
        q.grad = None if g is None else g.clone()
    clip_grad_value_(ref, 2.5, foreach=foreach)
    for got, q in zip(seen, ref, strict=True):
        if q.grad is None:
            assert got is None
            continue
        assert torch.equal(got, q.grad)
        assert float(got.max()) <= 2.5 and float(got.min()) >= -2.5
        assert torch.equal(
            got, wide(raw[0] if got.ndim == 2 else raw[1]).clamp(-2.5, 2.5).to(dtype)
        )
    assert report.clipped
    # The norm after the clamp is the norm of what the optimizer got.
    assert report.grad_norm_after == pytest.approx(pnorm_exact(seen, 2.0), rel=1e-5)


def test_clip_grad_value_single_tensor_as_list():
    g = torch.arange(-50.0, 50).view(10, 10).div_(5)
    p1 = nn.Parameter(torch.randn(10, 10))
    p1.grad = g.clone()
    clip_grad_value_(p1, 2.5)
    p2 = nn.Parameter(torch.randn(10, 10))
    p2.grad = g.clone()
    _, seen = guard_step(None, "clip_value:2.5", params=[p2])
    assert torch.equal(seen[0], p1.grad)


def test_clip_grad_value_complex_refused_like_torch():
    """torch's clamp is undefined for complex: clip_grad_value_ raises; the Guard refuses at
    construction, naming the parameter."""
    p = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    p.grad = torch.ones(3, dtype=torch.complex64) * 5
    with pytest.raises(RuntimeError):
        clip_grad_value_([p], 2.5)
    with pytest.raises(gradguard.ConfigError, match="complex"):
        gradguard.Guard(None, Recorder([p]), "clip_value:2.5")


# ----- TestNNDeviceType.test_clip_grad_norm_error_if_nonfinite ------------------------------------------------
POS_NORMS = [0.1, 1.0, 2.0, 3.5, INF]  # its norms_pos (the Guard takes positive norm types only)
SCALARS = [INF, -INF, math.nan, 2e22, -2e22, 2e200, -2e200]


def nonfinite_case_params():
    """torch's grad layouts: the scalar in every element or only one, with or without a prefixed
    parameter whose gradient is 1."""
    out = []
    for one_elem in (False, True):
        for prefix in (False, True):
            for scalar in SCALARS:
                for p in POS_NORMS:
                    out.append(
                        pytest.param(
                            one_elem,
                            prefix,
                            scalar,
                            p,
                            id=f"{int(one_elem)}{int(prefix)}-{scalar:g}-p{p:g}",
                        )
                    )
    return out


def scalar_grad_params(scalar, one_elem, prefix):
    """torch's gen_parameters: ones(10) float64 whose gradient is ``scalar`` (in one element or
    all), optionally after ones(1) with gradient 1."""
    param = nn.Parameter(torch.ones(10, dtype=torch.float64))
    if one_elem:
        param[1].mul(scalar).sum().backward()
    else:
        param.mul(scalar).sum().backward()
    if not prefix:
        return [param]
    pre = nn.Parameter(torch.ones(1, dtype=torch.float64))
    pre.mul(1).sum().backward()
    return [pre, param]


@pytest.mark.parametrize(("one_elem", "prefix", "scalar", "norm_type"), nonfinite_case_params())
def test_clip_grad_norm_error_if_nonfinite_cases(one_elem, prefix, scalar, norm_type):
    params = scalar_grad_params(scalar, one_elem, prefix)
    raw = [q.grad.clone() for q in params]
    # What torch does: error_if_nonfinite=True raises exactly when its total p-norm is non-finite.
    torch_copy = [nn.Parameter(q.detach().clone()) for q in params]
    for q, g in zip(torch_copy, raw, strict=True):
        q.grad = g.clone()
    try:
        clip_grad_norm_(torch_copy, 1.0, norm_type=norm_type, error_if_nonfinite=True)
        torch_raised = False
    except RuntimeError as e:
        assert f"The total norm of order {float(norm_type)}" in str(e)
        torch_raised = True
        for q, g in zip(torch_copy, raw, strict=True):  # torch leaves the gradients alone
            torch.testing.assert_close(q.grad, g, rtol=0, atol=0, equal_nan=True)

    weights = [q.detach().clone() for q in params]
    opt = torch.optim.SGD(params, lr=1.0)
    seen: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([q.grad.clone() for q in params]))
    report = gradguard.Guard(None, opt, f"clip_norm:max_norm=1,norm_type={norm_type}").step()

    if not math.isfinite(scalar):
        # The Guard instead of torch's error: the step is skipped, nothing reaches the weights.
        assert torch_raised
        assert report.skipped and report.skip_reason == "nonfinite_grad"
        assert seen == []
        for q, w in zip(params, weights, strict=True):
            assert torch.equal(q.detach(), w)
        return
    # A finite gradient is never a non-finite step, even where torch's p-norm overflows.
    assert not report.skipped
    got = seen[0]
    want = clip_norm_rule(raw, 1.0, norm_type)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)
    if not torch_raised:
        # Where torch's norm is finite the Guard is bit-identical to it.
        for g, q in zip(got, torch_copy, strict=True):
            assert torch.equal(g, q.grad)


def test_float32_exploding_gradient_with_norm_type_4_is_clipped_not_zeroed():
    g = [torch.full((10, 10), 1e10), torch.full((10,), 1e10)]
    lin = linear_with_grads(torch.float32, *g)
    report, seen = guard_step(lin, "clip_norm:max_norm=2,norm_type=4")
    assert not report.skipped
    assert pnorm_exact(seen, 4.0) == pytest.approx(2.0, rel=1e-5)
