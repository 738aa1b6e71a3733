"""optax's own clipping test cases, re-expressed in torch and run through the Guard.

Ported from google-deepmind/optax ``optax/transforms/_clipping_test.py`` (``ClippingTest``) and the
docstring examples of ``optax/transforms/_clipping.py``; the optax rules are re-implemented below
from that file:

- ``clip(max_delta)``: elementwise clamp                                  -> ``clip_value``
- ``clip_by_global_norm(max_norm)``: ``t`` if ``norm < max_norm`` else ``t / norm * max_norm``
                                                                          -> ``clip_norm``
- ``clip_by_block_rms(threshold)``: per leaf ``u / max(1, rms(u) / threshold)``
                                   -> ``clip_layerwise:max_norm=threshold*sqrt(numel)`` with every
                                      leaf its own layer (a Guard without a model)
- ``adaptive_grad_clip(clipping, eps)``: unit-wise AGC; optax's units are the last axis of JAX's
  IO / HWIO kernels (it reduces axis 0, or axes 0-2 for a 4-D kernel), torch's are dim 0 of its
  OI / OIHW weights, so kernels are transposed on the way in and out  -> ``agc``
- ``per_example_global_norm_clip`` / ``per_example_layer_norm_clip`` (DP-SGD): each example's
  gradient clipped on its own, then summed -> one Guard step per example (``clip_norm``, or
  ``clip_layerwise`` / one Guard per layer), the clipped gradients summed.

The one systematic difference: clip_norm (and clip_layerwise, AutoClip, ZClip) divide by
``norm + 1e-6`` as torch's clip_grad_norm_ does (the README claims bit-identity with torch), where
optax divides by the norm exactly. A gradient is therefore shrunk by a further ``1/(1 + 1e-6/norm)``
and one whose norm equals the threshold counts as clipped. Each port asserts the result to within
that epsilon; the few optax assertions that are tighter than it are kept verbatim in strict xfails
(design divergences, not bugs). Not ported: the Conv3D ``axis=`` and 3-D multi-head cases (the
Guard's AGC has no ``axis``; its units are always dim 0) and ``unitwise_norm``'s rank errors (the
Guard takes any rank).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard

from tests.reference.harness import Recorder

STEPS = 50  # optax's STEPS
EPS = 1e-6  # torch's (and the Guard's) clip_grad_norm_ epsilon


def init_params(dtype=torch.float32):
    """optax's setUp: init_params and per_step_updates, two leaves of shape (2,)."""
    return [torch.tensor([1.0, 2.0], dtype=dtype), torch.tensor([3.0, 4.0], dtype=dtype)]


def per_step_updates(dtype=torch.float32):
    return [torch.tensor([500.0, 5.0], dtype=dtype), torch.tensor([300.0, 3.0], dtype=dtype)]


class Leaves:
    """Bare parameters (no module: every parameter is its own layer) under one Guard."""

    def __init__(self, values, spec, check_finite=True):
        self.params = [nn.Parameter(v.clone()) for v in values]
        self.opt = Recorder(self.params)
        self.guard = gradguard.Guard(None, self.opt, spec, check_finite=check_finite)

    def update(self, grads):
        """One Guard step on ``grads``: (what the optimizer was handed, the report)."""
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g.clone()
        report = self.guard.step()
        return self.opt.seen[-1], report


def global_norm(ts) -> float:
    return math.sqrt(sum(float(t.abs().double().square().sum()) for t in ts))


def rms(t) -> float:
    return math.sqrt(float(t.double().square().mean()))


def rms32(t) -> float:
    """optax's rmf_fn, in the update's own float32 (as the literal assertions are)."""
    return float(t.square().mean().sqrt())


def global_norm32(ts) -> float:
    """optax.tree.norm in float32."""
    return float(torch.stack([t.square().sum() for t in ts]).sum().sqrt())


# ----- optax's rules, written out ---------------------------------------------------------------------
def wide(t):
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def optax_clip_by_global_norm(ts, max_norm):
    n = global_norm(ts)
    return [wide(t) if n < max_norm else wide(t) / n * max_norm for t in ts]


