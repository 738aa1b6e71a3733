"""The LR range probe's reading of its runs: where unguarded training diverges, which run is the
healthy one, and the clip threshold as numpy's percentile of that run's recorded norms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradguard.advice.candidates import candidates, threshold_text
from gradguard.advice.probe import PROBE_FACTORS, analyze, probe_factors
from gradguard.policies import parse_spec

RNG = np.random.default_rng(0)


def fake_probe(diverged: dict[float, str | None], lr: float = 0.1):
    """Probe runs at PROBE_FACTORS; ``diverged[factor]`` is the divergence reason (None: trained).
    Each run's norms are random, with a NaN and an inf mixed in (never part of a percentile)."""
    entries, runs, steps = [], {}, {}
    for f in PROBE_FACTORS:
        key = f"k{f:g}"
        norms = list(RNG.lognormal(mean=math.log(1 + f), sigma=0.7, size=200))
        norms[5], norms[50] = math.nan, math.inf
        steps[key] = [{"step": i, "grad_norm": x, "loss": 1.0} for i, x in enumerate(norms)]
        reason = diverged.get(f)
        runs[key] = {
            "status": "done",
            "result": {
                "diverged": reason is not None,
                "diverged_reason": reason,
                "steps_run": 200,
                "final_train_loss": 0.5,
                "test_metric": 0.9,
            },
        }
        entries.append((f, float(f"{lr * f:.6g}"), key))
    return entries, runs, steps


def finite(xs):
    return [x for x in xs if math.isfinite(x)]


def test_a_healthy_user_lr_gives_numpys_percentile_of_its_own_norms():
    entries, runs, steps = fake_probe(
        {3.0: "nonfinite_weights", 10.0: "nonfinite_weights", 30.0: "loss_blowup"}
    )
    probe = analyze(entries, runs, lambda k: steps[k], percentile=90)
    assert probe.diverges_at == 3.0 and probe.trains_up_to == 1.0
    assert probe.healthy.factor == 1.0 and probe.scale == 1.0
    norms = finite(s["grad_norm"] for s in steps["k1"])
    assert probe.threshold == float(np.percentile(norms, 90))
    p95 = analyze(entries, runs, lambda k: steps[k], percentile=95)
    assert p95.threshold == float(np.percentile(norms, 95)) > probe.threshold


def test_a_diverging_user_lr_scales_the_healthy_runs_percentile_to_the_same_largest_step():
    entries, runs, steps = fake_probe(
        {1.0: "nonfinite_weights", 3.0: "at_chance", 10.0: "x", 30.0: "x"}
    )
    probe = analyze(entries, runs, lambda k: steps[k], percentile=90, lr=0.1)
    assert probe.diverges_at == 1.0 and probe.trains_up_to == 0.3
    assert probe.healthy.factor == 0.3 and probe.scale == pytest.approx(0.3)
    norms = finite(s["grad_norm"] for s in steps["k0.3"])
    assert probe.threshold == pytest.approx(float(np.percentile(norms, 90)) * 0.03 / 0.1)


def test_nothing_trains_then_the_lowest_lr_run_gives_a_rough_threshold():
    entries, runs, steps = fake_probe(dict.fromkeys(PROBE_FACTORS, "nonfinite_weights"))
    probe = analyze(entries, runs, lambda k: steps[k], lr=0.1)
    assert probe.diverges_at == 0.1 and probe.trains_up_to is None and probe.healthy is None
    assert probe.source.factor == 0.1 and probe.scale == pytest.approx(0.1)
    # its first step's norm, at initialization, before the run blew up
    assert probe.threshold == pytest.approx(steps["k0.1"][0]["grad_norm"] * 0.1)


