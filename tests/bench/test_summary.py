"""The summary groups runs over seeds only: runs that differ in any other setting stay apart."""

from __future__ import annotations

import pytest

from gradguard.bench.config import RunConfig
from gradguard.bench.summary import markdown_table, summarize, terminal_table


def run(seed: int, init_scale: float, diverged: bool, metric: float, mitigation: str = "none"):
    cfg = RunConfig(
        task="adding",
        model="rnn",
        lr=0.1,
        seed=seed,
        mitigation=mitigation,
        task_options={"T": 20},
        model_options={"hidden": 8, "init_scale": init_scale},
    )
    result = {
        "diverged": diverged,
        "test_metric": metric,
        "steps_to_target": None,
        "seconds_to_target": None,
        "guard_share": 0.0,
        "interventions": {},
    }
    return {"config": cfg.as_dict(), "result": result}


def test_runs_differing_in_a_model_option_are_not_pooled():
    runs = [
        run(0, 1.0, False, 0.10),
        run(1, 1.0, False, 0.20),
        run(0, 2.0, True, float("nan")),
        run(1, 2.0, True, float("nan")),
        run(0, 2.0, False, 0.05, mitigation="clip_norm:1"),
    ]
    rows = summarize(runs)
    assert [(r["options"], r["mitigation"], r["diverged"], r["runs"]) for r in rows] == [
        ("init_scale=1", "none", 0, 2),
        ("init_scale=2", "none", 2, 2),
        ("init_scale=2", "clip_norm:1", 0, 1),
    ]
    assert abs(rows[0]["metric_mean"] - 0.15) < 1e-12
    assert "init_scale=2" in terminal_table(rows)
    assert "| options |" in markdown_table(rows)


def test_options_column_is_empty_when_only_the_seed_varies():
    rows = summarize([run(0, 1.0, False, 0.1), run(1, 1.0, False, 0.3)])
    assert len(rows) == 1 and rows[0]["options"] == "" and rows[0]["runs"] == 2
    assert "options" not in markdown_table(rows)


def test_a_faulted_row_is_compared_with_the_same_setting_without_the_fault():
    def faulted(seed, faults, metric, recover=None):
        r = run(seed, 1.0, False, metric)
        if faults != "none":
            r["config"]["faults"] = faults
            r["result"].update(steps_to_recover=recover, unrecovered=0)
        return r

    rows = summarize(
        [
            faulted(0, "none", 0.90),
            faulted(1, "none", 0.92),
            faulted(0, "nan:p=0.01", 0.85, recover=3),
            faulted(1, "nan:p=0.01", 0.87, recover=5),
        ]
    )
    by = {r["faults"]: r for r in rows}
    assert by["none"]["vs_clean"] is None
    assert abs(by["nan:p=0.01"]["vs_clean"] - (-0.05)) < 1e-9
    assert by["nan:p=0.01"]["steps_to_recover"] == 4
    assert "vs clean" in markdown_table(rows) and "-0.050" in markdown_table(rows)


def test_steps_to_recover_counts_back_to_the_pre_fault_level():
    from gradguard.bench.train import steps_to_recover

    losses = [1.0] * 20 + [5.0, 3.0, 1.2, 1.05, 1.0] + [1.0] * 5 + [9.0] * 5
    # fault at 20: back within 10% of 1.0 at step 23; fault at 30: never back.
    assert steps_to_recover(losses, [20, 30]) == (3, 1)
    assert steps_to_recover(losses, []) == (None, 0)
    assert steps_to_recover([float("nan")] * 5, [2]) == (None, 0)  # no finite level before


def test_an_unmeasured_guard_share_shows_as_a_dash():
    """Keras runs cannot time the Guard apart from the compiled step: NaN, shown as "-"."""
    measured, unmeasured = run(0, 1.0, False, 0.1), run(0, 2.0, False, 0.1)
    measured["result"]["guard_share"] = 0.25
    unmeasured["result"]["guard_share"] = float("nan")
    rows = summarize([measured, unmeasured])
    md = markdown_table(rows)
    assert "25.0%" in md and "nan%" not in md
    assert "nan%" not in terminal_table(rows)


def test_the_score_counts_a_run_without_a_metric_at_chance():
    import math
    import statistics

    from gradguard.bench.tasks import make_task

    chance = make_task("adding", T=20).chance_metric
    runs = [
        run(0, 1.0, False, 0.10),
        run(1, 1.0, False, 0.20),
        run(2, 1.0, True, math.nan),  # diverged before the end: no metric
    ]
    (row,) = summarize(runs)
    assert row["metric_mean"] == pytest.approx(0.15)  # the runs that have a metric
    xs = [0.10, 0.20, chance]
    assert row["score_mean"] == pytest.approx(statistics.fmean(xs))
    assert row["score_se"] == pytest.approx(statistics.stdev(xs) / math.sqrt(3))
