"""The array namespace and the rules written against it: the host (Python floats) and torch
(tensors) give the same numbers, so the torch Guard's two paths and Keras share one rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gradguard
from gradguard.policies.autoclip import percentile_sorted, sorted_insert, sorted_remove
from gradguard.policies.lr_backoff import backoff_scale
from gradguard.policies.rule import HostInputs, to_host, to_torch
from gradguard.policies.skip import is_spike
from gradguard.policies.xp import HOST, TORCH

T = torch.tensor


def test_scalar_ops_agree():
    for a, b in [(1.5, 2.0), (2.0, -1.0), (math.inf, 3.0), (0.0, 0.0)]:
        ta, tb = T(a), T(b)
        assert HOST.minimum(a, b) == float(TORCH.minimum(ta, b)) == float(TORCH.minimum(ta, tb))
        assert HOST.maximum(a, b) == float(TORCH.maximum(ta, b)) == float(TORCH.maximum(ta, tb))
        assert HOST.where(a > b, a, b) == float(TORCH.where(ta > tb, ta, tb))
        assert HOST.isfinite(a) == bool(TORCH.isfinite(ta))
    assert HOST.isfinite(math.nan) is False and not bool(TORCH.isfinite(T(math.nan)))
    assert HOST.power(0.9, 3.0) == pytest.approx(float(TORCH.power(0.9, T(3.0))), rel=1e-6)


def test_buffer_ops_agree():
    buf = [0.5, 2.0, 1.25, 0.0]
    got = HOST.put(buf, 2, 7.0, True)
    assert got == [0.5, 2.0, 7.0, 0.0] and buf[2] == 1.25  # a new list
    assert HOST.put(buf, 2, 7.0, False) is buf
    tbuf = T(buf)
    assert TORCH.put(tbuf, T(2), T(7.0), T(True)).tolist() == got
    assert TORCH.put(tbuf, T(2), T(7.0), T(False)).tolist() == buf
    m, v = HOST.moments(buf)
    tm, tv = TORCH.moments(tbuf)
    assert (m, v) == pytest.approx((float(np.mean(buf)), float(np.var(buf))))
    assert (float(tm), float(tv)) == pytest.approx((m, v), rel=1e-6)
    assert HOST.moments(buf, used=False) == (0.0, 0.0)
    for n in (0, 1, 3, 4):
        hm, hv = HOST.window_moments(buf, n)
        tm, tv = TORCH.window_moments(tbuf, T(n))
        assert (float(tm), float(tv)) == pytest.approx((hm, hv), rel=1e-6)
        if n >= 2:
            assert (hm, hv) == pytest.approx((np.mean(buf[:n]), np.var(buf[:n], ddof=1)))
    asc = [0.5, 1.0, 1.0, 3.0]
    for x in (0.0, 1.0, 2.0, 9.0):
        for right in (False, True):
            assert HOST.searchsorted(asc, x, right) == int(TORCH.searchsorted(T(asc), T(x), right))
    assert HOST.take(asc, 3.0) == float(TORCH.take(T(asc), T(3.0))) == 3.0
    for a in (0, 5, 6, 13):
        assert HOST.mod(a, 6) == int(TORCH.mod(T(a), 6)) == a % 6
    steps = [7, -1, 3, 12]
    for x in (-5, 0, 3, 8, 13):
        masked = HOST.mask_below(steps, x, -1)
        assert masked == [v if v >= x else -1 for v in steps]
        assert TORCH.mask_below(T(steps), x, -1).tolist() == masked
        assert HOST.count_at_least(steps, x) == int(TORCH.count_at_least(T(steps), T(x)))
        assert HOST.count_at_least(steps, x) == sum(v >= x for v in steps)
    for n in (0, 2, 4):
        kept = HOST.keep_first(buf, n)
        assert kept == [*buf[:n], *[0.0] * (4 - n)] and len(buf) == 4
        assert TORCH.keep_first(tbuf, T(n)).tolist() == kept


def test_ring_trend_is_numpys_line_through_the_ring_in_order():
    rng = np.random.default_rng(0)
    for size, count in [(8, 0), (8, 1), (8, 2), (8, 5), (8, 8), (8, 13), (5, 21), (32, 40)]:
        written = (3.0 - 0.1 * np.arange(count) + rng.normal(0, 0.2, count)).tolist()
        ring = [0.0] * size
        for i, v in enumerate(written):
            ring[i % size] = v
        pred, mad = HOST.ring_trend(ring, count)
        tpred, tmad = TORCH.ring_trend(T(ring, dtype=torch.float64), T(count))
        held = written[-size:]
        if len(held) < 2:
            assert pred == mad == float(tpred) == float(tmad) == math.inf
            continue
        x = np.arange(len(held))
        slope, intercept = np.polyfit(x, held, 1)
        res = np.asarray(held) - (intercept + slope * x)
        want = (intercept + slope * len(held), np.median(np.abs(res - np.median(res))))
        assert (pred, mad) == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert (float(tpred), float(tmad)) == pytest.approx(want, rel=1e-9, abs=1e-12)


norm_seq = st.lists(
    st.one_of(st.floats(0.01, 1e3), st.sampled_from([math.nan, math.inf, 1e5])),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(
    norms=norm_seq,
    kw=st.sampled_from(
        [
            {"warmup": 3},
            {"warmup": 5, "max_norm": 2.0},
            {"warmup": 4, "clip_option": "mean"},
            {"warmup": 3, "skip_update_on_spike": True, "z_thresh": 1.5},
        ]
    ),
)
@example(norms=[683.2901503759398] * 3, kw={"warmup": 3})  # float32 variance: 3.7e-9, not 0
def test_zclip_rule_host_and_torch_agree(norms, kw):
    """The one rule on Python floats and on tensors: the same spikes, thresholds and state."""
    pol = gradguard.zclip(**kw)
    fields = pol.fields()
    host = pol.state
    dev = to_torch(fields, host, torch.device("cpu"))
    for x in norms:
        host, hd = pol.decide(HOST, host, HostInputs(x))
        dev, td = pol.decide(TORCH, dev, HostInputs(T(x)))
        assert hd.metrics["zclip.spike"] == float(td.metrics["zclip.spike"])
        thr = float(td.metrics["zclip.threshold"])
        assert thr == pytest.approx(hd.metrics["zclip.threshold"], rel=1e-5)
        back = to_host(fields, dev)
        assert back["initialized"] == host["initialized"] and back["n"] == host["n"]
        assert back["mean"] == pytest.approx(host["mean"], rel=1e-5)
        # float32 holds the device state: a variance of values near m is off by ~m^2 * 2^-24
        # (identical norms of 683 give 3.7e-9 where the host has 0).
        assert back["var"] == pytest.approx(
            host["var"], rel=1e-4, abs=1e-6 * (1 + host["mean"] ** 2)
        )


def test_skip_spike_and_lr_backoff_rules_agree():
    p = gradguard.skip_spike(z=2.0, window=6)
    window = [1.0, 1.2, 0.9, 1.1]
    ring = T([*window, 0.0, 0.0])
    for x in (1.05, 1.6, 30.0, math.nan, math.inf):
        want = is_spike(HOST, p, window, x)
        assert bool(is_spike(TORCH, p, ring, T(x), filled=T(len(window)))) == want
    assert is_spike(HOST, p, window, 30.0) and not is_spike(HOST, p, window, 1.05)
    assert not is_spike(HOST, p, [1.0], 30.0)  # fewer than two values before it
    b = gradguard.lr_backoff(factor=0.5, events=2, window=5, recover=4)
    for scale, event, n, last, step in [
        (1.0, True, 2, 3, 4),
        (1.0, True, 1, -1, 4),
        (0.5, False, 1, 3, 9),
        (0.5, False, 1, 3, 5),
        (0.001, True, 2, 3, 4),
    ]:
        hs, hc = backoff_scale(HOST, b, scale, event, n, last, step)
        ts, tc = backoff_scale(TORCH, b, T(scale), T(event), T(n), T(last), T(step))
        assert float(ts) == pytest.approx(hs, rel=1e-6) and bool(tc) == hc


def test_sorted_history_helpers():
    rng = np.random.default_rng(0)
    buf = torch.full((9,), math.inf)
    kept: list[float] = []
    for x in rng.lognormal(size=8).astype(np.float32):
        buf = sorted_insert(TORCH, buf, T(float(x)))
        kept.append(float(x))
        assert buf[: len(kept)].tolist() == sorted(kept)
        for q in (0.0, 10.0, 50.0, 100.0):
            got = float(percentile_sorted(TORCH, buf, T(len(kept)), q))
            assert got == pytest.approx(float(np.percentile(kept, q)), rel=1e-6)
    buf = sorted_remove(TORCH, buf, T(kept[3]))
    kept.pop(3)
    assert buf[: len(kept)].tolist() == sorted(kept) and math.isinf(buf[-2])
    assert math.isinf(float(percentile_sorted(TORCH, torch.full((3,), math.inf), T(0), 50.0)))
