"""Diagnosis rules: each fires on the run it describes (naming the step and layer) and stays quiet on
the near miss; a healthy run gets no finding; every registered rule survives missing fields."""

from __future__ import annotations

import json
import math
import random
import statistics
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard
from gradguard.diagnose import html
from gradguard.diagnose.records import RecordWriter, RunLog, load_run
from gradguard.diagnose.rules import (
    RULES,
    SEVERITIES,
    Finding,
    diagnose,
    fp16_overflow,
    init_depth,
    list_rules,
    loss_degradation,
    lr_too_high,
    missing_normalization,
    outlier_batch,
    progress,
    recurrent_explosion,
    single_bad_step,
)

LAYERS = [f"fc{i}" for i in range(6)]


def meta(**over: Any) -> dict[str, Any]:
    m = {
        "type": "meta",
        "version": 1,
        "layers": list(LAYERS),
        "layer_types": ["Linear"] * len(LAYERS),
        "layer_params": [100] * len(LAYERS),
        "forward_order": list(range(len(LAYERS))),
        "normalization": True,
        "recurrent": [],
        "amp": False,
    }
    m.update(over)
    return m


def steps(n: int = 60, *, layers: int = 6, seed: int = 0, **over: Any) -> list[dict[str, Any]]:
    """A calm run: flat layer norms, update ratios ~1e-3 every 5th step, steady inputs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append(
            {
                "type": "step",
                "step": i,
                "loss": 2.0 - i / n,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "grad_norm_after": 1.0,
                "skipped": False,
                "rolled_back": False,
                "layer_norms": [0.4 * (1 + 0.05 * rng.gauss(0, 1)) for _ in range(layers)],
                "update_ratio": [1e-3 * (1 + 0.1 * rng.gauss(0, 1)) for _ in range(layers)]
                if i % 5 == 0
                else None,
                "nonfinite_layers": [],
                "input": {
                    "mean": 0.01 * rng.gauss(0, 1),
                    "std": 1 + 0.02 * rng.gauss(0, 1),
                    "absmax": 3.5 + 0.2 * rng.gauss(0, 1),
                },
                "amp_scale": None,
                "radius": None,
                **over,
            }
        )
    return out


def event(step: int, kind: str = "grad_spike", layers: list[str] | None = None) -> dict:
    return {
        "type": "event",
        "step": step,
        "kind": kind,
        "layers": layers or [],
        "action": "none",
        "detail": {},
    }


def write(tmp_path: Path, m: dict, st: list[dict], ev: list[dict] = (), end: bool = True) -> RunLog:
    """Through the real writer and reader, as the report sees it."""
    w = RecordWriter(tmp_path)
    w.write(m)
    for rec in sorted([*st, *ev], key=lambda r: (r["step"], r["type"] != "step")):
        w.write(rec)
    if end:
        w.write({"type": "end", "step": len(st), "counters": {}, "events": {}})
    w.close()
    return load_run(tmp_path)


def ratios(st: list[dict], value: float, *, until: int | None = None, layer: int | None = None):
    for s in st:
        if s["update_ratio"] is not None and (until is None or s["step"] < until):
            for i in range(len(s["update_ratio"])):
                if layer is None or i == layer:
                    s["update_ratio"][i] = value * (1 + 0.01 * i)
    return st


# ----- a healthy run --------------------------------------------------------------------------------


def test_healthy_run_has_no_finding(tmp_path):
    run = write(tmp_path, meta(), steps())
    assert diagnose(run) == []


def test_healthy_run_without_normalization_or_with_rnn_and_amp(tmp_path):
    st = steps()
    for s in st:
        s["amp_scale"] = 65536.0 / 2**3 if s["step"] >= 3 else 65536.0 / 2 ** s["step"]
        s["radius"] = {"fc5": 0.9} if s["step"] % 10 == 0 else None
    ev = [event(i, "amp_overflow") for i in range(3)]  # the scaler calibrating
    run = write(tmp_path, meta(normalization=False, amp=True, recurrent=["fc5"]), st, ev)
    assert diagnose(run) == []


# ----- lr_too_high ----------------------------------------------------------------------------------


def test_lr_too_high_fires_before_a_spike(tmp_path):
    st = ratios(steps(), 3e-2)
    run = write(tmp_path, meta(), st, [event(40), event(47), event(52)])
    f = lr_too_high(run)
    assert f is not None and f.severity == "high" and f.step == 40
    assert any("before the first spike/non-finite step (40)" in e for e in f.evidence)
    assert f.layers[0] == "fc5"  # the largest ratio (ratios() makes the last layer the largest)
    assert "Divide the learning rate by about 31" in f.advice[0]  # median 3.075e-2 / 1e-3
    assert "about 3.3e-05" in f.advice[0]


def test_lr_too_high_takes_a_lone_spike_the_loss_shrugged_off_as_no_trouble(tmp_path):
    """Updates 3e-2 of the weights are Adam's healthy level (a GPT at 6e-4 gives ~1e-2): one or
    two spikes in a run whose loss kept falling do not make them "too high"; a third spike, or
    the loss degrading after the one, does."""
    st = ratios(steps(), 3e-2)
    assert lr_too_high(write(tmp_path / "one", meta(), st, [event(40)])) is None
    assert lr_too_high(write(tmp_path / "two", meta(), st, [event(40), event(50)])) is None
    f = lr_too_high(write(tmp_path / "three", meta(), st, [event(40), event(50), event(55)]))
    assert f is not None and f.step == 40
    # a loss spike is the loss not shrugging it off
    f = lr_too_high(write(tmp_path / "loss", meta(), st, [event(40, "loss_spike")]))
    assert f is not None and f.step == 40
    worse = ratios(shaped("u_turn", 0, 0.01), 3e-2)
    f = lr_too_high(write(tmp_path / "degraded", meta(), worse, [event(12)]))
    assert f is not None


def test_lr_too_high_one_hot_layer(tmp_path):
    st = ratios(steps(), 0.3, layer=2)
    f = lr_too_high(write(tmp_path, meta(), st, [event(33, "nonfinite_grad")]))
    assert f is not None and f.layers == ["fc2"] and "fc2" in f.advice[0]


def test_lr_too_high_severe_without_events(tmp_path):
    f = lr_too_high(write(tmp_path, meta(), ratios(steps(), 0.3)))
    assert f is not None and f.severity == "medium"


def test_lr_too_high_in_a_runaway_does_not_extrapolate_the_factor(tmp_path):
    """Updates 20x the weights: the run is already diverging; "divide by 20000" would be noise."""
    f = lr_too_high(write(tmp_path, meta(), ratios(steps(), 20.0)))
    assert f is not None
    assert f.advice[0].startswith("Divide the learning rate by 10 or more")
    assert "20000" not in " ".join(f.advice)


@pytest.mark.parametrize(
    "case",
    [
        "below_threshold",  # 5e-3 with a spike: a bit high, not "far above"
        "no_events",  # 3e-2 and nothing went wrong: a matter of taste
        "only_after",  # high only after the spike (the spike did it, not the LR)
    ],
)
def test_lr_too_high_near_miss(tmp_path, case):
    st = steps()
    if case == "below_threshold":
        ratios(st, 5e-3)
    elif case == "no_events":
        ratios(st, 3e-2)
    else:
        for s in st:
            if s["update_ratio"] is not None and s["step"] >= 40:
                s["update_ratio"] = [0.5] * 6
    ev = [] if case == "no_events" else [event(40)]
    assert lr_too_high(write(tmp_path, meta(), st, ev)) is None


def nan_at(st: list[dict], *bad: int) -> list[dict]:
    """NaN loss and gradient at the given steps (the records and the events a Guard writes)."""
    ev = []
    for s in st:
        if s["step"] in bad:
            s.update(loss=math.nan, grad_norm=math.nan, nonfinite_layers=list(range(6)))
            ev += [event(s["step"], "nonfinite_loss"), event(s["step"], "nonfinite_grad")]
    for e in ev:
        e["action"] = "skipped"
    return ev


def adam_like(st: list[dict], first: float, rest: float) -> list[dict]:
    """Adam's first update moves every weight by about the LR: a high first sampled ratio."""
    for s in st:
        if s["update_ratio"] is not None:
            v = first if s["step"] == 0 else rest
            s["update_ratio"] = [v * (1 + 0.01 * i) for i in range(6)]
    return st


@pytest.mark.parametrize("bad", [3, 12, 37])
@pytest.mark.parametrize(("first", "rest"), [(0.018, 0.011), (0.5, 1e-3), (0.03, 0.03)])
def test_a_lone_nan_is_a_single_bad_step_not_the_lr(tmp_path, bad, first, rest):
    """One NaN step in a run finite before and after: no LR finding, whatever one sampled step
    said (the issue's Adam run: ratio 0.018 at step 0, "divide by ~11"), but single_bad_step."""
    st = adam_like(steps(), first, rest)
    run = write(tmp_path, meta(), st, nan_at(st, bad))
    assert lr_too_high(run) is None
    found = diagnose(run)
    assert [f.cause for f in found] == ["single_bad_step"]
    assert found[0].step == bad and "not the learning rate" in found[0].summary


