"""Event detection on step records: spikes named by layer, non-finite layers in backward order,
vanishing layers, loss spikes, AMP overflows; and quiet on steady training."""

from __future__ import annotations

import math
import random

from gradguard.diagnose.events import EventDetector

LAYERS = ["embed", "block0", "block1", "head"]


def rec(step, layer_norms, loss=1.0, **kw):
    norm = math.sqrt(sum(v * v for v in layer_norms))
    r = {
        "step": step,
        "loss": loss,
        "grad_norm": norm,
        "layer_norms": list(layer_norms),
        "nonfinite_layers": [i for i, v in enumerate(layer_norms) if not math.isfinite(v)],
        "skipped": False,
        "clipped": False,
        "rolled_back": False,
        "skip_reason": None,
    }
    r.update(kw)
    return r


def steady(rng, step, scale=1.0):
    return [scale * b * math.exp(rng.gauss(0, 0.1)) for b in (0.5, 1.0, 1.0, 2.0)]


def run(det, n, start=0, seed=0, mods=None):
    mods = mods or {}
    rng = random.Random(seed)
    events = []
    for s in range(start, start + n):
        norms = steady(rng, s)
        for i, f in mods.get(s, {}).items():
            norms[i] *= f
        events += det.observe(rec(s, norms, loss=2.0 * math.exp(rng.gauss(0, 0.05))))
    return events


def test_steady_training_raises_no_event():
    det = EventDetector(LAYERS, [0, 1, 2, 3])
    assert run(det, 3000) == []


def test_a_global_spike_is_named_with_the_layer_that_made_it():
    det = EventDetector(LAYERS, [0, 1, 2, 3])
    events = run(det, 200, mods={150: {1: 40.0}})
    spikes = [e for e in events if e["kind"] == "grad_spike"]
    assert len(spikes) == 1 and spikes[0]["step"] == 150
    e = spikes[0]
    assert e["layers"][0] == "block0"
    top = e["detail"]["ranked"][0]
    assert top["name"] == "block0" and top["share"] > 0.9 and top["z"] > 6
    assert e["detail"]["z"] > 4


def test_a_small_layer_spiking_alone_is_a_layer_spike():
    det = EventDetector(LAYERS, [0, 1, 2, 3])
    events = run(det, 200, mods={120: {0: 3.0}})  # x3 in the smallest layer: global norm +~10%
    kinds = [(e["kind"], e["layers"], e["step"]) for e in events]
    assert kinds == [("layer_spike", ["embed"], 120)]


def test_nonfinite_layers_are_listed_from_where_backward_starts():
    det = EventDetector(LAYERS, [0, 1, 2, 3])
    run(det, 30)
    nan = float("nan")
    events = det.observe(rec(30, [nan, nan, nan, 2.0]))
    assert events[0]["kind"] == "nonfinite_grad"
    assert events[0]["layers"] == ["block1", "block0", "embed"]
    # The statistics did not learn from it: the next normal step is quiet.
    assert det.observe(rec(31, [0.5, 1.0, 1.0, 2.0])) == []


def test_nonfinite_loss_is_its_own_event():
    det = EventDetector(LAYERS)
    events = det.observe(rec(0, [1.0] * 4, loss=float("inf")))
    assert [e["kind"] for e in events] == ["nonfinite_loss"]


def test_a_vanishing_layer_is_reported_once():
    det = EventDetector(LAYERS, vanish_steps=10)
    rng = random.Random(1)
    events = []
    for s in range(200):
        norms = steady(rng, s)
        if s >= 100:
            norms[2] *= 1e-6
        events += det.observe(rec(s, norms))
    van = [e for e in events if e["kind"] == "vanishing"]
    assert len(van) == 1 and van[0]["layers"] == ["block1"] and van[0]["step"] == 109


def test_a_layer_without_gradient_from_the_start_is_not_vanishing():
    det = EventDetector(LAYERS)
    events = [det.observe(rec(s, [0.0, 1.0, 1.0, 2.0]))[:] for s in range(100)]
    assert not any(events)


def test_loss_spike():
    det = EventDetector(LAYERS)
    rng = random.Random(2)
    events = []
    for s in range(100):
        loss = 2.0 * math.exp(rng.gauss(0, 0.05)) * (20.0 if s == 80 else 1.0)
        events += det.observe(rec(s, steady(rng, s), loss=loss))
    assert [(e["kind"], e["step"]) for e in events] == [("loss_spike", 80)]


def test_amp_overflow_is_reported_and_not_learned():
    det = EventDetector(LAYERS)
    run(det, 50)
    inf = float("inf")
    e = det.observe(rec(50, [inf] * 4, skip_reason="amp_overflow", skipped=True, amp_scale=1024.0))
    assert [x["kind"] for x in e] == ["amp_overflow"] and e[0]["action"] == "skipped"
    assert run(det, 50, start=51, seed=5) == []


def test_a_new_level_stops_being_a_spike():
    det = EventDetector(LAYERS, persist=5)
    mods = {s: {i: 10.0 for i in range(4)} for s in range(100, 300)}
    events = run(det, 300, mods=mods)
    spikes = [e for e in events if e["kind"] == "grad_spike"]
    assert 1 <= len(spikes) <= 5
    assert all(e["step"] < 110 for e in spikes)


def test_action_is_what_the_guard_did():
    det = EventDetector(LAYERS)
    run(det, 50)
    e = det.observe(rec(50, [50.0, 1.0, 1.0, 2.0], clipped=True))
    assert e and all(x["action"] == "clipped" for x in e)
