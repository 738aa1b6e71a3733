"""gradguard's AutoClip against an independent reference (tests/reference/autoclip_reference.py):
a plain Python list of every global norm, ``numpy.percentile`` and torch-style clipping.

Also: property tests for ``clip_norm``, the fixed-threshold clip AutoClip generalises.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard

from tests.helpers import slow_except
from tests.reference.autoclip_reference import AutoClipReference
from tests.reference.harness import Recorder, global_norm, set_grads_to_norm, spiky_norms

RTOL = 1e-5


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def drive(norms, percentile, history=None, check_finite=True, max_history=100_000, compare=True):
    """Run gradguard's autoclip and the reference over ``norms``, comparing every finite step.

    Returns (policy, reference, list of (reference threshold, coef), list of reported thresholds).
    """
    model = small_model()
    opt = Recorder(model.parameters())
    pol = gradguard.autoclip(percentile=percentile, history=history, max_history=max_history)
    guard = gradguard.Guard(model, opt, policy=pol, check_finite=check_finite)
    ref = AutoClipReference(percentile=percentile, window=history)
    rec, reported = [], []
    for i, target in enumerate(norms):
        grads_in = set_grads_to_norm(model, target, seed=i)
        norm = global_norm(grads_in)
        n_before = len(opt.seen)
        report = guard.step()
        thr, coef = ref.step(norm)
        rec.append((thr, coef))
        if not math.isfinite(norm):
            if check_finite:
                assert report.skipped and len(opt.seen) == n_before, f"step {i}"
            reported.append(math.nan)
            continue
        assert not report.skipped
        got_thr = report.metrics["autoclip.threshold"]
        reported.append(got_thr)
        if not compare:
            continue
        assert got_thr == pytest.approx(thr, rel=RTOL), f"step {i}: threshold"
        for k, (g_in, g_out) in enumerate(zip(grads_in, opt.seen[-1], strict=True)):
            torch.testing.assert_close(
                g_out.double(),
                g_in * coef,
                rtol=RTOL,
                atol=1e-7 * max(1.0, norm),
                msg=lambda m, i=i, k=k, thr=thr: f"step {i} param {k} (ref thr {thr}): {m}",
            )
            if coef == 1.0 and norm < thr * (1 - 1e-4):
                assert torch.equal(g_out.double(), g_in), f"step {i} param {k} touched"
    return pol, ref, rec, reported


# ----- percentile correctness -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("history", "percentile"),
    # Fast: each history and each percentile once (the ends 0 and 100 included).
    slow_except(
        [(h, q) for q in (0, 10, 50, 90, 100) for h in (None, 1, 7, 64)],
        *[(None, 0), (1, 10), (7, 50), (64, 90), (None, 100)],
    ),
)
def test_spiky_sequence_matches_reference(percentile, history):
    norms = spiky_norms(300, seed=percentile + (history or 0))
    _, ref, rec, _ = drive(norms, percentile, history)
    if percentile < 100 and history != 1:
        # Not vacuous: the spikes (and many ordinary steps) were clipped.
        assert sum(c < 0.5 for _, c in rec if c == c) >= 5
    assert all(math.isfinite(x) for x in ref.history)


@pytest.mark.parametrize("percentile", [10, 90])
def test_long_history_buffer_growth(percentile):
    """1200 steps: the sorted buffer grows past its first 1024 slots; still numpy.percentile."""
    norms = spiky_norms(1200, seed=9, n_spikes=30, n_nonfinite=10)
    pol, ref, _, _ = drive(norms, percentile)
    n_finite = sum(math.isfinite(x) for x in norms)
    assert len(ref.history) == n_finite == 1190 > 1024
    assert int(pol.state["n_valid"]) == n_finite


@pytest.mark.parametrize("history", [None, 5])
def test_check_finite_false_same_on_finite_sequence(history):
    norms = [x for x in spiky_norms(300, seed=21) if math.isfinite(x)]
    drive(norms, 10, history, check_finite=False)


def test_nonfinite_never_enters_history_without_skip():
    """With check_finite=False the NaN/Inf steps reach autoclip; they must not move the threshold."""
    norms = spiky_norms(400, seed=22, n_nonfinite=12)
    pol, ref, _, _ = drive(norms, 50, None, check_finite=False)
    assert int(pol.state["n_valid"]) == len(ref.history) == 388


def test_nonfinite_never_enters_history():
    # One NaN early on: with the reference's naive list it would poison every later percentile.
    norms = [1.0, 2.0, math.nan, 3.0, math.inf, 4.0, -math.inf, 5.0]
    _, _, _, reported = drive(norms, 50)
    expected = [1.0, 1.5, math.nan, 2.0, math.nan, 2.5, math.nan, 3.0]
    for r, e in zip(reported, expected, strict=True):
        assert (math.isnan(r) and math.isnan(e)) or r == pytest.approx(e, rel=1e-6)


def test_window_forgets_old_norms():
    # A window of 3 over an increasing-then-flat sequence: the threshold is the window's median.
    norms = [10.0, 20.0, 30.0, 1.0, 1.0, 1.0, 2.0]
    _, _, _rec, reported = drive(norms, 50, history=3)
    assert reported == pytest.approx([10.0, 15.0, 20.0, 20.0, 1.0, 1.0, 1.0], rel=1e-6)


# ----- bounded memory: reservoir beyond max_history -------------------------------------------------
def fractional_rank(history: np.ndarray, value: float) -> float:
    """Where ``value`` sits in the sorted full history, as a fraction in [0, 1] (interpolated)."""
    h = np.sort(history)
    return float(np.interp(value, h, np.arange(h.size)) / (h.size - 1))


def dkw_bound(m: int, delta: float = 1e-3) -> float:
    """Dvoretzky-Kiefer-Wolfowitz: a uniform sample of m values has its empirical CDF within this
    of the population's with probability 1 - delta (sampling without replacement is no worse);
    plus 2/m for the interpolation between sample points."""
    return math.sqrt(math.log(2 / delta) / (2 * m)) + 2 / m


def test_exact_up_to_max_history():
    m = 64
    xs = np.random.default_rng(4).lognormal(0.0, 0.5, m)
    for q in (0, 10, 50, 90, 100):
        pol = gradguard.autoclip(percentile=q, max_history=m)
        for x in xs:
            pol.observe(torch.tensor(float(x)))
        assert float(pol.threshold()) == pytest.approx(np.percentile(xs, q), rel=1e-6)


@pytest.mark.parametrize("drift", ["iid", "drifting"])
@pytest.mark.parametrize("percentile", [10, 50, 90])
def test_reservoir_percentile_tracks_the_whole_history(drift, percentile):
    """Past max_history the buffer is a uniform sample of every norm seen: its percentile sits
    within the DKW bound, in rank, of the whole history's, also when norms drift (as in training:
    a scheme that favours recent norms fails here)."""
    m, n = 256, 3000
    rng = np.random.default_rng(13)
    noise = 0.3 * rng.standard_normal(n)
    trend = np.linspace(0.0, 3.0, n) if drift == "drifting" else np.zeros(n)
    norms = [float(x) for x in np.exp(trend + noise)]
    pol = gradguard.autoclip(percentile=percentile, max_history=m)
    worst = 0.0
    for i, x in enumerate(norms):
        pol.observe(torch.tensor(x))
        if i >= 4 * m and i % 7 == 0:
            thr = float(pol.threshold())
            worst = max(
                worst, abs(fractional_rank(np.array(norms[: i + 1]), thr) - percentile / 100)
            )
    assert pol.state["sorted"].numel() <= m + 1 and pol.state["size"] == m
    assert worst <= dkw_bound(m), worst


def test_reservoir_keeps_old_and_new_norms_alike():
    """After 20x max_history norms, each fifth of the history is about a fifth of the sample."""
    m, n = 500, 10_000
    pol = gradguard.autoclip(max_history=m)
    for i in range(n):
        pol.observe(torch.tensor(float(i)))  # the value is its arrival index
    kept = np.sort(pol.state["ring"].numpy())
    counts = np.histogram(kept, bins=5, range=(0, n))[0]
    # Binomial(m, 1/5): mean 100, sd ~9; 5 sd either way.
    assert counts.sum() == m and all(abs(c - m / 5) <= 45 for c in counts), counts


def test_reservoir_through_the_guard_and_resume():
    """The sample is drawn from the step count alone: a resumed policy continues identically."""
    m = 32
    rng = np.random.default_rng(2)
    norms = [float(x) for x in rng.lognormal(0.0, 0.5, 400)]
    a = gradguard.autoclip(max_history=m)
    for x in norms:
        a.observe(torch.tensor(x))
    b = gradguard.autoclip(max_history=m)
    for x in norms[:150]:
        b.observe(torch.tensor(x))
    c = gradguard.autoclip(max_history=m)
    c.load_state_dict(b.state_dict())
    for x in norms[150:]:
        c.observe(torch.tensor(x))
    assert torch.equal(a.state["sorted"], c.state["sorted"])
    _, _, _, reported = drive(norms, 50, max_history=m, compare=False)
    assert all(math.isfinite(r) for r in reported)


# ----- properties ------------------------------------------------------------------------------------
def float32_percentile_slack(history: list[float], percentile: float) -> float:
    """How far float32 arithmetic (the Guard's history lives on the device in float32) may move
    ``numpy.percentile(history, percentile)``: each value is rounded once (eps * max), and the
    interpolation position ``percentile / 100 * (n - 1)`` is rounded (eps * pos) before it weights
    the spread between the two neighbours (at most max - min)."""
    eps = 2.0**-23
    pos = percentile / 100.0 * (len(history) - 1)
    return eps * (max(history) + (pos + 1.0) * (max(history) - min(history)))


@settings(max_examples=40, deadline=None)
@given(
    base=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=30),
    last=st.floats(1e-3, 1e5),
    percentile=st.floats(0.0, 100.0),
    history=st.one_of(st.none(), st.integers(1, 10)),
)
# float32 rounds the interpolation position 4.0125; the spread 168 amplifies it to 1e-5 relative
@example(base=[1.0] * 5, last=169.0, percentile=80.25, history=None)
def test_property_autoclip_post_clip_norm_direction_untouched(base, last, percentile, history):
    norms = [*base, last]
    model = small_model()
    opt = Recorder(model.parameters())
    guard = gradguard.Guard(
        model, opt, policy=gradguard.autoclip(percentile=percentile, history=history)
    )
    ref = AutoClipReference(percentile=percentile, window=history)
    for i, target in enumerate(norms):
        grads_in = set_grads_to_norm(model, target, seed=i)
        norm = global_norm(grads_in)
        guard.step()
        thr, _ = ref.step(norm)
        slack = float32_percentile_slack(ref.history, percentile)
        got = [g.double() for g in opt.seen[-1]]
        after = global_norm(got)
        assert after <= thr * (1 + 1e-5) + slack, (i, after, thr)
        # never shrinks below the threshold
        assert min(thr, norm) * (1 - 1e-5) - 1e-6 - slack <= after, (i, after, thr)
        cos = float(
            torch.cat([g.reshape(-1) for g in grads_in]) @ torch.cat([g.reshape(-1) for g in got])
        ) / (norm * after)
        assert cos == pytest.approx(1.0, abs=1e-6)
        if norm + 1e-6 < thr * (1 - 1e-5) - slack:
            assert all(torch.equal(a, b) for a, b in zip(got, grads_in, strict=True))


@settings(max_examples=60, deadline=None)
@given(
    target=st.floats(1e-4, 1e6),
    max_norm=st.floats(1e-3, 1e3),
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 4)), min_size=1, max_size=4),
    check_finite=st.booleans(),
)
def test_property_clip_norm(target, max_norm, shapes, check_finite):
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = Recorder(params)
    guard = gradguard.Guard(
        None, opt, policy=gradguard.clip_norm(max_norm), check_finite=check_finite
    )
    holder = nn.ParameterList(params)
    grads_in = set_grads_to_norm(holder, target, seed=len(shapes))
    norm = global_norm(grads_in)
    report = guard.step()
    got = [g.double() for g in opt.seen[-1]]
    after = global_norm(got)
    assert after <= max_norm * (1 + 1e-5)
    # torch's clip_grad_norm_ semantics, epsilon included: g * min(1, c / (||g|| + 1e-6)).
    assert after == pytest.approx(norm * min(1.0, max_norm / (norm + 1e-6)), rel=2e-5)
    assert report.grad_norm == pytest.approx(norm, rel=1e-5)  # the pre-clip norm is reported
    cos = float(
        torch.cat([g.reshape(-1) for g in grads_in]) @ torch.cat([g.reshape(-1) for g in got])
    ) / (norm * after)
    assert cos == pytest.approx(1.0, abs=1e-6)
    if norm + 1e-6 <= max_norm * (1 - 1e-6):
        assert all(torch.equal(a, b) for a, b in zip(got, grads_in, strict=True))
