"""adaptive_clip against its reference twin (tests/reference/adaptive_clip_reference.py), on both
paths (host floats and device tensors), and the properties the default relies on: no scale, a
robust start, a healthy run left alone, a sustained change admitted slowly."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

import gradguard
from gradguard.policies import adaptive_clip
from gradguard.policies.rule import HostInputs, to_torch
from gradguard.policies.xp import HOST, TORCH

from tests.reference.adaptive_clip_reference import AdaptiveClipReference
from tests.reference.harness import Recorder, global_norm, set_grads_to_norm

PATHS = pytest.mark.parametrize("check_finite", [True, False], ids=["host_path", "device_path"])


def stream(n=300, seed=0, scale=1.0):
    rng = random.Random(seed)
    out = [scale * rng.lognormvariate(0, 0.4) for _ in range(n)]
    for i in (i for i in (40, 41, 120, 200) if i < n):
        out[i] *= 1e3  # spikes
    if n > 81:
        out[60] = 0.0
        out[80] = math.nan
        out[81] = math.inf
    for i in range(150, min(170, n)):
        out[i] *= 20  # a burst
    return out


@PATHS
@pytest.mark.parametrize(
    "kw",
    [{}, {"window": 5, "z": 2.0, "min_factor": 1.5, "max_factor": 4}, {"hold": 7, "window": 16}],
)
def test_the_guard_clips_as_the_reference(check_finite, kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = Recorder(model.parameters())
    guard = gradguard.Guard(model, opt, gradguard.adaptive_clip(**kw), check_finite=check_finite)
    ref = AdaptiveClipReference(**kw)
    for i, target in enumerate(stream()):
        grads_in = set_grads_to_norm(model, target, seed=100 + i)
        norm = global_norm(grads_in)
        report = guard.step()
        thr, coef = ref.step(norm)
        if not math.isfinite(norm):
            continue
        for g_in, g_out in zip(grads_in, opt.seen[-1], strict=True):
            torch.testing.assert_close(g_out.double(), g_in * coef, rtol=1e-5, atol=1e-9)
        got = report.metrics["adaptive_clip.threshold"]
        assert (math.isinf(got) and math.isinf(thr)) or got == pytest.approx(thr, rel=1e-5), i
        assert report.clipped == (coef < 1.0), i


@pytest.mark.parametrize("hold", [0, 5])
def test_host_and_torch_paths_are_one_rule(hold):
    pol = adaptive_clip(window=16, hold=hold)
    host = dict(pol.state)
    dev = to_torch(pol.fields(), pol.state, torch.device("cpu"))

    class Inputs:
        def __init__(self, x):
            self.norm = torch.tensor(x, dtype=torch.float64)

    for x in stream(100, seed=3):
        host, dh = pol.decide(HOST, host, HostInputs(x))
        dev, dt = pol.decide(TORCH, dev, Inputs(x))
        a, b = dh.metrics["adaptive_clip.threshold"], float(dt.metrics["adaptive_clip.threshold"])
        assert (math.isinf(a) and math.isinf(b)) or a == pytest.approx(b, rel=1e-6)  # float32
        assert bool(dh.acted) == bool(dt.acted)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0])
def test_no_threshold_depends_on_the_models_scale(scale):
    """The same norms times any constant: the same decisions, thresholds times the constant."""
    base, scaled = adaptive_clip(), adaptive_clip()
    sb, ss = dict(base.state), dict(scaled.state)
    for x in stream(200, seed=1):
        sb, db = base.decide(HOST, sb, HostInputs(x))
        ss, ds = scaled.decide(HOST, ss, HostInputs(x * scale))
        assert bool(db.acted) == bool(ds.acted)
        t1, t2 = db.metrics["adaptive_clip.threshold"], ds.metrics["adaptive_clip.threshold"]
        assert (math.isinf(t1) and math.isinf(t2)) or t2 == pytest.approx(t1 * scale, rel=1e-9)


def test_a_healthy_noisy_run_is_almost_never_clipped():
    for seed in range(5):
        rng = random.Random(seed)
        pol, st = adaptive_clip(), None
        st = dict(pol.state)
        clipped = 0
        for _ in range(2000):
            st, d = pol.decide(HOST, st, HostInputs(rng.lognormvariate(0, 0.6)))
            clipped += bool(d.acted)
        assert clipped / 2000 < 0.02, (seed, clipped)


def test_an_explosion_at_the_first_step_is_outvoted_by_the_next_norms():
    pol = adaptive_clip()
    st = dict(pol.state)
    st, _ = pol.decide(HOST, st, HostInputs(1e6))  # step 0 explodes
    for _ in range(2):
        st, _ = pol.decide(HOST, st, HostInputs(1.0))
    st, d = pol.decide(HOST, st, HostInputs(50.0))  # a spike at step 3 is clipped near 1
    assert d.acted and d.metrics["adaptive_clip.threshold"] <= 8.0


def test_nothing_is_blind_while_the_window_fills():
    pol = adaptive_clip()
    st = dict(pol.state)
    st, d0 = pol.decide(HOST, st, HostInputs(2.0))
    assert not d0.acted and math.isinf(d0.metrics["adaptive_clip.threshold"])
    st, d1 = pol.decide(HOST, st, HostInputs(2000.0))  # the second step already has a level
    assert d1.acted and d1.metrics["adaptive_clip.threshold"] == pytest.approx(2.0 * 2.5)


def test_a_sustained_rise_is_admitted_slowly_and_a_runaway_is_not():
    pol = adaptive_clip(window=32)
    st = dict(pol.state)
    for _ in range(32):
        st, _ = pol.decide(HOST, st, HostInputs(1.0))
    levels, thresholds = [], []
    for _ in range(200):  # the norm jumps to 1000 and stays
        st, d = pol.decide(HOST, st, HostInputs(1000.0))
        levels.append(d.metrics["adaptive_clip.level"])
        thresholds.append(d.metrics["adaptive_clip.threshold"])
    # The level (the window's median) rises by at most min_factor per half window, the
    # threshold stays within [min_factor, max_factor] of it...
    assert thresholds[15] <= 8.0 * 1.0001
    for a, b in zip(levels, levels[32:], strict=False):
        assert b <= a * 2.5**2 * 1.0001  # two half windows: min_factor twice
    for lv, t in zip(levels, thresholds, strict=True):
        assert 2.5 * lv * 0.9999 <= t <= 8.0 * lv * 1.0001
    # ...and the new level is admitted in the end, not clipped forever.
    assert levels[-1] == pytest.approx(1000.0) and thresholds[-1] >= 2499.0


def test_state_round_trips_and_resumes_exactly():
    a = adaptive_clip(window=8)
    sa = dict(a.state)
    xs = stream(60, seed=5)
    for x in xs[:30]:
        sa, _ = a.decide(HOST, sa, HostInputs(x))
    a.state = sa
    b = adaptive_clip(window=8)
    saved = a.state_dict()
    b.check_state(saved)
    b.load_state_dict(saved)
    sb = dict(b.state)
    for x in xs[30:]:
        sa, da = a.decide(HOST, sa, HostInputs(x))
        sb, db = b.decide(HOST, sb, HostInputs(x))
        assert da.metrics == db.metrics


@pytest.mark.parametrize(
    "kw", [{"z": 0}, {"min_factor": 1.0}, {"max_factor": 2.0}, {"window": 0}, {"window": 1.5}]
)
def test_bad_parameters_are_refused(kw):
    with pytest.raises(gradguard.SpecError):
        adaptive_clip(**kw)
