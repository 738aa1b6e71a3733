"""gradguard's ZClip against an independent reference (tests/reference/zclip_reference.py).

The policy is driven the way users drive it: a Guard around a small model, gradients assigned
directly, ``guard.step()``; the gradients the optimizer received are compared step by step with the
reference. Both of zclip's code paths are covered: the host-float path (the default Guard reads the
norm to the host for its non-finite check) and the device-tensor path (``check_finite=False``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard

from tests.reference.harness import Recorder, global_norm, set_grads_to_norm, spiky_norms
from tests.reference.zclip_reference import ZClipReference

RTOL = 1e-5


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def drive(norms, check_finite=True, chain=None, **kw):
    """Run gradguard's zclip and the reference over ``norms``; compare every step.

    Returns (policy, reference, per-step records) where each record is
    (reference threshold, reference coefficient, reference spike flag).
    """
    model = small_model()
    opt = Recorder(model.parameters())
    pol = gradguard.zclip(**kw)
    policy = pol if chain is None else chain(pol)
    guard = gradguard.Guard(model, opt, policy=policy, check_finite=check_finite)
    ref = ZClipReference(**kw)
    records = []
    for i, target in enumerate(norms):
        grads_in = set_grads_to_norm(model, target, seed=1000 + i)
        norm = global_norm(grads_in)
        n_before = len(opt.seen)
        report = guard.step()
        thr, coef, spike = ref.step(norm)
        records.append((thr, coef, spike, ref.last_z))
        if not math.isfinite(norm):
            if check_finite:
                assert report.skipped, f"step {i}: non-finite gradient was not skipped"
                assert len(opt.seen) == n_before, f"step {i}: optimizer stepped on NaN/Inf"
            else:
                assert len(opt.seen) == n_before + 1
            continue
        assert not report.skipped, f"step {i}"
        got = opt.seen[-1]
        for k, (g_in, g_out) in enumerate(zip(grads_in, got, strict=True)):
            expected = g_in * coef
            torch.testing.assert_close(
                g_out.to(torch.float64),
                expected,
                rtol=RTOL,
                atol=1e-7 * max(1.0, norm * coef),
                msg=lambda m, i=i, k=k, coef=coef, thr=thr: (
                    f"step {i} param {k}: ref thr={thr} coef={coef}: {m}"
                ),
            )
            if coef == 1.0 and not (thr < math.inf and norm > thr * (1 - 1e-4)):
                # Not clipped by the reference (and not a near-tie): bit-identical.
                assert torch.equal(g_out.to(torch.float64), g_in), f"step {i} param {k} touched"
        # The same metrics on both paths (the device path once left out zclip.spike).
        assert report.metrics["zclip.spike"] == float(spike), f"step {i}"
        reported = report.metrics["zclip.threshold"]
        if math.isinf(thr):
            assert math.isinf(reported), f"step {i}: threshold {reported}, reference inf"
        else:
            assert reported == pytest.approx(thr, rel=RTOL), f"step {i}"
    return pol, ref, records


def host_state(pol) -> dict:
    return pol.state_dict()  # saved in host form whichever path ran


def assert_state_matches(pol, ref):
    st_ = host_state(pol)
    assert st_["initialized"] == ref.initialized
    if ref.initialized:
        assert st_["mean"] == pytest.approx(ref.mean, rel=RTOL)
        assert st_["var"] == pytest.approx(ref.var, rel=1e-4, abs=1e-12)
    else:
        assert st_["buffer"] == pytest.approx(ref.buffer, rel=RTOL)


PATHS = pytest.mark.parametrize("check_finite", [True, False], ids=["host_path", "device_path"])


def assert_path(pol, check_finite):
    """Prove which implementation ran: host floats, or 0-dim tensors on the device."""
    if check_finite:
        assert isinstance(pol.state["mean"], float)
    else:
        assert isinstance(pol.state["mean"], torch.Tensor)


# ----- long sequences against the reference --------------------------------------------------------
@PATHS
@pytest.mark.parametrize("seed", [0, 1])
def test_long_spiky_sequence_matches_reference(check_finite, seed):
    norms = spiky_norms(300, seed=seed)
    pol, ref, rec = drive(norms, check_finite=check_finite)
    assert_path(pol, check_finite)
    assert_state_matches(pol, ref)
    # Not vacuous: several spikes were clipped to an adaptive threshold after warmup.
    clipped = [i for i, (thr, coef, spike, _) in enumerate(rec) if spike and coef < 0.5]
    assert len(clipped) >= 5, clipped
    assert all(i >= 25 for i in clipped)


@PATHS
def test_nonfinite_steps_do_not_reach_state(check_finite):
    """NaN/Inf steps during warmup and after: the statistics learn only from finite norms."""
    norms = spiky_norms(120, seed=3, n_spikes=3, n_nonfinite=0)
    for k in (2, 10, 11, 24, 40, 41, 42, 90):
        norms[k] = (math.nan, math.inf, -math.inf)[k % 3]
    pol, ref, _ = drive(norms, check_finite=check_finite)
    assert_path(pol, check_finite)
    assert_state_matches(pol, ref)
    # The reference finishes warmup only after 25 *finite* norms (step 28 with 4 NaNs before it).
    finite_seen = 0
    for k, x in enumerate(norms):
        finite_seen += math.isfinite(x)
        if finite_seen == 25:
            assert k == 28
            break


def test_zclip_before_skip_nonfinite_does_not_learn_from_nan():
    """With the chain ``zclip+skip_nonfinite`` zclip sees the NaN step before it is cancelled."""
    norms = spiky_norms(150, seed=4, n_nonfinite=6)
    pol, ref, _ = drive(norms, chain=lambda p: [p, gradguard.skip_nonfinite()])
    assert_state_matches(pol, ref)


# ----- warmup ----------------------------------------------------------------------------------------
@PATHS
def test_warmup_never_clips_without_max_norm(check_finite):
    # Huge spikes inside the warmup window: no clipping, gradients bit-identical.
    norms = [1.0 + 0.1 * k for k in range(25)]
    norms[3], norms[17] = 500.0, 2000.0
    norms += [1.5] * 5 + [1e5]  # after warmup a (much larger) spike is clipped
    pol, ref, rec = drive(norms, check_finite=check_finite)
    assert all(coef == 1.0 for _, coef, _, _ in rec[:25])
    assert rec[-1][2] and rec[-1][1] < 0.05
    # Warmup statistics: mean and population variance of the 25 warmup norms (then 5 EMA steps).
    assert_state_matches(pol, ref)


@PATHS
def test_warmup_with_max_norm_clips_to_max_norm(check_finite):
    norms = [0.5, 3.0, 0.7, 10.0, 0.9, 1.9] * 5
    pol, ref, rec = drive(norms, check_finite=check_finite, warmup=10, max_norm=2.0)
    warm = rec[:10]
    assert [c < 1.0 for _, c, _, _ in warm] == [x > 2.0 for x in norms[:10]]
    assert_state_matches(pol, ref)


def test_warmup_statistics_are_mean_and_population_variance():
    norms = [float(x) for x in np.random.default_rng(7).lognormal(0.0, 0.4, size=25)]
    pol, _, _ = drive(norms)
    st_ = pol.state_dict()
    assert st_["initialized"]
    assert st_["mean"] == pytest.approx(float(np.mean(norms)), rel=RTOL)
    assert st_["var"] == pytest.approx(float(np.var(norms)), rel=1e-4)  # ddof=0


# ----- options ---------------------------------------------------------------------------------------
@PATHS
@pytest.mark.parametrize(
    "kw",
    [
        {"max_norm": 1.8},  # caps both the adaptive threshold and un-spiked norms
        {"clip_option": "mean"},
        {"skip_update_on_spike": True},
        {"clip_factor": 0.7, "z_thresh": 2.0, "alpha": 0.9},
        {"warmup": 5, "eps": 1e-3},
    ],
    ids=["max_norm", "mean", "skip_update", "factor_alpha_z", "short_warmup"],
)
def test_options_match_reference(check_finite, kw):
    norms = spiky_norms(250, seed=11, n_spikes=10)
    pol, ref, rec = drive(norms, check_finite=check_finite, **kw)
    assert_path(pol, check_finite)
    assert_state_matches(pol, ref)
    zs = [z for *_, z in rec if z is not None]
    zt = kw.get("z_thresh", 2.5)
    # The spike decision is a threshold on z: no step may sit so close that float32 vs float64
    # could flip it (this guards the test's own validity, not gradguard).
    assert min(abs(z - zt) for z in zs) > 1e-3
    if "max_norm" in kw:
        capped = [c for thr, c, s, z in rec if thr == kw["max_norm"] and c < 1.0 and not s]
        assert capped, "max_norm never capped an un-spiked norm: test is vacuous"


@PATHS
def test_max_norm_caps_adaptive_threshold(check_finite):
    # A moderate spike right after warmup: its adaptive threshold (~1.96) is above max_norm, so
    # the cap wins for clipping, while the EMA learns from the uncapped adaptive value.
    norms = [0.5, 1.5] * 12 + [0.5] + [2.6]
    pol, ref, rec = drive(norms, check_finite=check_finite, max_norm=1.6)
    thr, coef, spike, _ = rec[-1]
    assert spike and thr == 1.6 and coef == pytest.approx(1.6 / 2.6, rel=1e-6)
    assert_state_matches(pol, ref)
    pol_free, _ref_free, rec_free = drive(norms, check_finite=check_finite)
    assert rec_free[-1][2] and rec_free[-1][0] > 1.9  # without the cap the threshold is higher
    # The EMA saw the same (uncapped) adaptive value with or without the cap.
    assert pol.state_dict()["mean"] == pytest.approx(pol_free.state_dict()["mean"], rel=RTOL)


@PATHS
def test_skip_update_on_spike_freezes_ema(check_finite):
    norms = [1.0 + 0.1 * math.sin(k) for k in range(25)] + [40.0, 60.0, 80.0]
    pol, _ref, rec = drive(norms, check_finite=check_finite, skip_update_on_spike=True)
    assert all(s for _, _, s, _ in rec[25:])
    warm = norms[:25]
    mean = sum(warm) / 25
    var = sum((x - mean) ** 2 for x in warm) / 25
    assert pol.state_dict()["mean"] == pytest.approx(mean, rel=1e-6)
    assert pol.state_dict()["var"] == pytest.approx(var, rel=1e-4)
    pol2, ref2, _ = drive(norms, check_finite=check_finite)
    assert_state_matches(pol2, ref2)
    # Without the option the three clipped spikes move the statistics.
    assert abs(pol2.state_dict()["var"] - var) > 0.05 * var


@pytest.mark.parametrize("switch_at", [10, 100])
def test_state_moves_between_paths(switch_at):
    """Host state saved mid-run loads into a device-path zclip and continues like the reference."""
    norms = spiky_norms(200, seed=5)
    ref = ZClipReference()
    model = small_model()
    opt = Recorder(model.parameters())
    p1 = gradguard.zclip()
    g1 = gradguard.Guard(model, opt, policy=p1)
    p2 = gradguard.zclip()
    g2 = gradguard.Guard(model, opt, policy=p2, check_finite=False)
    for i, target in enumerate(norms):
        if not math.isfinite(target):
            continue
        grads_in = set_grads_to_norm(model, target, seed=i)
        if i == switch_at:
            p2.load_state_dict(p1.state_dict())
        (g1 if i < switch_at else g2).step()
        _, coef, _ = ref.step(global_norm(grads_in))
        got = opt.seen[-1]
        for g_in, g_out in zip(grads_in, got, strict=True):
            torch.testing.assert_close(g_out.double(), g_in * coef, rtol=RTOL, atol=1e-7)
    assert isinstance(p2.state["mean"], torch.Tensor)
    assert_state_matches(p2, ref)


# ----- properties ------------------------------------------------------------------------------------
baseline = st.lists(st.floats(0.2, 5.0), min_size=6, max_size=20)


@settings(max_examples=40, deadline=None)
@given(
    base=baseline,
    last=st.floats(0.01, 1e4),
    check_finite=st.booleans(),
    max_norm=st.one_of(st.none(), st.floats(0.1, 50.0)),
)
def test_property_post_clip_norm_direction_and_untouched(base, last, check_finite, max_norm):
    warmup = 5
    norms = [*base, last]
    model = small_model()
    opt = Recorder(model.parameters())
    guard = gradguard.Guard(
        model,
        opt,
        policy=gradguard.zclip(warmup=warmup, max_norm=max_norm),
        check_finite=check_finite,
    )
    ref = ZClipReference(warmup=warmup, max_norm=max_norm)
    for i, target in enumerate(norms):
        grads_in = set_grads_to_norm(model, target, seed=i)
        norm = global_norm(grads_in)
        report = guard.step()
        thr, _, _ = ref.step(norm)
        if ref.last_z is not None and abs(ref.last_z - ref.z_thresh) < 1e-3:
            continue  # a float32-vs-float64 tie on the spike decision: not this test's subject
        got = [g.double() for g in opt.seen[-1]]
        after = global_norm(got)
        assert after <= thr * (1 + 1e-5) + 1e-6, (i, after, thr)
        assert report.metrics["zclip.threshold"] == pytest.approx(thr, rel=1e-5)
        flat_in = torch.cat([g.reshape(-1) for g in grads_in])
        flat_out = torch.cat([g.reshape(-1) for g in got])
        cos = float(flat_in @ flat_out) / (norm * after)
        assert cos == pytest.approx(1.0, abs=1e-6)
        if norm < thr * (1 - 1e-5):
            assert all(torch.equal(a, b) for a, b in zip(got, grads_in, strict=True)), (
                "below the threshold the gradient must be untouched"
            )