def optax_unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """optax.transforms._clipping.unitwise_norm on a JAX-layout array, broadcast to its shape."""
    x = x.double()
    if x.squeeze().ndim <= 1:
        sq = x.square().sum()
    elif x.ndim in (2, 3):
        sq = x.square().sum(dim=0, keepdim=True)
    elif x.ndim == 4:
        sq = x.square().sum(dim=(0, 1, 2), keepdim=True)
    else:
        raise ValueError(x.shape)
    return sq.sqrt().expand_as(x)


def optax_agc(grads, params, clipping, eps=1e-3):
    out = []
    for g, p in zip(grads, params, strict=True):
        g_norm, p_norm = optax_unitwise_norm(g), optax_unitwise_norm(p)
        max_norm = clipping * p_norm.clamp(min=eps)
        clipped = g.double() * (max_norm / g_norm.clamp(min=1e-6))
        out.append(torch.where(g_norm < max_norm, g.double(), clipped))
    return out


# ----- ClippingTest.test_clip -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_clip(dtype):
    updates = per_step_updates(dtype)
    # A delta high enough changes nothing.
    seen, report = Leaves(init_params(dtype), "clip_value:1e6").update(updates)
    for got, u in zip(seen, updates, strict=True):
        assert torch.equal(got, u)
    assert not report.clipped
    # delta=1 makes every update exactly 1.
    seen, report = Leaves(init_params(dtype), "clip_value:1.0").update(updates)
    for got in seen:
        assert torch.equal(got, torch.ones_like(got))
    assert report.clipped


# ----- ClippingTest.test_clip_by_global_norm ----------------------------------------------------------
@pytest.mark.parametrize("path", [True, False], ids=["host", "device"])
def test_clip_by_global_norm(path):
    """Re-clipping each step's output to 1/i: the norm is 1/i to within torch's epsilon, and
    the re-clipped update is the once-clipped one to within it too."""
    updates = per_step_updates()
    for i in range(1, STEPS + 1):
        max_norm = 1.0 / i
        n_in = global_norm(updates)
        updates, report = Leaves(init_params(), f"clip_norm:{max_norm!r}", path).update(updates)
        eps_shrink = EPS / n_in  # the extra relative shrink torch's +1e-6 causes
        assert global_norm(updates) == pytest.approx(max_norm, rel=1.5 * eps_shrink + 1e-6)
        assert global_norm(updates) <= max_norm * (1 + 1e-6)
        # Continuously clipping causes no numerical trouble: compare with clipping the originals.
        once, _ = Leaves(init_params(), f"clip_norm:{max_norm!r}", path).update(per_step_updates())
        for a, b, o in zip(
            updates, once, optax_clip_by_global_norm(per_step_updates(), max_norm), strict=True
        ):
            torch.testing.assert_close(a.double(), b.double(), rtol=1.5 * eps_shrink + 1e-6, atol=0)
            torch.testing.assert_close(b.double(), o, rtol=1e-6, atol=0)  # once: optax's rule
        assert report.clipped


def test_clip_by_global_norm_complex():
    """optax supports complex updates (abs_sq in its global norm); so does clip_norm."""
    updates = [
        torch.tensor([500 + 5j, 5 - 2j], dtype=torch.complex64),
        torch.tensor([300j, 3 + 0j], dtype=torch.complex64),
    ]
    params = [torch.zeros(2, dtype=torch.complex64)] * 2
    for max_norm in (1.0, 0.02, 1e3):
        seen, _ = Leaves(params, f"clip_norm:{max_norm!r}").update(updates)
        for got, want in zip(seen, optax_clip_by_global_norm(updates, max_norm), strict=True):
            torch.testing.assert_close(got.to(torch.complex128), want, rtol=1e-6, atol=0)


@pytest.mark.xfail(
    strict=True,
    reason=(
        "design divergence, not a bug: clip_norm is torch's rule g * max/(norm + 1e-6) (README: "
        "bit-identical to clip_grad_norm_), optax's is g / norm * max; re-clipping an update of "
        "norm ~1/(i-1) to 1/i leaves its norm 1e-6*(i-1)/i below 1/i (6.7e-7 at i=3), beyond "
        "optax's assertAlmostEqual(places=6)"
    ),
)
def test_clip_by_global_norm_at_optax_tolerance():
    updates = per_step_updates()
    for i in range(1, STEPS + 1):
        updates, _ = Leaves(init_params(), f"clip_norm:{1.0 / i!r}").update(updates)
        assert round(global_norm32(updates) - 1.0 / i, 6) == 0, f"i={i}"


