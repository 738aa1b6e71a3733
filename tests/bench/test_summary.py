"""The summary groups runs over seeds only: runs that differ in any other setting stay apart."""

from __future__ import annotations

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