def test_a_run_that_did_not_learn_is_not_the_healthy_one():
    """A run at chance with calm norms is no longer "diverged", but it did not train: the probe
    counts it where training stops, and takes its healthy norms from below it."""
    entries, runs, steps = fake_probe({})
    runs["k1"]["result"].update(
        outcome="did_not_learn",
        diverged=False,
        did_not_learn=True,
        diverged_reason="at_chance",
        test_metric=0.1,
    )
    probe = analyze(entries, runs, lambda k: steps[k], lr=0.1)
    assert probe.row(1.0).diverged and probe.row(1.0).reason == "at_chance"
    assert probe.diverges_at == 1.0 and probe.trains_up_to == 0.3
    assert probe.healthy.factor == 0.3


def test_failed_and_missing_runs_count_as_diverged():
    entries, runs, steps = fake_probe({})
    runs["k3"] = {"status": "failed", "error": "RuntimeError: out of memory\ntraceback ..."}
    del runs["k10"]
    probe = analyze(entries, runs, lambda k: steps[k])
    assert (
        probe.row(3.0).status == "failed" and probe.row(3.0).error == "RuntimeError: out of memory"
    )
    assert probe.row(10.0).status == "missing"
    assert probe.diverges_at == 3.0 and probe.trains_up_to == 1.0


def test_probe_factors_include_every_stress_level():
    assert probe_factors((1.0, 3.0, 10.0)) == PROBE_FACTORS
    assert probe_factors((1.0, 5.0)) == (0.1, 0.3, 1.0, 3.0, 5.0, 10.0, 30.0)


@pytest.mark.parametrize("value", [2.375, 0.0412345, 130.4, 1e-5, 12345.6])
def test_candidates_carry_the_threshold_and_parse(value):
    cands = candidates(value)
    text = threshold_text(value)
    assert float(text) == pytest.approx(value, rel=5e-3)
    assert "e" not in text
    specs = [c.spec for c in cands]
    assert f"clip_norm:{text}" in specs
    assert sum(f"clip_norm:{text}" in s for s in specs) == 3  # clip, skip ladder, rollback ladder
    assert specs[0] == "none" and len(set(specs)) == len(specs) == 8
    for s in specs[1:]:
        parse_spec(s)
    assert "clip_norm:1" in [c.spec for c in candidates(math.nan)]


LR_FINDING = {
    "cause": "lr_too_high",
    "summary": "updates 1.6e-2 of the weights",
    "advice": [
        "Divide the learning rate by about 16 (from 0.3 to about 0.019): ...",
        "Warm the learning rate up linearly ...",
    ],
}


@pytest.mark.parametrize(
    "diverged, expect",
    [
        # Diverges from x1: the probe's highest trained LR is advised, not the ratio's estimate.
        ({1.0: "nonfinite_loss", 3.0: "x", 10.0: "x", 30.0: "x"}, "use 0.03 (x0.3 yours) or lower"),
        # Trains at the user's LR: no LR change.
        ({10.0: "x", 30.0: "x"}, "no change is needed to train; the LR probe trained unguarded"),
        # Nothing trains, down to the lowest factor: no LR at all.
        ({f: "at_chance" for f in PROBE_FACTORS}, "lowering it alone is not shown to help"),
    ],
)
def test_the_lr_advice_follows_the_probes_measurements(diverged, expect):
    """advise never suggests an LR its own probe measured against: the LR rule's estimate (from
    the update ratio) is replaced by what the probe's unguarded runs did."""
    from gradguard.advice.diagnosis import with_probe_lr

    entries, runs, steps = fake_probe(diverged)
    probe = analyze(entries, runs, steps.__getitem__)
    got = with_probe_lr(LR_FINDING, probe, 0.1)
    assert got["advice"][0].startswith("Learning rate: ") and expect in got["advice"][0]
    assert not any(a.startswith("Divide the learning rate") for a in got["advice"])
    assert got["advice"][1:] == LR_FINDING["advice"][1:]  # the rest of the advice is kept
    assert got["summary"] == LR_FINDING["summary"] and LR_FINDING["advice"][0].startswith("Divide")