# ----- ClippingTest.test_clip_by_block_rms ------------------------------------------------------------
def block_rms_spec(threshold: float, numel: int = 2) -> str:
    # rms(u) <= t  <=>  ||u|| <= t * sqrt(numel): a per-leaf norm clip (every leaf here has 2 elements)
    return f"clip_layerwise:max_norm={threshold * math.sqrt(numel)!r}"


def test_clip_by_block_rms():
    updates = per_step_updates()
    for i in range(1, STEPS + 1):
        thr = 1.0 / i
        n_in = min(global_norm([u]) for u in updates)
        updates, report = Leaves(init_params(), block_rms_spec(thr)).update(updates)
        for u in updates:
            assert rms(u) == pytest.approx(thr, rel=1.5 * EPS / n_in + 1e-6)
        once, _ = Leaves(init_params(), block_rms_spec(thr)).update(per_step_updates())
        for a, b, u in zip(updates, once, per_step_updates(), strict=True):
            torch.testing.assert_close(a.double(), b.double(), rtol=1.5 * EPS / n_in + 1e-6, atol=0)
            optax = u.double() / max(1.0, rms(u) / thr)
            torch.testing.assert_close(b.double(), optax, rtol=1e-6, atol=0)
        assert set(report.layers["clip_layerwise"]) == {"param.0", "param.1"}


@pytest.mark.xfail(
    strict=True,
    reason=(
        "design divergence, not a bug: clip_layerwise scales by a rounded factor "
        "max/(norm + 1e-6) like torch, optax divides by max(1, rms/threshold); at i=1 rms(u) is "
        "0.99999994 in float32 (1 ulp below optax's exact 1.0), and from i=2 on re-clipping "
        "leaves rms(u) = (1/i)(1 - 1e-6*(i-1)/sqrt(2)) (3.5e-7 off at i=2): beyond optax's "
        "assertAlmostEqual(places=7)"
    ),
)
def test_clip_by_block_rms_at_optax_tolerance():
    updates = per_step_updates()
    for i in range(1, STEPS + 1):
        updates, _ = Leaves(init_params(), block_rms_spec(1.0 / i)).update(updates)
        for u in updates:
            assert round(rms32(u) - 1.0 / i, 7) == 0, f"i={i}"


# ----- ClippingTest.test_adaptive_grad_clip ------------------------------------------------------------
@pytest.mark.parametrize("path", [True, False], ids=["host", "device"])
def test_adaptive_grad_clip_1d_leaves(path):
    """optax's 1-D leaves (one unit each): after clipping to 1/i of the parameter norm the update
    norm is at most that (+1e-6); re-clipping equals clipping the originals. AGC has no epsilon in
    its denominator (only max(||g||, 1e-6)), so optax's own tolerances hold."""
    params = init_params()
    updates = per_step_updates()
    for i in range(1, STEPS + 1):
        c = 1.0 / i
        spec = f"agc:clipping={c!r},exclude_head=false"
        updates, report = Leaves(params, spec, path).update(updates)
        for u, p in zip(updates, params, strict=True):
            assert float(u.norm()) - c * float(p.norm()) < 1e-6
        once, _ = Leaves(params, spec, path).update(per_step_updates())
        want = optax_agc(per_step_updates(), params, c)
        for a, b, w in zip(updates, once, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)  # chex.assert_trees_all_close
            torch.testing.assert_close(b.double(), w, rtol=1e-6, atol=0)
        assert report.clipped


def test_adaptive_grad_clip_2d_default():
    """optax: grads [[1,2],[3,4]] (IO layout), params ones, clipping=1: each unit's clipped
    norm is at most the parameter's (+1e-6). In torch's OI layout the units are the rows of the
    transpose."""
    g_io = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    p_io = torch.ones_like(g_io)
    seen, report = Leaves([p_io.T.contiguous()], "agc:clipping=1.0,exclude_head=false").update(
        [g_io.T.contiguous()]
    )
    got_io = seen[0].T
    assert torch.all(optax_unitwise_norm(got_io) <= optax_unitwise_norm(p_io) + 1e-6)
    torch.testing.assert_close(
        got_io.double(), optax_agc([g_io], [p_io], 1.0)[0], rtol=1e-6, atol=0
    )
    assert report.clipped