def test_lr_too_high_needs_several_sampled_steps(tmp_path):
    st = ratios(steps(), 3e-2)
    later = [event(30), event(40)]  # spikes that go on: trouble, not a lone spike
    two = write(tmp_path / "two", meta(), st, [event(7), *later])  # steps 0, 5
    assert lr_too_high(two) is None
    f = lr_too_high(write(tmp_path / "three", meta(), st, [event(11), *later]))  # 0, 5, 10
    assert f is not None and f.step == 11


def test_lr_too_high_on_a_run_damaged_in_its_first_steps(tmp_path):
    """Updates 30% of the weights on the first sampled steps, then tiny (the units died): most
    samples come after the damage, so the early ones are judged on their own too."""
    st = _dying(ratios(steps(), 0.3, until=15), 6, dead_from=20)  # sampled steps 0, 5, 10 of 12
    f = lr_too_high(write(tmp_path / "three", meta(), st))
    assert f is not None and f.severity == "medium" and f.step == 0
    assert "3 sampled steps" in f.evidence[0]
    st = _dying(ratios(steps(), 0.3, until=10), 6, dead_from=20)  # two early steps: no evidence
    assert lr_too_high(write(tmp_path / "two", meta(), st)) is None


@pytest.mark.parametrize(("jump", "fires"), [(72.0, True), (12.0, True), (4.0, False)])
def test_large_first_steps_with_a_loss_that_blew_up_in_them_are_a_too_high_lr(
    tmp_path, jump, fires
):
    """An LSTM under Adam at LR 0.3: updates 4x the weights at step 0, the loss from 1.3 to 96 at
    step 1, then Adam caught up and it trained, with no event (the detector had no history)."""
    st = ratios(steps(), 0.3, until=15)
    for s in st:
        s["dead_units"] = [0.05] * 5 + [0.0] if s["step"] % 10 == 0 else None
    st[1]["loss"] = st[0]["loss"] * jump
    f = lr_too_high(write(tmp_path, meta(), st))
    assert (f is not None) == fires
    if fires:
        assert f.step == 0 and f.severity == "medium"


def test_large_first_steps_of_a_run_that_then_never_learned_are_a_too_high_lr(tmp_path):
    """A CNN at SGD LR 1.5: updates 0.2-2.9x the weights on its first three steps, then at chance
    for 200 steps (two late spikes, no NaN): the lead-in is judged on its own."""
    st = ratios(steps(200), 0.5, until=15)
    for s in st:
        s["loss"] = 2.3 + 0.02 * math.sin(s["step"])
    f = lr_too_high(write(tmp_path, meta(), st))
    assert f is not None and f.step == 0
    # the same loss with small first steps: a net that did not learn, but not from its LR
    calm = ratios(steps(200), 1e-3)
    for s in calm:
        s["loss"] = 2.3 + 0.02 * math.sin(s["step"])
    assert lr_too_high(write(tmp_path / "calm", meta(), calm)) is None


def test_two_samples_of_updates_larger_than_the_weights_are_enough(tmp_path):
    # a CNN at SGD LR 1.5: 0.42x and 4.5x its weights on steps 0 and 1, then at chance
    st = ratios(steps(200), 2e-3)
    st[0]["update_ratio"] = [0.42] * 6
    st[5]["update_ratio"] = [4.5] * 6
    for s in st:
        s["loss"] = 2.3 + 0.02 * math.sin(s["step"])
    f = lr_too_high(write(tmp_path, meta(), st))
    assert f is not None and f.step == 0
    assert any("larger than the weights" in e for e in f.evidence)
    # two samples below the weights' size are still one short of the three it takes
    st[5]["update_ratio"] = [0.5] * 6
    assert lr_too_high(write(tmp_path / "two", meta(), st)) is None


def test_spikes_that_all_came_on_outlier_batches_are_no_evidence_about_the_lr(tmp_path):
    """An LSTM under Adam 3e-3 (updates ~3e-2 of its weights, as Adam's are) spiked only on a
    batch scaled 300x: judged as a run without events."""
    st = ratios(steps(200), 3e-2)
    st[70]["input"] = {"mean": 90.0, "std": 300.0, "absmax": 900.0}
    run = write(tmp_path, meta(), st, [event(70, "loss_spike"), event(71)])
    assert lr_too_high(run) is None
    assert outlier_batch(run) is not None
    # a spike on an ordinary batch besides it is the LR's evidence again
    run = write(tmp_path / "more", meta(), st, [event(70, "loss_spike"), event(120)])
    assert lr_too_high(run) is not None


def test_large_first_steps_of_a_run_that_then_trains_calmly_are_no_finding(tmp_path):
    """The same three large leading samples with no damage after them (no event, the loss falls,
    every unit alive): a vanilla RNN at 1.5x init did this and trained well."""
    st = ratios(steps(), 0.3, until=15)
    for s in st:
        s["dead_units"] = [0.05] * 5 + [0.0] if s["step"] % 10 == 0 else None
    assert lr_too_high(write(tmp_path, meta(), st)) is None


def test_lr_too_high_on_a_run_damaged_early_whose_first_steps_built_momentum_up(tmp_path):
    """SGD with momentum: the first update is a tenth of the later ones, so the too-large run of
    samples may start at the second or third; from the fourth on it is no longer "from the
    start"."""
    for small, fires in [(1, True), (2, True), (3, False)]:
        st = ratios(steps(), 0.3, until=5 * (small + 3))  # 3 large samples after the small ones
        st = _dying(st, 6, dead_from=5 * (small + 3) + 5)  # ... that killed the units
        for s in st[: 5 * small : 5]:
            s["update_ratio"] = [0.03] * len(s["update_ratio"])
        f = lr_too_high(write(tmp_path / str(small), meta(), st))
        assert (f is not None) is fires, small
        if fires:
            assert f.step == 5 * small and "3 sampled steps" in f.evidence[0]


def test_lr_too_high_before_a_quiet_degradation(tmp_path):
    """Updates 2% of the weights (20x the rule of thumb) are a matter of taste in a run that
    trains; before a loss that climbs back with no event they are the LR."""
    st = shaped("u_turn", 0, 0.01)
    for s in st:
        if s["update_ratio"] is not None:
            s["update_ratio"] = [2e-2 * (1 + 0.01 * i) for i in range(6)]
    f = lr_too_high(write(tmp_path / "u", meta(), st))
    assert f is not None and any("degraded or stalled from step" in e for e in f.evidence)
    healthy = shaped("healthy", 0, 0.01)
    for s in healthy:
        if s["update_ratio"] is not None:
            s["update_ratio"] = [2e-2 * (1 + 0.01 * i) for i in range(6)]
    assert lr_too_high(write(tmp_path / "h", meta(), healthy)) is None


