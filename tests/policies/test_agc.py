"""gradguard's AGC against an independent per-parameter reference (tests/reference/agc_reference.py),
and its choice of which parameters to leave alone (the output head, ``exclude`` globs)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard

from tests.reference.agc_reference import agc_clip, agc_reference
from tests.reference.harness import Recorder

RTOL = 1e-5


class Scale(nn.Module):
    """A learnable 0-dim scalar (e.g. a temperature)."""

    def __init__(self, value: float = 0.7):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(value))

    def forward(self, x):
        return x * self.s


class AGCNet(nn.Module):
    """Conv2d (4-D weight, 1-D bias) -> LayerNorm (1-D) -> Scale (0-dim) -> fc -> head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.scale = Scale()
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            self.fc.bias.zero_()  # a zero weight: the eps floor sets its max norm

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        h = self.scale(self.norm(h))
        return self.head(torch.relu(self.fc(h)))


class HeadFirst(nn.Module):
    """The output layer is registered first but runs last: head detection must not be positional."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Linear(5, 8)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def make(cls, **agc_kw):
    torch.manual_seed(0)
    model = cls()
    opt = Recorder(model.parameters(), lr=0.05)  # real updates: AGC must read the current weights
    pol = gradguard.agc(**agc_kw)
    guard = gradguard.Guard(model, opt, policy=pol)
    with torch.no_grad():
        model(torch.randn(2, 2, 5, 5) if cls is AGCNet else torch.randn(2, 5))
    return model, opt, pol, guard


def set_unit_grads(model: nn.Module, seed: int) -> None:
    """Per unit (row), a random direction scaled log-uniformly over 1e-5..1: a mix of units far
    below and far above AGC's limit (0.01 x the unit's weight norm)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        g = torch.randn(p.shape, generator=gen)
        rows = p.shape[0] if p.ndim > 1 else 1
        scale = 10.0 ** (torch.rand(rows, generator=gen) * 5 - 5)
        p.grad = g * (scale.reshape((-1,) + (1,) * (p.ndim - 1)) if p.ndim > 1 else scale[0])


def run_and_compare(model, opt, guard, steps, excluded, clipping=0.01, eps=1e-3):
    """Step ``steps`` times; compare what the optimizer received with the reference.

    Returns, per parameter name, how many units the reference clipped over all steps.
    """
    names = [n for n, _ in model.named_parameters()]
    clipped_units = dict.fromkeys(names, 0)
    unclipped_units = dict.fromkeys(names, 0)
    for step in range(steps):
        set_unit_grads(model, seed=step)
        triples = [
            (n, p.detach().double().numpy().copy(), p.grad.double().numpy().copy())
            for n, p in model.named_parameters()
        ]
        expected = agc_reference(triples, clipping, eps, excluded)
        report = guard.step()
        assert not report.skipped
        for (name, _, g_in), got in zip(triples, opt.seen[-1], strict=True):
            exp, mask = expected[name]
            if mask is None:  # excluded: the gradient is untouched, bit for bit
                assert np.array_equal(got.double().numpy(), g_in), f"step {step}: {name} touched"
                continue
            np.testing.assert_allclose(
                got.double().numpy(), exp, rtol=RTOL, atol=1e-12, err_msg=f"step {step}: {name}"
            )
            clipped_units[name] += int(mask.sum())
            unclipped_units[name] += int((~mask).sum())
            # Units the reference left alone are bit-identical.
            out = got.double().numpy()
            if got.ndim > 1:
                assert np.array_equal(out[~mask], g_in[~mask]), f"step {step}: {name}"
            elif not mask[0]:
                assert np.array_equal(out, g_in), f"step {step}: {name}"
    return clipped_units, unclipped_units


# ----- against the reference -------------------------------------------------------------------------
@pytest.mark.parametrize("check_finite", [True, False])
def test_matches_reference_default_excludes_head(check_finite):
    torch.manual_seed(0)
    model = AGCNet()
    opt = Recorder(model.parameters(), lr=0.05)
    guard = gradguard.Guard(model, opt, policy="agc", check_finite=check_finite)
    with torch.no_grad():
        model(torch.randn(2, 2, 5, 5))
    clipped, unclipped = run_and_compare(
        model, opt, guard, steps=8, excluded={"head.weight", "head.bias"}
    )
    # Not vacuous: every kind of tensor (4-D, 2-D, 1-D, 0-dim, zero weight) got clipped at least
    # once, and the multi-unit tensors also had units left alone.
    for name in ["conv.weight", "conv.bias", "norm.weight", "scale.s", "fc.weight", "fc.bias"]:
        assert clipped[name] > 0, name
    for name in ["conv.weight", "fc.weight"]:
        assert unclipped[name] > 0, name


@pytest.mark.parametrize("clipping,eps", [(0.05, 1e-3), (0.002, 0.1)])
def test_matches_reference_custom_clipping_eps_with_head(clipping, eps):
    model, opt, _, guard = make(AGCNet, clipping=clipping, eps=eps, exclude_head=False)
    clipped, _ = run_and_compare(
        model, opt, guard, steps=5, excluded=set(), clipping=clipping, eps=eps
    )
    assert clipped["head.weight"] > 0  # exclude_head=False: the head is clipped too


def test_eps_floor_on_zero_weight():
    # fc.bias is all zeros: its max norm is clipping * eps = 1e-5, not 0 (which would zero it).
    model, opt, _, guard = make(AGCNet)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.fc.bias.grad = torch.full_like(model.fc.bias, 1e-3)  # norm 1e-3 * sqrt(6)
    guard.step()
    got = opt.seen[-1][[n for n, _ in model.named_parameters()].index("fc.bias")]
    assert float(got.norm()) == pytest.approx(0.01 * 1e-3, rel=1e-5)