@pytest.mark.parametrize("clipping", [0.01, 0.5, 2.0])
def test_adaptive_grad_clip_4d_conv_kernel(clipping):
    """optax's 4-D (HWIO) rule reduces H, W, I: per output channel, torch's dim 0 of OIHW."""
    gen = torch.Generator().manual_seed(3)
    p_hwio = torch.randn(3, 3, 4, 5, generator=gen)
    p_hwio[..., 0] = 0.0  # an all-zero unit: the eps floor sets its max norm
    g_hwio = torch.randn(3, 3, 4, 5, generator=gen) * torch.tensor([0.001, 0.1, 1.0, 10.0, 100.0])
    to_oihw = (3, 2, 0, 1)
    spec = f"agc:clipping={clipping!r},exclude_head=false"
    seen, _ = Leaves([p_hwio.permute(to_oihw).contiguous()], spec).update(
        [g_hwio.permute(to_oihw).contiguous()]
    )
    got_hwio = seen[0].permute(2, 3, 1, 0)
    want = optax_agc([g_hwio], [p_hwio], clipping)[0]
    torch.testing.assert_close(got_hwio.double(), want, rtol=1e-6, atol=1e-12)


def test_adaptive_grad_clip_no_clip_when_clipping_is_large():
    """optax's test_adaptive_grad_clip_with_axis, its un-clipped part (without axis=): small
    gradients under clipping=2 are unchanged."""
    p = torch.ones(4, 3, 2, 2)
    g = torch.ones(4, 3, 2, 2) * 0.1
    seen, report = Leaves([p], "agc:clipping=2.0,exclude_head=false").update([g])
    assert torch.equal(seen[0], g)
    assert not report.clipped


# ----- ClippingTest.test_per_example_global_norm_clip --------------------------------------------------
def per_example(spec_or_guards, examples):
    """Clip each example's gradients in its own Guard step; return (sum of clipped, reports)."""
    leaves = spec_or_guards
    total = None
    reports = []
    for ex in examples:
        seen, rep = leaves.update(ex)
        reports.append(rep)
        total = (
            [s.double() for s in seen]
            if total is None
            else [t + s.double() for t, s in zip(total, seen, strict=True)]
        )
    return total, reports


def test_per_example_global_norm_clip():
    g0 = torch.tensor([[0.0, -0.5], [3, 4], [5, 6], [0, 0]])  # 4 examples, 2 components
    g1 = torch.tensor([[0.0], [5], [-3], [0]])
    answer = [
        torch.tensor([0.0, -0.5])
        + torch.tensor([3.0, 4]) / math.sqrt(50)
        + torch.tensor([5.0, 6]) / math.sqrt(70),
        torch.tensor([0.0])
        + torch.tensor([5.0]) / math.sqrt(50)
        + torch.tensor([-3.0]) / math.sqrt(70),
    ]
    leaves = Leaves([torch.zeros(2), torch.zeros(1)], "clip_norm:1.0")
    total, reports = per_example(leaves, [[g0[b], g1[b]] for b in range(4)])
    for got, want in zip(total, answer, strict=True):
        torch.testing.assert_close(got, want.double(), atol=1e-6, rtol=0)
    assert sum(r.clipped for r in reports) == 2