def bouncing(n: int, jumps: int, *, low: float = 0.05, high: float = 0.5) -> list[dict]:
    """A loss that falls from 2 to ``low`` over 30 steps and then jumps to ``high`` on ``jumps``
    steps spread over the rest, with update ratios 2e-2 (20x the rule of thumb)."""
    st = steps(n)
    at = set(range(40, n, (n - 40) // jumps)[:jumps])
    for s in st:
        i = s["step"]
        s["loss"] = high if i in at else max(low, 2.0 - i * (2.0 - low) / 30)
        if s["update_ratio"] is not None:
            s["update_ratio"] = [2e-2 * (1 + 0.01 * k) for k in range(6)]
    return st


def test_lr_too_high_on_an_erratic_loss_without_events(tmp_path):
    """Adam at too high an LR on a small net: the loss reaches a low level and keeps bouncing
    off it, the gradients calm. Updates of 2e-2 are a matter of taste in a run that trains; with
    a loss that jumps 10x on 12 steps they are the LR."""
    f = lr_too_high(write(tmp_path / "erratic", meta(), bouncing(200, 12)))
    assert f is not None and f.severity == "medium"
    assert any("jumped to over 3x its recent median on 12 steps" in e for e in f.evidence)
    # Fewer jumps than ERRATIC_MIN_JUMPS, or no jump at all: a matter of taste.
    few = bouncing(200, progress.ERRATIC_MIN_JUMPS - 1)
    assert lr_too_high(write(tmp_path / "few", meta(), few)) is None
    assert lr_too_high(write(tmp_path / "calm", meta(), bouncing(200, 12, high=0.05))) is None
    # Bounces near zero (5x, but by less than 5% of the starting loss) are no jumps.
    tiny = bouncing(200, 12, low=0.002, high=0.01)
    assert lr_too_high(write(tmp_path / "tiny", meta(), tiny)) is None
    # An erratic loss with updates at the rule of thumb says nothing about the LR.
    small = ratios(bouncing(200, 12), 1e-3)
    assert lr_too_high(write(tmp_path / "small", meta(), small)) is None


def test_loss_jumps_against_a_plain_reading(tmp_path):
    """progress._loss_jumps against its definition read directly: a loss above 3x the median of
    the 20 before it, by more than 5% of the median of the first five."""
    rng = random.Random(3)
    st = steps(150)
    for s in st:
        s["loss"] = 0.1 + rng.random() * (1.5 if rng.random() < 0.15 else 0.05)
    run = write(tmp_path, meta(), st)
    losses = [s["loss"] for s in st]
    start = statistics.median(losses[:5])
    want = [
        i
        for i in range(20, len(losses))
        if losses[i] > 3 * (m := statistics.median(losses[i - 20 : i]))
        and losses[i] - m > 0.05 * start
    ]
    assert len(want) >= progress.ERRATIC_MIN_JUMPS
    assert progress._loss_jumps(run) == want


def test_lr_too_high_sustained_with_a_lone_nan(tmp_path):
    """Updates 30% of the weights on every sampled step: the LR, with or without one NaN step."""
    st = ratios(steps(), 0.3)
    run = write(tmp_path, meta(), st, nan_at(st, 3))
    assert [f.cause for f in diagnose(run)] == ["lr_too_high", "single_bad_step"]
    assert "over 6 layers and 12 sampled steps steps 0-55;" in lr_too_high(run).evidence[0]


def test_single_bad_step_fires(tmp_path):
    st = steps()
    ev = nan_at(st, 20)
    run = write(tmp_path, meta(), st, ev)
    run.localizations.append({"step": 20, "origin": "fc3", "phase": "forward"})
    f = single_bad_step(run)
    assert f is not None and f.step == 20 and f.severity == "medium"
    assert any("started in fc3" in e for e in f.evidence)
    assert any("skip_nonfinite" in a for a in f.advice)


def test_single_bad_step_beside_a_stray_gradient_spike(tmp_path):
    # a GPT at AdamW 1e-3: one bad batch at step 60 and, 40 steps later, one gradient spike of the
    # kind a healthy run has: still one bad batch, and no evidence about the LR
    st = ratios(steps(), 3e-2)
    ev = [*nan_at(st, 20), event(40)]
    run = write(tmp_path, meta(), st, ev)
    f = single_bad_step(run)
    assert f is not None and f.step == 20
    assert "besides it only a gradient spike at step 40" in f.evidence[1]
    assert lr_too_high(run) is None


@pytest.mark.parametrize(
    "case",
    [
        "three_steps",
        "with_spikes",
        "with_loss_spike",
        "no_recovery",
        "amp",
        "nan_after",
        "huge_init",
    ],
)
def test_single_bad_step_near_miss(tmp_path, case):
    st = steps()
    bad = {"three_steps": (10, 20, 30), "no_recovery": (57,)}.get(case, (20,))
    ev = nan_at(st, *bad)
    if case == "huge_init":  # outputs of 1e4 on the initial weights: the NaN is the init's
        st[0]["logits"] = {"absmax": 1.4e4, "logz": 1.4e4, "mean": -5e3}
    if case == "with_spikes":  # spikes on three other steps: a trend
        ev += [event(35), event(40), event(45)]
    if case == "with_loss_spike":
        ev.append(event(40, "loss_spike"))
    if case == "nan_after":  # the loss NaN from step 45 on, without events (a diverged run)
        for s in st[45:]:
            s["loss"] = math.nan
    assert single_bad_step(write(tmp_path, meta(amp=case == "amp"), st, ev)) is None


def _adam_guarded(tmp_path: Path, bad: int) -> RunLog:
    """A real Guard, Adam at 2e-3 on a small MLP; the loss is NaN at step ``bad``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with gradguard.Guard(model, opt, "default", log_dir=tmp_path) as guard:
        for step in range(60):
            x = torch.randn(32, 8)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), (x.sum(1) > 0).long())
            loss = loss * math.nan if step == bad else loss
            loss.backward()
            guard.step(loss=loss)
    return load_run(tmp_path)


def test_a_lone_nan_under_adam_real_guard(tmp_path):
    run = _adam_guarded(tmp_path, bad=3)
    assert [f.cause for f in diagnose(run)] == ["single_bad_step"]


# ----- init_depth -----------------------------------------------------------------------------------


def graded(n_layers: int, decades_per_layer: float, **kw) -> list[dict]:
    """Layer norms falling geometrically from the input side (layer 0) to the output side."""
    st = steps(layers=n_layers, **kw)
    for s in st:
        s["layer_norms"] = [
            v * 10 ** (decades_per_layer * (n_layers - 1 - i))
            for i, v in enumerate(s["layer_norms"])
        ]
    return st


def deep_meta(n: int, **over) -> dict:
    return meta(
        layers=[f"l{i}" for i in range(n)],
        layer_types=["Linear"] * n,
        layer_params=[100] * n,
        forward_order=list(range(n)),
        **over,
    )


def test_init_depth_explode(tmp_path):
    f = init_depth(write(tmp_path, deep_meta(8), graded(8, 0.3)))
    assert f is not None and f.layers == ["l0", "l7"] and "exploding" in f.title
    # 1.7 decades over 13 layers (a tanh MLP at 2.2x the Xavier gain) is enough; 1.3 is not
    assert init_depth(write(tmp_path / "a", deep_meta(13), graded(13, 1.7 / 12))) is not None
    assert init_depth(write(tmp_path / "b", deep_meta(13), graded(13, 1.3 / 12))) is None
    assert "multiplied by about 2.00 per layer" in f.summary
    assert any("R^2 = 1.00" in e for e in f.evidence)


def test_init_depth_vanish_in_forward_order_only_weight_layers(tmp_path):
    n = 9
    st = graded(n, -0.3)
    m = deep_meta(n)
    # registered output-first: forward order is what counts; l4 is a norm layer with a wild value
    m["layers"] = m["layers"][::-1]
    m["forward_order"] = list(range(n))[::-1]
    m["layer_types"][4] = "LayerNorm"
    for s in st:
        s["layer_norms"] = s["layer_norms"][::-1]
        s["layer_norms"][4] = 1e6
    f = init_depth(write(tmp_path, m, st))
    assert f is not None and "vanishing" in f.title
    # input side first: index 8 ("l0") by the forward order; by index order it would be "l8", and
    # the trend would read as exploding
    assert f.layers == ["l0", "l8"]


@pytest.mark.parametrize("case", ["gentle", "scattered", "shallow", "after_event"])
def test_init_depth_near_miss(tmp_path, case):
    n = 5 if case == "shallow" else 8
    st = graded(n, 0.5 if case in ("shallow", "after_event") else 0.12)
    if case == "scattered":  # large differences, no geometric trend
        for s in st:
            s["layer_norms"] = [10.0**e for e in (3, -1, 2, 0, 3, -1, 1, 0)]
    ev = []
    if case == "after_event":  # flat at the start, the trend only after an event: not the init
        st[0]["layer_norms"] = [0.4] * n
        ev = [event(1)]
    assert init_depth(write(tmp_path, deep_meta(n), st, ev)) is None


def _train_mlp(tmp_path: Path, gain: float, act: type[nn.Module] = nn.Tanh, default_init=False):
    """A real 12-layer plain MLP, 5 SGD steps, recorded by hand in the telemetry format."""
    torch.manual_seed(0)
    mods: list[tuple[str, nn.Module]] = []
    d = 16
    for i in range(12):
        out = 64 if i < 11 else 4
        mods.append((f"fc{i}", nn.Linear(d, out)))
        d = out
        if i < 11:
            mods.append((f"act{i}", act()))
    model = nn.Sequential(OrderedDict(mods))
    lin = [(n, m) for n, m in model.named_children() if isinstance(m, nn.Linear)]
    if not default_init:
        for _, m in lin:
            nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("tanh") * gain)
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def flat(m: nn.Module, grad: bool = False) -> torch.Tensor:
        return torch.cat([(p.grad if grad else p.detach()).flatten() for p in m.parameters()])

    w = RecordWriter(tmp_path)
    w.write(
        meta(
            layers=[n for n, _ in lin],
            layer_types=["Linear"] * len(lin),
            layer_params=[sum(p.numel() for p in m.parameters()) for _, m in lin],
            forward_order=list(range(len(lin))),
            normalization=False,
        )
    )
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        norms = [torch.linalg.vector_norm(flat(m, grad=True)).item() for _, m in lin]
        before = [flat(m).clone() for _, m in lin]
        opt.step()
        ratio = [
            (torch.linalg.vector_norm(flat(m) - b) / torch.linalg.vector_norm(b)).item()
            for (_, m), b in zip(lin, before, strict=True)
        ]
        w.write(
            {
                "type": "step",
                "step": step,
                "loss": loss.item(),
                "lr": 1e-3,
                "grad_norm": math.sqrt(sum(v * v for v in norms)),
                "layer_norms": norms,
                "update_ratio": ratio,
                "weight_norms": [torch.linalg.vector_norm(b).item() for b in before],
                "nonfinite_layers": [i for i, v in enumerate(norms) if not math.isfinite(v)],
                "input": {
                    "mean": x.mean().item(),
                    "std": x.std().item(),
                    "absmax": x.abs().max().item(),
                },
            }
        )
    w.close()
    return load_run(tmp_path)


def test_init_depth_real_training_loop(tmp_path):
    # tanh at 4x the Xavier gain: the chaotic phase, the gradient grows ~1.9x per layer toward the
    # input (a ReLU net would not show it: scaling a homogeneous net's init scales every layer's
    # weight gradient alike; see INIT_RATIO)
    bad = _train_mlp(tmp_path / "bad", gain=4.0)
    f = init_depth(bad)
    assert f is not None and "exploding" in f.title and f.layers == ["fc0", "fc11"]
    assert [x.cause for x in diagnose(bad)] == ["init_depth"]
    good = _train_mlp(tmp_path / "good", gain=1.0)
    assert init_depth(good) is None
    assert diagnose(good) == []
    # sigmoid with PyTorch's default init: the classic vanishing gradient
    vanish = init_depth(_train_mlp(tmp_path / "sigmoid", 1.0, act=nn.Sigmoid, default_init=True))
    assert vanish is not None and "vanishing" in vanish.title


# ----- missing_normalization --------------------------------------------------------------------------


def test_missing_normalization_fires(tmp_path):
    run = write(
        tmp_path, deep_meta(8, normalization=False), steps(layers=8), [event(17, "nonfinite_grad")]
    )
    f = missing_normalization(run)
    assert f is not None and f.step == 17
    assert any("8 weight layers" in e for e in f.evidence)
    assert any("LayerNorm" in a for a in f.advice)


@pytest.mark.parametrize("case", ["shallow", "normalized", "unknown", "no_events", "norm_counted"])
def test_missing_normalization_near_miss(tmp_path, case):
    m = deep_meta(7 if case == "shallow" else 8, normalization=case == "normalized")
    if case == "unknown":
        del m["normalization"]
    if case == "norm_counted":  # a norm layer is not a weight layer: 7 weight layers
        m["layer_types"][3] = "BatchNorm1d"
        m["normalization"] = False
    ev = [] if case == "no_events" else [event(17)]
    assert missing_normalization(write(tmp_path, m, steps(layers=len(m["layers"])), ev)) is None


def _dying(st: list[dict], layers: int, dead_from: int) -> list[dict]:
    """Sampled dead-unit shares: alive (5%) before ``dead_from``, all dead from it on."""
    for s in st:
        share = 0.05 if s["step"] < dead_from else 1.0
        s["dead_units"] = [share] * (layers - 1) + [0.0] if s["step"] % 10 == 0 else None
    return st


def test_missing_normalization_fires_when_training_kills_a_deep_plain_nets_units(tmp_path):
    # no spike, no NaN: the deep plain net's units die at step 60 and it never learns again
    st = _dying(steps(200, layers=10), 10, dead_from=60)
    run = write(tmp_path, deep_meta(10, normalization=False), st)
    f = missing_normalization(run)
    assert f is not None and f.step == 60
    assert "units died from step 60" in f.summary
    assert {"dead_units", "missing_normalization"} <= {f.cause for f in diagnose(run)}


def test_missing_normalization_not_for_units_killed_after_an_init_that_was_off(tmp_path):
    # the gradient norms fall geometrically through the layers from the start (init_depth): the
    # init, not the missing normalization, is the account of the units that died later
    st = _dying(graded(10, -0.3, n=200), 10, dead_from=60)
    run = write(tmp_path, deep_meta(10, normalization=False), st)
    assert init_depth(run) is not None
    assert missing_normalization(run) is None
    # the same dying units without the init's profile do fire
    flat = write(
        tmp_path / "flat", deep_meta(10, normalization=False), _dying(steps(200, layers=10), 10, 60)
    )
    assert missing_normalization(flat) is not None


@pytest.mark.parametrize("case", ["dead_from_start", "shallow", "normalized", "alive"])
def test_missing_normalization_near_miss_on_dead_units(tmp_path, case):
    layers = 7 if case == "shallow" else 10
    dead_from = {"dead_from_start": 0, "alive": 10**6}.get(case, 60)
    st = _dying(steps(200, layers=layers), layers, dead_from)
    m = deep_meta(layers, normalization=case == "normalized")
    # dead from the first step is an init (negative biases), not what the depth did in training
    assert missing_normalization(write(tmp_path, m, st)) is None


# ----- outlier_batch ----------------------------------------------------------------------------------


def test_outlier_batch_fires_on_the_spike_step(tmp_path):
    st = steps(40)
    st[30]["input"] = {"mean": 0.0, "std": 3.0, "absmax": 500.0}
    f = outlier_batch(write(tmp_path, meta(), st, [event(30)]))
    assert f is not None and f.step == 30 and f.severity == "high"
    assert "step 30" in f.evidence[0] and "absmax" in f.evidence[0]
    assert any("training set" in a for a in f.advice) and any("skip_spike" in a for a in f.advice)


def test_outlier_batch_nan_in_the_batch(tmp_path):
    st = steps(40)
    st[12]["input"] = {"mean": math.nan, "std": math.nan, "absmax": math.inf}
    f = outlier_batch(write(tmp_path, meta(), st, [event(12, "nonfinite_loss")]))
    assert f is not None and f.step == 12 and "NaN/Inf" in f.evidence[0]


def test_outlier_batch_mean_shift(tmp_path):
    st = steps(40)
    st[25]["input"] = dict(st[25]["input"], mean=1.5)
    f = outlier_batch(write(tmp_path, meta(), st, [event(25)]))
    assert f is not None and "input mean" in f.evidence[0]


@pytest.mark.parametrize("case", ["normal_batch", "outlier_elsewhere", "short_history", "no_input"])
def test_outlier_batch_near_miss(tmp_path, case):
    st = steps(40)
    ev_step = 30
    if case == "outlier_elsewhere":
        st[20]["input"] = {"mean": 0.0, "std": 3.0, "absmax": 500.0}  # no event there
    if case == "short_history":
        ev_step = 5
        st[5]["input"] = {"mean": 0.0, "std": 3.0, "absmax": 500.0}
    if case == "no_input":
        for s in st:
            s["input"] = None
    if case == "normal_batch":
        st[ev_step]["input"] = dict(st[ev_step]["input"], absmax=4.2)  # 20% above usual
    assert outlier_batch(write(tmp_path, meta(), st, [event(ev_step)])) is None


def sampled_inputs(
    n_steps: int, per_epoch: int, last: int, seed: int, *, usual: int = 64, record_batch=True
) -> list[dict]:
    """Steps whose input statistics are those of real batches of sparse, heavy-tailed features
    (like standardized pixels: mostly near zero, a few large), each epoch's last batch holding only
    ``last`` samples; a grad_spike-prone run (the small batch's gradient is noisier)."""
    gen = torch.Generator().manual_seed(seed)
    st = steps(n_steps, seed=seed)
    for s in st:
        n = last if s["step"] % per_epoch == per_epoch - 1 else usual
        x = torch.randn(n, 64, generator=gen) * (torch.rand(n, 64, generator=gen) < 0.1) * 3
        s["input"] = {
            "mean": x.mean().item(),
            "std": x.std().item(),
            "absmax": x.abs().max().item(),
        }
        if record_batch:
            s["input"]["batch"] = n
    return st


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("last", "record_batch"), [(1, True), (3, True), (7, True), (3, False)])
def test_outlier_batch_not_an_epochs_small_last_batch(tmp_path, seed, last, record_batch):
    """Each epoch's small last batch has a smaller max and a noisier mean and std, and its noisier
    gradient spikes: by its size alone, so no outlier (the false finding on advise_entry.py)."""
    st = sampled_inputs(300, 21, last, seed, record_batch=record_batch)
    ev = [event(s) for s in range(20, 300, 21)]
    assert outlier_batch(write(tmp_path, meta(), st, ev)) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [100.0, 30.0])
def test_outlier_batch_scaled_batch_among_small_last_batches(tmp_path, seed, scale):
    """A real outlier (inputs x30 or x100 at one step, with a spike) is found among the small last
    batches, and only it."""
    st = sampled_inputs(300, 21, 3, seed)
    inp = st[150]["input"]
    st[150]["input"] = dict(inp, std=inp["std"] * scale, absmax=inp["absmax"] * scale)
    ev = [event(s) for s in [*range(20, 300, 21), 150]]
    f = outlier_batch(write(tmp_path, meta(), st, ev))
    assert f is not None and f.step == 150
    assert any("1 of 15 spike/non-finite steps" in e for e in f.evidence)


@pytest.mark.parametrize(("factor", "fires"), [(300.0, True), (12.0, True), (5.0, False)])
def test_outlier_batch_without_any_event_is_said_when_10x_the_usual(tmp_path, factor, fires):
    # an LSTM took a batch scaled 300x with no spike (its gates saturate): said, at medium
    st = steps(60)
    usual = st[0]["input"]
    st[45]["input"] = dict(usual, std=usual["std"] * factor, absmax=usual["absmax"] * factor)
    f = outlier_batch(write(tmp_path, meta(), st))
    assert (f is not None) == fires
    if fires:
        assert f.step == 45 and f.severity == "medium" and "took it" in f.title
        assert "no spike or non-finite step followed" in f.evidence[-1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outlier_batch_without_events_not_for_heavy_tailed_data_or_small_last_batches(
    tmp_path, seed
):
    st = sampled_inputs(300, 21, 3, seed)
    assert outlier_batch(write(tmp_path / "plain", meta(), st)) is None
    inp = st[150]["input"]
    st[150]["input"] = dict(inp, std=inp["std"] * 30, absmax=inp["absmax"] * 30)
    f = outlier_batch(write(tmp_path / "scaled", meta(), st))
    assert f is not None and f.step == 150


def test_outlier_batch_smaller_inputs_are_never_an_outlier(tmp_path):
    st = steps(40)
    st[30]["input"] = {"mean": 0.0, "std": 0.01, "absmax": 0.02}  # far below: the batch is tiny
    assert outlier_batch(write(tmp_path, meta(), st, [event(30)])) is None


def _guarded_epochs(tmp_path: Path, scale_at: int | None = None) -> RunLog:
    """A real Guard with log_dir: a small MLP, 100 samples in batches of 32 (the last of 4)."""
    torch.manual_seed(0)
    x = torch.randn(100, 8) * (torch.rand(100, 8) < 0.2) * 3
    y = (x.sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    step = 0
    with gradguard.Guard(model, opt, "default", log_dir=tmp_path) as guard:
        for _ in range(20):
            for xb, yb in data:
                xb = xb * 100 if step == scale_at else xb
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                guard.step(loss=loss)
                step += 1
    return load_run(tmp_path)


def test_outlier_batch_real_guard_small_last_batch_and_a_scaled_batch(tmp_path):
    run = _guarded_epochs(tmp_path / "plain")
    assert [s["input"]["batch"] for s in run.steps[:4]] == [32, 32, 32, 4]
    assert outlier_batch(run) is None
    run = _guarded_epochs(tmp_path / "scaled", scale_at=50)
    assert any(e["step"] == 50 for e in run.events)
    f = outlier_batch(run)
    assert f is not None and f.step == 50


# ----- fp16_overflow ----------------------------------------------------------------------------------


def amp_steps(n: int, scales: list[float]) -> list[dict]:
    st = steps(n)
    for s, sc in zip(st, scales, strict=True):
        s["amp_scale"] = sc
    return st


def test_fp16_overflow_frequent(tmp_path):
    over = [0, 1, 2, *range(10, 100, 8)]  # calibration, then 12 overflows in 97 steps
    st = amp_steps(100, [2048.0] * 100)
    ev = [event(i, "amp_overflow", layers=["fc4"] if i >= 10 else []) for i in over]
    f = fp16_overflow(write(tmp_path, meta(amp=True), st, ev))
    assert f is not None and f.severity == "medium" and f.step == 10
    assert f.layers == ["fc4"] and any("fc4" in a for a in f.advice)
    assert any("3 while the scale calibrated" in e for e in f.evidence)
    assert "bf16" in f.advice[0]


def test_fp16_overflow_scale_collapse(tmp_path):
    scales = [65536.0 / 2**i for i in range(20)] + [65536.0 / 2**19] * 20  # down to 0.125
    st = amp_steps(40, scales)
    f = fp16_overflow(write(tmp_path, meta(amp=True), st))
    assert f is not None and f.severity == "high" and "0.125" in f.summary
    assert any("overflow even unscaled" in a for a in f.advice)


def test_fp16_overflow_steady_fall(tmp_path):
    scales = [65536.0] * 40 + [65536.0 / 2 ** (i // 4) for i in range(40)]  # to 2^16/2^9 = 128
    f = fp16_overflow(write(tmp_path, meta(amp=True), amp_steps(80, scales)))
    assert f is not None and any("only fell" in e for e in f.evidence)


@pytest.mark.parametrize("case", ["routine", "no_amp"])
def test_fp16_overflow_near_miss(tmp_path, case):
    st = amp_steps(100, [65536.0 / 2 ** min(i, 5) for i in range(100)])
    ev = [event(i, "amp_overflow") for i in (0, 1, 2, 3, 4, 50)]  # calibration + one
    if case == "no_amp":
        ev = [event(i, "amp_overflow") for i in range(0, 100, 3)]
    assert fp16_overflow(write(tmp_path, meta(amp=case == "routine"), st, ev)) is None


# ----- recurrent_explosion ----------------------------------------------------------------------------


def rnn_run(tmp_path, radii: dict[int, float], ev: list[dict]) -> RunLog:
    st = steps(60)
    for s in st:
        s["radius"] = {"rnn": radii[s["step"]]} if s["step"] in radii else None
    m = meta(layers=["emb", "rnn", "fc2", "fc3", "fc4", "head"], recurrent=["rnn"])
    m["layer_types"] = ["Linear", "RNN", "Linear", "Linear", "Linear", "Linear"]
    return write(tmp_path, m, st, ev)


@pytest.mark.parametrize("radius", [1.4, 0.9])
def test_recurrent_explosion_on_a_steady_climb_without_events(tmp_path, radius):
    st = steps(60)
    for s in st:
        s["grad_norm"] = 1.2 ** s["step"]  # ~5e4 by the end, never a jump against recent history
        s["radius"] = {"rnn": radius} if s["step"] % 10 == 0 else None
    m = meta(layers=["emb", "rnn", "fc2", "fc3", "fc4", "head"], recurrent=["rnn"])
    m["layer_types"] = ["Linear", "RNN", "Linear", "Linear", "Linear", "Linear"]
    found = {f.cause: f for f in diagnose(write(tmp_path, m, st))}
    assert ("recurrent_explosion" in found) == (radius > 1)
    if radius > 1:
        assert "steady climb" in " ".join(found["recurrent_explosion"].evidence)


def test_recurrent_explosion_fires(tmp_path):
    radii = {0: 0.9, 10: 0.98, 20: 1.05, 30: 1.2, 40: 1.35, 50: 1.5}
    f = recurrent_explosion(rnn_run(tmp_path, radii, [event(45)]))
    assert f is not None and f.layers == ["rnn"] and f.step == 45 and f.severity == "high"
    # the radius the spike's gradient went through (step 40), not the one after it (step 50)
    assert "1.35" in f.summary and any("step 40" in e for e in f.evidence)
    assert not any("step 50" in e for e in f.evidence)
    assert any("clip_norm" in a for a in f.advice) and any("LSTM or GRU" in a for a in f.advice)
    assert any("was 0.9 at step 0" in e for e in f.evidence)


@pytest.mark.parametrize("vanilla", [True, False])
def test_recurrent_radius_above_1_without_events_is_the_edge_for_a_vanilla_rnn_only(
    tmp_path, vanilla
):
    radii = {0: 1.04, 10: 1.02, 20: 1.06, 30: 1.08, 40: 1.05}
    run = rnn_run(tmp_path, radii, [])
    if not vanilla:  # an LSTM's gates bound the growth a radius above 1 allows
        run.meta["layer_types"][1] = "LSTM"
    f = recurrent_explosion(run)
    if not vanilla:
        assert f is None
        return
    assert f is not None and f.severity == "medium" and f.layers == ["rnn"] and f.step == 0
    assert "stability edge" in f.title and "1.05" in f.summary  # the median of the five
    assert any("no spike" in e for e in f.evidence)
    assert not any("pushed it up" in e for e in f.evidence)  # 1.04 -> 1.08 is not 10%
    assert any("LSTM or GRU" in a for a in f.advice)


@pytest.mark.parametrize("radii", [{0: 1.3, 10: 0.9, 20: 0.8}, {0: 1.0, 10: 1.0, 20: 1.0}])
def test_recurrent_edge_needs_the_median_radius_above_1(tmp_path, radii):
    assert recurrent_explosion(rnn_run(tmp_path, radii, [])) is None


def test_recurrent_edge_says_when_training_pushed_the_radius_up(tmp_path):
    f = recurrent_explosion(rnn_run(tmp_path, {0: 0.95, 10: 1.1, 20: 1.2}, []))
    assert f is not None and any("rose from 0.95 to 1.2" in e for e in f.evidence)
    assert any("Lower the learning rate" in a for a in f.advice)


def test_recurrent_explosion_not_for_a_radius_only_after_the_trouble(tmp_path):
    # an LSTM under Adam at LR 0.3: 0.62 at step 0, 65 at step 100, after its gradient blew up
    radii = {0: 0.62, 50: 65.0}
    assert recurrent_explosion(rnn_run(tmp_path, radii, [event(20), event(25), event(30)])) is None


def test_recurrent_explosion_not_for_one_bad_batch_in_a_gated_rnn(tmp_path):
    # a GRU's gate blocks sit above 1 by design; one NaN batch, skipped, is no explosion
    st = steps(60)
    for s in st:
        s["radius"] = {"rnn": 1.3} if s["step"] % 10 == 0 else None
    ev = nan_at(st, 30)
    m = meta(layers=["emb", "rnn", "fc2", "fc3", "fc4", "head"], recurrent=["rnn"])
    m["layer_types"] = ["Linear", "GRU", "Linear", "Linear", "Linear", "Linear"]
    assert recurrent_explosion(write(tmp_path, m, st, ev)) is None
    # spikes on many steps around the same radii are (a trend, not one batch)
    ev = [event(s) for s in (25, 28, 31, 34)]
    assert recurrent_explosion(write(tmp_path / "spikes", m, st, ev)) is not None


@pytest.mark.parametrize("case", ["contractive", "far_away", "not_recurrent"])
def test_recurrent_explosion_near_miss(tmp_path, case):
    radii = {s: (0.95 if case == "contractive" else 1.4) for s in range(0, 60, 10)}
    ev = [event(45)]
    if case == "far_away":
        radii = {0: 1.4, 1: 1.4}
        st = steps(300)
        for s in st:
            s["radius"] = {"rnn": radii[s["step"]]} if s["step"] in radii else None
        m = meta(layers=["emb", "rnn", "fc2", "fc3", "fc4", "head"], recurrent=["rnn"])
        assert recurrent_explosion(write(tmp_path, m, st, [event(250)])) is None
        return
    run = rnn_run(tmp_path, radii, ev)
    if case == "not_recurrent":
        run.meta["recurrent"] = []
    assert recurrent_explosion(run) is None


def shaped(shape: str, seed: int, noise: float, n: int = 300) -> list[dict]:
    """A calm run (no events) whose loss follows ``shape``, with multiplicative noise."""
    rng = random.Random(seed)
    st = steps(n, seed=seed)
    for s in st:
        t = s["step"] / n
        loss = {
            "climb": 2.0 + 1.5 * t,  # up from the start
            "u_turn": 1.0 + 4 * (t - 0.4) ** 2,  # down, then back up
            # down fast to ~1.0, then up to 1.6 and stalled there (the GPT at AdamW 1e-2)
            "rise_stall": 1.0 + 3.0 * math.exp(-30 * t)
            if t < 0.15
            else 1.6 - 0.6 * math.exp(-20 * (t - 0.15)),
            "healthy": 0.2 + 2.0 * math.exp(-8 * t),
            "slow_calm": 2.0 - 0.1 * t,  # learns slowly but calmly
            "converged": 0.3 + 2.0 * math.exp(-25 * t),  # flat for the last two thirds
            # converging to a high floor (the data's): its early trend promised that floor
            "high_floor": 1.2 + 1.2 * math.exp(-10 * t),
            "power": 0.5 + 2.0 / (1 + 20 * t),  # a power law: slows down, never stops
            # falling steadily, then flat far above where that trend was heading (units dying,
            # logits saturating): a stall
            "knee_stall": 2.3 - 2.0 * min(t, 0.3) / 0.35,
            "late_knee": 2.3 - 1.5 * min(t, 0.4) / 0.4,
        }[shape]
        s["loss"] = loss * (1 + noise * rng.gauss(0, 1))
    return st


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", [0.01, 0.05])
@pytest.mark.parametrize("shape", ["climb", "u_turn", "rise_stall"])
def test_loss_degradation_without_events_is_not_healthy(tmp_path, shape, seed, noise):
    run = write(tmp_path, meta(), shaped(shape, seed, noise))
    assert run.events == []
    found = diagnose(run)
    assert [f.cause for f in found] == ["loss_degradation"]
    assert found[0].severity == "high" and "without any event" in found[0].summary
    state, sentence = html.verdict(run, found)
    assert state != "healthy" and "Not healthy" in sentence


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", [0.01, 0.05, 0.15])
@pytest.mark.parametrize("shape", ["healthy", "slow_calm", "converged", "high_floor", "power"])
def test_loss_degradation_negative_controls(tmp_path, shape, seed, noise):
    run = write(tmp_path, meta(), shaped(shape, seed, noise))
    assert diagnose(run) == []
    assert html.verdict(run, [])[0] == "healthy"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", [0.01, 0.05])
@pytest.mark.parametrize("shape", ["knee_stall", "late_knee"])
def test_a_stall_far_above_the_early_trend_is_not_healthy(tmp_path, shape, seed, noise):
    """No climb, no event: the loss fell steadily, then stopped far above where that trend was
    heading. Converging to a high floor (the negative controls' ``high_floor``) is not this."""
    run = write(tmp_path, meta(), shaped(shape, seed, noise))
    found = diagnose(run)
    assert [f.cause for f in found] == ["loss_degradation"]
    f = found[0]
    assert f.title == "Loss stalled far above its early trend" and f.severity == "medium"
    assert "without any event" in f.summary and f.step is not None and f.step >= 120
    assert html.verdict(run, found)[0] != "healthy"


def test_the_stall_needs_early_learning_and_a_flat_second_half(tmp_path):
    from gradguard.diagnose.rules.progress import _stall

    base = shaped("knee_stall", 0, 0.01)
    assert _stall(write(tmp_path / "base", meta(), base)) is not None
    # Still learning in the second half (a tenth of the early rate): not flat.
    late = [dict(s) for s in base]
    for s in late:
        if s["step"] >= 90:
            s["loss"] -= 0.0008 * (s["step"] - 90)
    assert _stall(write(tmp_path / "late", meta(), late)) is None
    # Flat from the start (nothing learned early): no trend promised anything.
    flat = [{**s, "loss": 2.3 * (1 + 0.01 * math.sin(s["step"]))} for s in base]
    assert _stall(write(tmp_path / "flat", meta(), flat)) is None


def test_loss_degradation_fires(tmp_path):
    st = shaped("rise_stall", 0, 0.02)
    m = meta(layers=["emb", "blocks.0.attn", "blocks.0.mlp", "fc3", "fc4", "head"])
    m["layer_types"] = ["Embedding", "MultiheadAttention", "Linear", "Linear", "Linear", "Linear"]
    f = loss_degradation(write(tmp_path, m, st))
    assert f is not None and f.step is not None and f.step < 60
    assert any("no spike or non-finite event" in e for e in f.evidence)
    assert f.advice[0].startswith("Lower the learning rate")
    assert any("qk-layernorm" in a and "qk_clip" in a for a in f.advice)
    assert not any("qk" in a for a in loss_degradation(write(tmp_path / "mlp", meta(), st)).advice)


def test_loss_degradation_needs_enough_steps(tmp_path):
    st = shaped("climb", 0, 0.01, n=30)
    assert loss_degradation(write(tmp_path, meta(), st)) is None


# ----- ordering, the registry, the contract -------------------------------------------------------------


def test_findings_sorted_by_severity(tmp_path):
    st = ratios(steps(layers=8), 3e-2)
    run = write(tmp_path, deep_meta(8, normalization=False), st, [event(i) for i in (40, 44, 48)])
    found = diagnose(run)
    assert [f.cause for f in found] == ["lr_too_high", "missing_normalization"]
    assert [f.severity for f in found] == ["high", "medium"]


def _flat_loss(st: list[dict], level: float = 2.3, dip_at: int | None = None) -> list[dict]:
    for s in st:
        s["loss"] = level * (1 + 0.005 * math.sin(s["step"]))
        if dip_at is not None and dip_at <= s["step"] < dip_at + 20:
            s["loss"] = level * 0.95  # one window's dip, and back
    return st


def test_missing_normalization_for_a_deep_plain_net_that_sat_at_its_start_before_learning(
    tmp_path,
):
    # a 12-layer plain CNN at momentum LR 0.05: at 2.30 until step 120 of 200, two spikes
    st = _flat_loss(steps(200, layers=10))
    for s in st[120:]:
        s["loss"] = 2.3 - 0.015 * (s["step"] - 119)
    run = write(tmp_path, deep_meta(10, normalization=False), st, [event(21), event(65)])
    f = missing_normalization(run)
    assert f is not None and "sat at its start (2.3) until step 119" in f.summary
    # learning from the start with the same two spikes is a deep plain net that trains
    learns = steps(200, layers=10)
    run = write(
        tmp_path / "learns", deep_meta(10, normalization=False), learns, [event(21), event(65)]
    )
    assert missing_normalization(run) is None


@pytest.mark.parametrize(
    ("case", "fires"),
    [("flat", True), ("flat_with_a_dip", True), ("slow_learner", False), ("shallow", False),
     ("dead_from_start", False), ("init_off", False)],
)  # fmt: skip
def test_missing_normalization_for_a_deep_plain_net_whose_loss_never_left_its_start(
    tmp_path, case, fires
):
    # a 12-layer plain CNN at momentum LR 0.05 sat at 2.30 for 200 steps, with no event at all
    layers = 7 if case == "shallow" else 10
    st = _flat_loss(steps(200, layers=layers), dip_at=40 if case == "flat_with_a_dip" else None)
    if case == "slow_learner":  # down 10% over the run, steadily: learning slowly, calmly
        for s in st:
            s["loss"] = 2.3 * (1 - 0.1 * s["step"] / 199)
    if case == "dead_from_start":  # an init's doing (negative biases): dead_units alone
        st = _dying(st, layers, dead_from=0)
    if case == "init_off":  # norms shrinking through the layers from the start: init_depth's
        st = _flat_loss(graded(layers, -0.3, n=200))
    run = write(tmp_path, deep_meta(layers, normalization=False), st)
    f = missing_normalization(run)
    assert (f is not None) == fires
    if fires:
        assert "never left its start" in f.summary and f.step == 0


def test_missing_normalization_not_for_a_deep_plain_net_that_trains_through_a_spike(tmp_path):
    run = write(tmp_path, deep_meta(10, normalization=False), steps(120, layers=10), [event(40)])
    assert "missing_normalization" not in {f.cause for f in diagnose(run)}


@pytest.mark.parametrize("loss_end, fires", [(2.1, True), (1.2, False)])
def test_missing_normalization_for_a_deep_plain_net_with_a_spike_that_never_learned(
    tmp_path, loss_end, fires
):
    # a 24-layer plain ReLU net at momentum LR 0.1: one spike, the loss near 2.3 throughout
    # (measured 2.30 -> 2.11); one that learned (to 1.2) after its spike has nothing missing
    st = steps(200, layers=10)
    for s in st:
        s["loss"] = 2.3 + (loss_end - 2.3) * s["step"] / 199 + 0.05 * math.sin(s["step"])
    run = write(tmp_path, deep_meta(10, normalization=False), st, [event(40)])
    f = missing_normalization(run)
    assert (f is not None) == fires
    if fires:
        assert any("did not learn" in e for e in f.evidence)
        assert "its loss stayed near where it started" in f.summary
    # the same loss with no spike at all is not the depth's (a slow, calm learner)
    assert (
        missing_normalization(write(tmp_path / "calm", deep_meta(10, normalization=False), st))
        is None
    )


# ----- update_spike ------------------------------------------------------------------------------
def test_update_spike_fires_on_an_lr_jump_followed_by_trouble(tmp_path):
    st = steps(200)
    for s in st[100:110]:
        s["lr"] = 3e-2  # x30 for ten steps
    run = write(tmp_path, meta(), st, [event(105, "loss_spike")])
    f = next(f for f in diagnose(run) if f.cause == "update_spike")
    assert f.step == 100 and "30x" in f.evidence[0]


def test_update_spike_fires_on_an_update_the_gradient_does_not_explain(tmp_path):
    st = steps(200)
    st[150]["update_ratio"] = [0.05] * 6  # 50x the 1e-3 before it, gradient norm unchanged
    f = next(f for f in diagnose(write(tmp_path, meta(), st)) if f.cause == "update_spike")
    assert f.step == 150


@pytest.mark.parametrize("rise, fires", [(5.0, True), (3.5, True), (2.5, False)])
def test_update_spike_fires_on_an_lr_jump_the_updates_followed_without_trouble(
    tmp_path, rise, fires
):
    # x10 for ten steps, no event after: the sampled update inside the jump rose with the LR
    st = steps(200)
    for s in st[100:110]:
        s["lr"] = 1e-2
    st[100]["update_ratio"] = [1e-3 * rise] * 6
    f = next((f for f in diagnose(write(tmp_path, meta(), st)) if f.cause == "update_spike"), None)
    assert (f is not None) == fires
    if fires:
        assert f.step == 100 and f.severity == "medium"
        said = [e for e in f.evidence if "x the samples just before the jump" in e]
        factor = float(said[0].split(", ")[1].split("x the")[0])
        assert factor == pytest.approx(rise, rel=0.2)  # over the samples' 10% noise


@pytest.mark.parametrize("gap, fires", [(10, False), (19, False), (25, True)])
def test_update_spike_carried_by_momentum_from_a_recent_gradient_spike_is_the_gradients(
    tmp_path, gap, fires
):
    # an outlier batch's gradient (40x) at step 150 - gap; the momentum buffer still carries it
    # at step 150, where the gradient is calm again and the update 50x its level
    st = steps(200)
    st[150 - gap]["grad_norm"] = 40.0
    st[150]["update_ratio"] = [0.05] * 6
    found = {f.cause for f in diagnose(write(tmp_path, meta(), st))}
    assert ("update_spike" in found) == fires


@pytest.mark.parametrize("case", ["warmup", "staged_warmup", "explained", "calm_jump"])
def test_update_spike_near_miss(tmp_path, case):
    st = steps(200)
    ev = []
    if case == "warmup":  # a linear warmup is not a jump from a flat level
        for s in st:
            s["lr"] = 1e-3 * min(1.0, (s["step"] + 1) / 100)
        ev = [event(120, "loss_spike")]
    elif case == "staged_warmup":  # doubling every 3 steps: each stage 2x, never from a flat level
        for s in st:
            s["lr"] = 1e-5 * 2 ** min(s["step"] // 3, 7)
        ev = [event(30, "loss_spike")]
    elif case == "explained":  # the gradient grew as much as the update
        st[150]["update_ratio"] = [0.05] * 6
        st[150]["grad_norm"] = 40.0
    else:  # the LR jumped but nothing followed
        for s in st[100:110]:
            s["lr"] = 3e-2
    assert "update_spike" not in {f.cause for f in diagnose(write(tmp_path, meta(), st, ev))}


# ----- label_noise -------------------------------------------------------------------------------
def _label_burst(st: list[dict], first: int, n: int, peak: float = 8.0) -> list[dict]:
    for s in st:
        s["loss"] = 0.05 + 0.001 * (s["step"] % 3)
    for s in st[first : first + n]:
        s["loss"] = peak
    return st


def test_label_noise_fires_on_a_burst_of_loss_spikes_with_normal_inputs(tmp_path):
    st = _label_burst(steps(300), 150, 6)
    ev = [event(i, "loss_spike") for i in range(150, 156)]
    f = next(f for f in diagnose(write(tmp_path, meta(), st, ev)) if f.cause == "label_noise")
    assert f.step == 150 and "150-155" in f.summary


@pytest.mark.parametrize("back_to, fires", [(0.5, True), (4.0, False)])
def test_label_noise_after_a_memorized_level_relearns_slowly(tmp_path, back_to, fires):
    # loss ~0 before (memorized batches), a 20-step burst to 15, then chance (2.3) for a while and
    # a slow way back: it came back to ``back_to``, far above 3x the level, within 150 steps
    st = steps(400)
    for s in st:
        s["loss"] = 1e-3
    for s in st[150:170]:
        s["loss"] = 15.0
    for s in st[170:]:
        k = s["step"] - 170
        s["loss"] = 2.3 if k < 60 else max(back_to, 2.3 - 0.03 * (k - 60))
    ev = [event(i, "loss_spike") for i in range(150, 170)]
    f = next(
        (f for f in diagnose(write(tmp_path, meta(), st, ev)) if f.cause == "label_noise"), None
    )
    assert (f is not None) == fires
    if fires:
        assert f.step == 150


@pytest.mark.parametrize("case", ["one_spike", "outlier_inputs", "lr_jump", "no_recovery"])
def test_label_noise_near_miss(tmp_path, case):
    st = _label_burst(steps(300), 150, 6)
    ev = [event(i, "loss_spike") for i in range(150, 156)]
    if case == "one_spike":
        st = _label_burst(steps(300), 150, 1)
        ev = ev[:1]
    elif case == "outlier_inputs":
        for s in st[150:156]:
            s["input"] = {"mean": 0.0, "std": 300.0, "absmax": 3000.0}
    elif case == "lr_jump":
        for s in st[148:156]:
            s["lr"] = 3e-2
    else:
        for s in st[150:]:
            s["loss"] = 8.0
    assert "label_noise" not in {f.cause for f in diagnose(write(tmp_path, meta(), st, ev))}


# ----- dead_units --------------------------------------------------------------------------------
def test_dead_units_fires_when_most_hidden_units_stop_getting_gradient(tmp_path):
    st = steps(100)
    for s in st:
        share = 0.05 if s["step"] < 40 else 0.8
        s["dead_units"] = [share] * 5 + [0.0] if s["step"] % 10 == 0 else None
    f = next(f for f in diagnose(write(tmp_path, meta(), st)) if f.cause == "dead_units")
    assert f.step == 40 and "80%" in f.summary


def test_dead_units_from_zero_gradient_layers_in_files_without_the_field(tmp_path):
    st = steps(100)
    for s in st[50:]:
        s["layer_norms"] = [0.0] * 5 + [0.3]
    f = next(f for f in diagnose(write(tmp_path, meta(), st)) if f.cause == "dead_units")
    assert f.step == 50


@pytest.mark.parametrize("share", [0.0, 0.2, 0.45])
def test_dead_units_near_miss(tmp_path, share):
    st = steps(100)
    for s in st:
        s["dead_units"] = [share] * 5 + [0.0] if s["step"] % 10 == 0 else None
    st[-1]["dead_units"] = [1.0] * 5 + [0.0]  # one dead sample at the end is not the end's median
    assert "dead_units" not in {f.cause for f in diagnose(write(tmp_path, meta(), st))}


# ----- attention_logits --------------------------------------------------------------------------
def _attn(st: list[dict], values: Any) -> list[dict]:
    for s in st:
        v = values(s["step"])
        s["attn_logit"] = (
            {"blocks.0.attn": v, "blocks.1.attn": v / 2} if s["step"] % 10 == 0 else None
        )
    return st


def test_attention_logits_fires_when_the_logits_grow(tmp_path):
    st = _attn(steps(200), lambda i: 1.0 + i)  # 1 -> ~190
    f = next(f for f in diagnose(write(tmp_path, meta(), st)) if f.cause == "attention_logits")
    assert f.layers[0] == "blocks.0.attn" and "qk" in " ".join(f.advice).lower()


@pytest.mark.parametrize("case", ["calm", "large_from_the_start"])
def test_attention_logits_near_miss(tmp_path, case):
    values = (lambda i: 1.0 + i / 20) if case == "calm" else (lambda i: 40.0 + i / 20)
    st = _attn(steps(200), values)
    assert "attention_logits" not in {f.cause for f in diagnose(write(tmp_path, meta(), st))}


# ----- output_logits -----------------------------------------------------------------------------
def _logits(st: list[dict], mean: Any, spread: float = 8.0, with_mean: bool = True) -> list[dict]:
    """Logits whose common mode is ``mean(step)`` and whose spread about it is ``spread``."""
    for s in st:
        m = mean(s["step"])
        s["logits"] = {"absmax": abs(m) + spread, "logz": m + spread / 2}
        if with_mean:
            s["logits"]["mean"] = m
    return st


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_output_logits_fires_when_the_logits_drift_together(tmp_path, sign):
    st = _logits(steps(200), lambda i: sign * 0.2 * i)  # 0 -> +-40 nats
    f = next(f for f in diagnose(write(tmp_path, meta(), st)) if f.cause == "output_logits")
    assert ("very negative" in f.title) == (sign < 0) and f.severity == "medium"
    assert "z-loss" in " ".join(f.advice) and "weight decay" in " ".join(f.advice)
    assert "by ~39" in f.evidence[0] and "bf16" in f.evidence[-1]


@pytest.mark.parametrize("case", ["calm", "apart", "jumped_back", "back_from_the_init", "short"])
def test_output_logits_near_miss(tmp_path, case):
    """Healthy logits; logits growing apart (an overconfident or exploding model: the mean moved
    but the size is the spread); a drift that came back; a mean that started far off (a ReLU net
    at 3x He init starts at ~-5e6) and came down toward 0; too few steps to judge."""
    n = 8 if case == "short" else 200
    mean = {
        "calm": lambda i: 0.004 * i,
        "apart": lambda i: -0.1 * i,
        "jumped_back": lambda i: -40.0 if 80 <= i < 190 else 0.0,
        "back_from_the_init": lambda i: -5e6 * 0.5**i,
        "short": lambda i: -10.0 * i,
    }[case]
    st = _logits(steps(n), mean, spread=200.0 if case == "apart" else 8.0)
    assert "output_logits" not in {f.cause for f in diagnose(write(tmp_path, meta(), st))}


def test_output_logits_without_the_mean_reads_a_log_z_far_below_zero(tmp_path):
    st = _logits(steps(200), lambda i: -0.2 * i, with_mean=False)  # log Z 4 -> -36
    f = next(f for f in diagnose(write(tmp_path, meta(), st)) if f.cause == "output_logits")
    assert f.evidence[0].startswith("the log Z")
    # a log Z that rose (confident logits) says nothing without the mean
    st = _logits(steps(200), lambda i: 0.2 * i, with_mean=False)
    assert "output_logits" not in {f.cause for f in diagnose(write(tmp_path / "up", meta(), st))}


@pytest.mark.parametrize("spec", ["logit_drift:rate=0.3,p=1", "none"])
def test_output_logits_on_a_real_run_whose_logits_drift(tmp_path, spec):
    """A small classifier under the Guard's telemetry; with the drift injected, the finding; without
    it, none (the same run and data)."""
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = (x[:, :3] @ torch.tensor([1.0, -1.0, 0.5])).gt(0).long() + x[:, 3].gt(0).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    plan = gradguard.faults.parse(spec, seed=0)
    with gradguard.Guard(model, opt, "none", log_dir=tmp_path) as guard:
        for step in range(120):
            idx = torch.arange(step * 32, step * 32 + 32) % 512
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            plan.on_gradients(step, model)
            guard.step(loss)
    found = {f.cause for f in diagnose(load_run(tmp_path))}
    assert ("output_logits" in found) == (spec != "none"), found


def test_init_depth_fires_on_outputs_far_too_large_at_the_first_step(tmp_path):
    st = steps(60)
    for s in st:
        s["logits"] = {"absmax": 800.0 if s["step"] == 0 else 5.0, "logz": 3.0}
    f = next(f for f in diagnose(write(tmp_path, meta(), st)) if f.cause == "init_depth")
    assert "too large" in f.title and "800" in f.evidence[0]
    for s in st:
        s["logits"] = {"absmax": 5.0, "logz": 3.0}
    assert "init_depth" not in {f.cause for f in diagnose(write(tmp_path / "calm", meta(), st))}


def stuck_at_start(n: int = 120, absmax: float = 5e-3, dead: float = 0.0) -> list[dict]:
    """A run whose outputs start near zero (``absmax``) and whose loss never moves from ln 10."""
    st = steps(n)
    rng = random.Random(3)
    for s in st:
        s["loss"] = math.log(10) * (1 + 1e-4 * rng.gauss(0, 1))
        s["logits"] = {"absmax": absmax * (1 + s["step"] / n), "logz": math.log(10)}
        if s["update_ratio"] is not None:
            s["dead_units"] = [dead] * 5 + [None]
    return st


@pytest.mark.parametrize("absmax", [5e-3, 0.09, 0.2])  # 0.6x He over 12 layers; 0.7x; 0.8x
def test_init_depth_fires_on_outputs_near_zero_and_a_loss_that_never_moved(tmp_path, absmax):
    f = next(
        f
        for f in diagnose(write(tmp_path, meta(), stuck_at_start(absmax=absmax)))
        if f.cause == "init_depth"
    )
    assert f.title == "Initialization: outputs near zero from the start" and f.severity == "high"
    assert f"{absmax:.2g}" in f.evidence[0] and "within 2% of 2.3" in f.evidence[1]


@pytest.mark.parametrize("case", ["learns", "normal_outputs", "dead_from_the_start"])
def test_init_depth_near_zero_outputs_near_miss(tmp_path, case):
    st = stuck_at_start(
        absmax=0.5 if case == "normal_outputs" else 5e-3,
        dead=1.0 if case == "dead_from_the_start" else 0.0,
    )
    if case == "learns":  # tiny outputs at first, but the loss falls 5%: it is learning
        for s in st:
            s["loss"] *= 1 - 0.05 * s["step"] / len(st)
    assert init_depth(write(tmp_path, meta(), st)) is None


#: One run on which each rule must fire: a new rule without a firing case fails the contract test.
FIRING = {
    "lr_too_high": test_lr_too_high_fires_before_a_spike,
    "init_depth": test_init_depth_explode,
    "missing_normalization": test_missing_normalization_fires,
    "outlier_batch": test_outlier_batch_fires_on_the_spike_step,
    "single_bad_step": test_single_bad_step_fires,
    "fp16_overflow": test_fp16_overflow_frequent,
    "recurrent_explosion": test_recurrent_explosion_fires,
    "loss_degradation": test_loss_degradation_fires,
    "update_spike": test_update_spike_fires_on_an_lr_jump_followed_by_trouble,
    "label_noise": test_label_noise_fires_on_a_burst_of_loss_spikes_with_normal_inputs,
    "dead_units": test_dead_units_fires_when_most_hidden_units_stop_getting_gradient,
    "attention_logits": test_attention_logits_fires_when_the_logits_grow,
    "output_logits": test_output_logits_fires_when_the_logits_drift_together,
}


def test_every_rule_has_a_firing_case():
    assert sorted(FIRING) == sorted(list_rules())
    assert len(set(list_rules())) == len(RULES)


def _odd_runs() -> dict[str, RunLog]:
    """Runs with missing, null, empty and non-finite optional fields."""
    p = Path("telemetry.jsonl")
    nan, inf = math.nan, math.inf
    full = meta(normalization=False, amp=True, recurrent=["fc1"])
    nulls = [
        {
            "type": "step",
            "step": i,
            "loss": None,
            "lr": None,
            "layer_norms": None,
            "update_ratio": None,
            "weight_norms": None,
            "nonfinite_layers": None,
            "input": None,
            "amp_scale": None,
            "radius": None,
        }
        for i in range(30)
    ]
    broken = [
        {
            "type": "step",
            "step": i,
            "loss": nan,
            "lr": inf,
            "layer_norms": [nan, inf, 0.0, -1.0],  # shorter than the layers
            "update_ratio": [nan, inf, None, 0.0, 1e9, "x"],
            "nonfinite_layers": [0, 1, 99],
            "input": {"mean": nan, "std": 0.0, "absmax": None},
            "amp_scale": 0.0,
            "radius": {"fc1": nan, "ghost": 3.0, "fc2": None},
        }
        for i in range(30)
    ]
    odd_events = [
        {"type": "event", "kind": "grad_spike"},  # no step
        {"type": "event", "step": 3},  # no kind
        {"type": "event", "step": 4, "kind": "amp_overflow", "layers": None},
        {"type": "event", "step": 5, "kind": "nonfinite_grad", "layers": [7]},
    ]
    return {
        "empty": RunLog(path=p, meta={}),
        "meta_only": RunLog(path=p, meta=full),
        "bare_steps": RunLog(path=p, meta=full, steps=[{"step": i} for i in range(20)]),
        "nulls": RunLog(path=p, meta=full, steps=nulls, events=odd_events),
        "broken": RunLog(path=p, meta=full, steps=broken, events=odd_events),
        "events_only": RunLog(
            path=p, meta={"layers": ["a"], "amp": True, "recurrent": ["a"]}, events=odd_events
        ),
        "odd_meta": RunLog(
            path=p,
            meta={
                "layers": ["a", "b"],
                "layer_types": None,
                "forward_order": None,
                "recurrent": None,
            },
            steps=nulls,
            events=odd_events,
            end={"type": "end", "step": "many"},
        ),
        "null_meta": RunLog(
            path=p,
            meta={
                "layers": None,
                "forward_order": ["x", 1, 1],
                "amp": True,
                "normalization": False,
            },
            steps=broken,
            events=odd_events,
        ),
    }


@pytest.mark.parametrize("rule", RULES, ids=list_rules())
@pytest.mark.parametrize("name", list(_odd_runs()))
def test_rule_contract(rule, name):
    run = _odd_runs()[name]
    f = rule(run)
    assert f is None or isinstance(f, Finding)
    if f is not None:
        assert f.cause == rule.__name__
        assert f.summary and f.title and f.advice and f.evidence
        assert f.severity in SEVERITIES
        json.dumps(f.as_dict())


def test_diagnose_survives_odd_runs_and_a_broken_rule():
    for run in _odd_runs().values():
        found = diagnose(run)
        assert all(isinstance(f, Finding) for f in found)

    def broken(run):
        raise KeyError("step")

    with pytest.warns(UserWarning, match="broken failed"):
        assert diagnose(_odd_runs()["empty"], rules=[broken]) == []