# ----- which parameters are left alone --------------------------------------------------------------
def test_head_registered_first_is_still_excluded():
    model, opt, pol, guard = make(HeadFirst)
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["head.weight", "head.bias"]  # registered first...
    excluded = {guard.layout.names[i] for i in pol.excluded_params()}
    assert excluded == {"head.weight", "head.bias"}  # ...found as the head by running last
    clipped, _ = run_and_compare(model, opt, guard, steps=4, excluded=excluded)
    assert clipped["body.weight"] > 0 and clipped["body.bias"] > 0


def test_head_registered_first_exclude_head_false():
    model, opt, pol, guard = make(HeadFirst, exclude_head=False)
    assert pol.excluded_params() == set()
    clipped, _ = run_and_compare(model, opt, guard, steps=4, excluded=set())
    assert clipped["head.weight"] > 0


@pytest.mark.parametrize(
    "exclude,expected",
    [
        (("fc",), {"fc.weight", "fc.bias", "head.weight", "head.bias"}),  # a layer name
        (("*.bias",), {"conv.bias", "norm.bias", "fc.bias", "head.weight", "head.bias"}),
        (("conv*", "scale.s"), {"conv.weight", "conv.bias", "scale.s", "head.weight", "head.bias"}),
        (("no_such_*",), {"head.weight", "head.bias"}),
    ],
)
def test_exclude_globs(exclude, expected):
    model, opt, pol, guard = make(AGCNet, exclude=exclude)
    assert {guard.layout.names[i] for i in pol.excluded_params()} == expected
    run_and_compare(model, opt, guard, steps=3, excluded=expected)


def test_exclude_glob_without_head_exclusion():
    model, opt, pol, guard = make(AGCNet, exclude=("norm",), exclude_head=False)
    expected = {"norm.weight", "norm.bias"}
    assert {guard.layout.names[i] for i in pol.excluded_params()} == expected
    run_and_compare(model, opt, guard, steps=3, excluded=expected)


def test_exclude_glob_from_spec_string():
    torch.manual_seed(0)
    model = AGCNet()
    opt = Recorder(model.parameters(), lr=0.05)
    guard = gradguard.Guard(model, opt, policy="agc:exclude=fc|scale")
    with torch.no_grad():
        model(torch.randn(2, 2, 5, 5))
    expected = {"fc.weight", "fc.bias", "scale.s", "head.weight", "head.bias"}
    run_and_compare(model, opt, guard, steps=2, excluded=expected)


def test_no_forward_seen_falls_back_to_last_registered_with_warning():
    torch.manual_seed(0)
    model = HeadFirst()
    opt = Recorder(model.parameters())
    pol = gradguard.agc()
    guard = gradguard.Guard(model, opt, policy=pol)
    set_unit_grads(model, 0)
    with pytest.warns(UserWarning, match="forward pass"):
        guard.step()
    assert {guard.layout.names[i] for i in pol.excluded_params()} == {"body.weight", "body.bias"}


class RootScaled(nn.Module):
    """A model with a parameter on the root module itself (like CLIP's ``logit_scale``)."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x))) * self.logit_scale


def test_head_detection_with_parameter_on_root_module():
    """The root owns a parameter (CLIP's logit_scale) and its forward returns last: the head is
    still the last layer to start."""
    torch.manual_seed(0)
    model = RootScaled()
    opt = Recorder(model.parameters())
    pol = gradguard.agc()
    guard = gradguard.Guard(model, opt, policy=pol)
    with torch.no_grad():
        model(torch.randn(2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_unit_grads(model, 0)
        guard.step()
    assert {guard.layout.names[i] for i in pol.excluded_params()} == {"head.weight", "head.bias"}


# ----- properties ------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple),
    w_scale=st.floats(1e-4, 10.0),
    g_scale=st.floats(1e-6, 1e3),
    clipping=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_unit_norms_bounded_direction_kept(shape, w_scale, g_scale, clipping, seed):
    gen = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(shape, generator=gen) * w_scale)
    g = torch.randn(shape, generator=gen) * g_scale
    opt = Recorder([w])
    guard = gradguard.Guard(None, opt, policy=gradguard.agc(clipping=clipping, exclude_head=False))
    w.grad = g.clone()
    guard.step()
    got = opt.seen[-1][0]
    exp, _ = agc_clip(w.detach().numpy(), g.numpy(), clipping)
    np.testing.assert_allclose(got.double().numpy(), exp, rtol=RTOL, atol=1e-12)
    # Each unit's norm is at most clipping * max(||w_unit||, eps), its direction unchanged, and
    # units under the limit are bit-identical.
    rows = lambda t: t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(1, -1)  # noqa: E731
    for w_u, g_u, o_u in zip(rows(w.detach()), rows(g), rows(got), strict=True):
        limit = clipping * max(float(w_u.double().norm()), 1e-3)
        assert float(o_u.double().norm()) <= limit * (1 + 1e-5) or torch.equal(o_u, g_u)
        if float(g_u.norm()) > 0:
            cos = float(o_u.double() @ g_u.double()) / float(
                o_u.double().norm() * g_u.double().norm()
            )
            assert cos == pytest.approx(1.0, abs=1e-6)
        if float(g_u.double().norm()) < limit * (1 - 1e-5):
            assert torch.equal(o_u, g_u)