@pytest.mark.parametrize(("clip", "expected", "n_clipped"), [(1.25, 1.75, 3)])
def test_per_example_global_norm_clip_docstring(clip, expected, n_clipped):
    """The docstring example: rows of norm 5 clipped to 1.25 sum to 1.75 in every component."""
    grads = torch.tensor([[0.0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])
    leaves = Leaves([torch.zeros(3)], f"clip_norm:{clip}")
    total, reports = per_example(leaves, [[grads[b]] for b in range(4)])
    torch.testing.assert_close(
        total[0], torch.full((3,), expected, dtype=torch.float64), rtol=1e-6, atol=0
    )
    assert sum(r.clipped for r in reports) == n_clipped


@pytest.mark.parametrize("clip", [0.0, math.inf])
def test_per_example_clip_thresholds_optax_takes_but_clip_norm_refuses(clip):
    """optax's docstring also clips to inf (nothing clipped) and 0 (everything zeroed); clip_norm
    takes a finite max_norm > 0 only."""
    with pytest.raises(gradguard.SpecError, match="max_norm"):
        gradguard.clip_norm(max_norm=clip)


# ----- ClippingTest.test_per_example_layer_norm_clip ---------------------------------------------------
def layer_grads():
    """Two layers, batch of 4: shape (1,) and (3, 3, 2)."""
    return torch.tensor([[0.5], [1.5], [-2.0], [3.0]]), torch.ones(4, 3, 3, 2)


def test_per_example_layer_norm_clip_uniform():
    """global clip sqrt(2) over K=2 layers: each layer clipped to 1 -> sums 1.5 and 4/sqrt(18);
    3 and 4 examples clipped. One Guard, clip_layerwise with every parameter its own layer."""
    g0, g1 = layer_grads()
    per_layer = math.sqrt(2) * (1.0 / 2) ** 0.5
    leaves = Leaves(
        [torch.zeros(1), torch.zeros(3, 3, 2)], f"clip_layerwise:max_norm={per_layer!r}"
    )
    total, reports = per_example(leaves, [[g0[b], g1[b]] for b in range(4)])
    # 0.5 + 1.5*c + -2*c + 3*c with c the torch-epsilon factors: 1.5 to within 3e-6 (optax: 7 places)
    assert float(total[0]) == pytest.approx(1.5, abs=3e-6)
    torch.testing.assert_close(
        total[1], torch.full((3, 3, 2), 4 / math.sqrt(18), dtype=torch.float64), rtol=1e-5, atol=0
    )
    clipped = [
        [name in r.layers.get("clip_layerwise", ()) for name in ("param.0", "param.1")]
        for r in reports
    ]
    assert [sum(c[k] for c in clipped) for k in (0, 1)] == [3, 4]


def scaled_variant():
    """global clip sqrt(19), layer sizes 1 and 18: per-layer clips sqrt(19)*sqrt(D_i/19) = 1 and
    sqrt(18), a different threshold per layer, so one Guard (clip_norm) per layer."""
    g0, g1 = layer_grads()
    c = math.sqrt(19)
    lay0 = Leaves([torch.zeros(1)], f"clip_norm:{c * math.sqrt(1 / 19)!r}")
    lay1 = Leaves([torch.zeros(3, 3, 2)], f"clip_norm:{c * math.sqrt(18 / 19)!r}")
    t0, r0 = per_example(lay0, [[g0[b]] for b in range(4)])
    t1, r1 = per_example(lay1, [[g1[b]] for b in range(4)])
    return t0[0], t1[0], sum(r.clipped for r in r0), sum(r.clipped for r in r1)


def test_per_example_layer_norm_clip_scaled():
    s0, s1, n0, n1 = scaled_variant()
    assert float(s0) == pytest.approx(1.5, abs=3e-6)
    torch.testing.assert_close(
        s1, torch.full((3, 3, 2), 4.0, dtype=torch.float64), rtol=1e-6, atol=0
    )
    assert n0 == 3
    # optax: the layer-1 norms equal their clip, so none is clipped; torch's rule (norm + 1e-6 >
    # max) counts all four, each shrunk by 1/(1 + 1e-6/sqrt(18)).
    assert n1 == 4


@pytest.mark.xfail(
    strict=True,
    reason=(
        "design divergence, not a bug: a layer whose norm equals its clip norm (sqrt(18)) is "
        "'clipped' under torch's rule (norm + 1e-6 > max) and scaled by 1/(1 + 2.4e-7), so optax's "
        "num_clipped[1] == 0 and element == 4.0 (places=7) do not hold; the uniform variant's "
        "sum is 1.5 - 1.1e-6, also beyond places=7"
    ),
)
def test_per_example_layer_norm_clip_at_optax_tolerance():
    s0, s1, _, n1 = scaled_variant()
    assert n1 == 0
    assert all(round(float(x) - 4.0, 7) == 0 for x in s1.flatten())
    assert round(float(s0) - 1.5, 7) == 0
