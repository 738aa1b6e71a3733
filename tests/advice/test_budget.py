"""Fitting the probe into a budget: parsing, the exact steps accounting, the documented cut order,
a seconds cost model, and a clear refusal when even the smallest probe does not fit."""

from __future__ import annotations

import pytest

from gradguard.advice.budget import (
    MIN_STEPS,
    Budget,
    Cost,
    Plan,
    fit,
    parse_budget,
    seconds_cost,
)
from gradguard.errors import ConfigError

FULL = dict(
    max_steps=300, seeds=3, levels=(1.0, 3.0, 10.0), probe=(0.1, 0.3, 1, 3, 10, 30), candidates=7
)


@pytest.mark.parametrize(
    ("text", "kind", "amount"),
    [
        ("300s", "seconds", 300),
        ("300 sec", "seconds", 300),
        ("5min", "seconds", 300),
        ("1.5m", "seconds", 90),
        ("1h", "seconds", 3600),
        ("2000steps", "steps", 2000),
        ("2000 steps", "steps", 2000),
        ("1e4steps", "steps", 10000),
        (Budget("steps", 50), "steps", 50),
    ],
)
def test_budgets_parse(text, kind, amount):
    b = parse_budget(text)
    assert (b.kind, b.amount) == (kind, amount)


@pytest.mark.parametrize(
    "text", ["300", 300, "fast", "0s", "-5s", "2.5steps", "0steps", "10parsecs"]
)
def test_bad_budgets_are_refused_with_the_forms_that_work(text):
    with pytest.raises(ConfigError, match=r"300s|steps|seconds"):
        parse_budget(text)


def test_plan_counts_the_unguarded_seed0_runs_once():
    p = Plan(
        steps=100, seeds=2, levels=(1.0, 3.0), probe=(0.3, 1.0, 3.0), candidates=7, probe_steps=100
    )
    # 3 probe runs; 7 policies x 2 levels x 2 seeds, minus the 2 unguarded seed-0 runs the probe made
    assert p.runs == 3 + 28 - 2 and p.total_steps == p.runs * 100
    shorter = Plan(
        steps=50, seeds=2, levels=(1.0, 3.0), probe=(0.3, 1.0, 3.0), candidates=7, probe_steps=100
    )
    assert shorter.runs == 3 + 28  # runs of another length are new runs
    assert shorter.total_steps == 3 * 100 + 28 * 50


def test_a_generous_steps_budget_gets_the_full_plan():
    plan = fit(10**6, Cost(), **FULL)
    assert (plan.steps, plan.seeds, plan.levels, plan.cuts) == (300, 3, (1.0, 3.0, 10.0), ())
    assert plan.runs == 6 + 7 * 3 * 3 - 3


@pytest.mark.parametrize("budget", [500, 1000, 2000, 5000, 9000, 13500, 20000, 40000])
def test_a_steps_budget_is_never_exceeded(budget):
    plan = fit(budget, Cost(), **FULL)
    assert plan.total_steps <= budget
    assert plan.steps >= MIN_STEPS


def test_cuts_follow_the_documented_order():
    seen = []
    for budget in range(50_000, 400, -250):
        cuts = fit(budget, Cost(), **FULL).cuts
        for c in cuts:
            if c not in seen and not c.startswith("runs shortened"):
                seen.append(c)
    assert seen == [
        "seeds cut to 2",
        "probe LRs x0.1, x30 dropped",
        "stress level x10 dropped",
        "seeds cut to 1",
        "stress level x3 dropped",
    ]
    last = fit(600, Cost(), **FULL)
    assert last.cuts[-1].startswith("runs shortened to") and last.steps < 300
    assert last.levels == (1.0,) and last.seeds == 1 and last.probe == (0.3, 1, 3, 10)


def test_runs_are_shortened_only_once_everything_else_is_cut():
    for budget in range(50_000, 400, -500):
        plan = fit(budget, Cost(), **FULL)
        if plan.steps < 300:
            assert plan.seeds == 1 and plan.levels == (1.0,)


def test_too_small_a_budget_says_what_it_needs():
    with pytest.raises(ConfigError) as e:
        fit(100, Cost(), what=" 100 steps", **FULL)
    # the smallest probe: 4 probe runs + 7 policies at x1, 1 seed, minus the shared run: 10 x 50
    assert "budget 100 steps too small" in str(e.value) and "needs about 500 steps" in str(e.value)


def test_seconds_cost_spreads_runs_over_workers():
    cost = seconds_cost(setup_s=0.5, step_s=0.01, workers=4, startup_s=6.0)
    assert cost.of(runs=8, steps=100) == pytest.approx(6.0 + 8 * 0.5 / 4 + 800 * 0.01 / 4)
    plan = fit(30.0, cost, **FULL)
    spent = cost.of(plan.runs, plan.steps)
    assert spent <= 30.0


def test_replanning_after_the_probe_only_cuts_the_candidates():
    first = fit(10**6, Cost(), **FULL)
    after = fit(
        100.0,
        Cost(per_step=0.01),
        max_steps=first.steps,
        seeds=first.seeds,
        levels=first.levels,
        probe=first.probe,
        candidates=first.candidates,
        probe_steps=first.probe_steps,
    )
    assert after.probe == first.probe and after.probe_steps == first.probe_steps
    assert after.candidate_runs * after.steps * 0.01 <= 100.0
    assert after.seeds < first.seeds or after.levels != first.levels
