"""A run's outcome: "diverged" (it blew up) is not "did not learn" (it ended at chance with calm
norms). The rule on synthetic step rows, on both sides of each threshold; real runs of each kind;
the summary counting both; rows stored before results had an outcome."""

from __future__ import annotations

import math

import pytest

from gradguard.bench.config import RunConfig
from gradguard.bench.loop import LoopRun
from gradguard.bench.outcome import (
    LOSS_RISE,
    LOSS_WINDOW,
    NORM_SPIKE,
    blowup_evidence,
    loss_levels,
    outcome_of,
)
from gradguard.bench.summary import markdown_table, summarize, terminal_table
from gradguard.bench.train import run_result, train_run


def rows(losses, norms):
    return [
        {"step": i, "loss": loss, "grad_norm": n, "grad_norm_after": n, "clipped": False}
        for i, (loss, n) in enumerate(zip(losses, norms, strict=True))
    ]


def result_of(steps, *, reason=None, chance=True, first_loss=None):
    """``run_result`` of ``steps`` whose final metric is at chance (``chance``) or not."""
    finite = [s["loss"] for s in steps if math.isfinite(s["loss"])]
    run = LoopRun(
        steps=steps,
        first_loss=first_loss if first_loss is not None else (finite[0] if finite else None),
        diverged_reason=reason,
        wall=1.0,
    )
    return run_result(
        run,
        {"loss": 2.3, "metric": 0.1 if chance else 0.95, "success": not chance},
        policy=None,
        off_target=lambda metric: "at_chance" if metric < 0.2 else None,
    )


N = 60
CALM_LOSS = [2.3] * N
CALM_NORMS = [1.0] * N


def with_spike(values, at, value):
    out = list(values)
    out[at] = value
    return out


def outcome(r):
    return r["outcome"], r["diverged"], r["did_not_learn"], r["diverged_reason"]


def test_calm_at_chance_did_not_learn():
    r = result_of(rows(CALM_LOSS, CALM_NORMS))
    assert outcome(r) == ("did_not_learn", False, True, "at_chance")
    assert r["initial_train_loss"] == pytest.approx(2.3) and r["peak_train_loss"] == pytest.approx(
        2.3
    )


def test_a_gradient_norm_spike_at_chance_diverged_just_above_the_threshold():
    # The median of the norms stays 1.0 with one spike among 60.
    over = result_of(rows(CALM_LOSS, with_spike(CALM_NORMS, 30, NORM_SPIKE * 1.01)))
    assert outcome(over) == ("diverged", True, False, "grad_norm_spike")
    under = result_of(rows(CALM_LOSS, with_spike(CALM_NORMS, 30, NORM_SPIKE * 0.99)))
    assert outcome(under) == ("did_not_learn", False, True, "at_chance")


def test_a_loss_rise_at_chance_diverged_just_above_the_threshold():
    def risen(level):  # ten consecutive losses at ``level`` x the first: the window mean is it
        return CALM_LOSS[:20] + [2.3 * level] * LOSS_WINDOW + CALM_LOSS[20 + LOSS_WINDOW :]

    over = result_of(rows(risen(LOSS_RISE * 1.01), CALM_NORMS))
    assert outcome(over) == ("diverged", True, False, "loss_spike")
    under = result_of(rows(risen(LOSS_RISE * 0.99), CALM_NORMS))
    assert outcome(under) == ("did_not_learn", False, True, "at_chance")


def test_one_noisy_batch_is_not_a_loss_rise():
    # 5x on one step: the 10-step mean rises to 1.4x, under the threshold.
    r = result_of(rows(with_spike(CALM_LOSS, 30, 2.3 * 5), CALM_NORMS))
    assert outcome(r)[0] == "did_not_learn"


def test_a_run_that_learned_is_trained_whatever_its_norms():
    r = result_of(rows(CALM_LOSS, with_spike(CALM_NORMS, 30, 1e6)), chance=False)
    assert outcome(r) == ("trained", False, False, None)


@pytest.mark.parametrize("reason", ["nonfinite_weights", "stalled", "rollback_exhausted"])
def test_a_run_stopped_for_blowing_up_diverged_even_with_calm_norms(reason):
    r = result_of(rows(CALM_LOSS[:20], CALM_NORMS[:20]), reason=reason)
    assert outcome(r) == ("diverged", True, False, reason)


def test_a_nonfinite_or_runaway_final_loss_diverged():
    nan_tail = result_of(rows([*CALM_LOSS[:-1], math.nan], CALM_NORMS))
    assert outcome(nan_tail) == ("diverged", True, False, "nonfinite_loss")
    runaway = result_of(rows(CALM_LOSS[:-6] + [100.0] * 6, CALM_NORMS))
    assert outcome(runaway) == ("diverged", True, False, "loss_blowup")


def test_loss_levels_windows_finite_losses():
    initial, peak = loss_levels([1.0] * 10 + [3.0] * 10 + [math.nan, None, 1.0])
    assert (initial, peak) == (1.0, 3.0)
    assert loss_levels([4.0, 2.0]) == (3.0, 3.0)  # fewer steps than a window
    assert all(math.isnan(x) for x in loss_levels([math.nan, None]))


def test_missing_figures_are_no_evidence():
    assert blowup_evidence(None, None) is None
    assert blowup_evidence(math.nan, 1.0, math.nan, 5.0) is None
    assert blowup_evidence(1000.0, 1.0) == "grad_norm_spike"


# ----- rows stored before results had an outcome ------------------------------------------------
def old_row(reason, max_norm=5.0, median_norm=1.0):
    """A result row as stored before outcomes: ``diverged`` true for every reason, no loss levels."""
    return {
        "diverged": reason is not None,
        "diverged_reason": reason,
        "max_grad_norm": max_norm,
        "median_grad_norm": median_norm,
    }


def test_an_old_row_at_chance_with_calm_norms_did_not_learn():
    assert outcome_of(old_row("at_chance")) == "did_not_learn"
    assert outcome_of(old_row("at_chance", max_norm=NORM_SPIKE * 1.01)) == "diverged"
    assert outcome_of(old_row("nonfinite_weights")) == "diverged"
    assert outcome_of(old_row(None)) == "trained"
    assert outcome_of({"diverged": True}) == "diverged"  # no reason recorded


def test_an_old_row_at_chance_is_judged_by_its_step_losses_when_given():
    risen = rows(CALM_LOSS[:20] + [2.3 * 3] * LOSS_WINDOW + CALM_LOSS[30:], CALM_NORMS)
    assert outcome_of(old_row("at_chance"), risen) == "diverged"
    assert outcome_of(old_row("at_chance"), rows(CALM_LOSS, CALM_NORMS)) == "did_not_learn"


def test_a_new_row_keeps_its_outcome():
    r = result_of(rows(CALM_LOSS, CALM_NORMS))
    r["max_grad_norm"] = 1e9  # what is stored is the answer; it is not re-judged
    assert outcome_of(r) == "did_not_learn"


# ----- the summary ---------------------------------------------------------------------------------
def run(seed, result, key=None):
    cfg = RunConfig(lr=0.3, seed=seed, mitigation="none")
    return {"key": key or f"k{seed}", "config": cfg.as_dict(), "result": result}


def base(result):
    return {
        "test_metric": 0.1,
        "steps_to_target": None,
        "seconds_to_target": None,
        "guard_share": 0.0,
        "interventions": {},
        **result,
    }


def test_the_summary_counts_diverged_and_did_not_learn_apart():
    calm = result_of(rows(CALM_LOSS, CALM_NORMS))
    spiked = result_of(rows(CALM_LOSS, with_spike(CALM_NORMS, 30, 1e4)))
    trained = result_of(rows(CALM_LOSS, CALM_NORMS), chance=False)
    runs = [run(0, calm), run(1, spiked), run(2, trained), run(3, base(old_row("at_chance")))]
    [row] = summarize(runs)
    assert (row["runs"], row["diverged"], row["did_not_learn"]) == (4, 1, 2)
    assert row["divergence_rate"] == 0.25
    md = markdown_table([row])
    assert "| diverged | did not learn |" in md and "| 1/4 | 2/4 |" in md
    term = terminal_table([row])
    assert "no learn" in term and "1/4" in term and "2/4" in term


def test_the_summary_reads_an_old_rows_steps_when_it_has_them():
    runs = [run(0, base(old_row("at_chance")), key="old")]
    risen = rows(CALM_LOSS[:20] + [2.3 * 3] * LOSS_WINDOW + CALM_LOSS[30:], CALM_NORMS)
    assert summarize(runs)[0]["did_not_learn"] == 1
    [row] = summarize(runs, steps_of={"old": risen}.__getitem__)
    assert (row["diverged"], row["did_not_learn"]) == (1, 0)


# ----- real runs -----------------------------------------------------------------------------------
BASE = {
    "steps": 40,
    "batch_size": 32,
    "eval_every": 20,
    "optimizer": "momentum",
    "model_options": {"depth": 6, "width": 32},
}


def test_a_calm_run_at_chance_did_not_learn():
    """An LR so small nothing moves in 40 steps: at chance, norms and loss flat."""
    r, _ = train_run(RunConfig(**{**BASE, "lr": 1e-6, "mitigation": "none"}))
    assert outcome(r) == ("did_not_learn", False, True, "at_chance")
    assert r["max_grad_norm"] < 2 * r["median_grad_norm"]
    assert r["peak_train_loss"] < 1.1 * r["initial_train_loss"]


def test_runs_that_blow_up_diverged():
    bare, _ = train_run(RunConfig(**{**BASE, "lr": 3.0, "mitigation": "none"}))
    assert outcome(bare) == ("diverged", True, False, "nonfinite_weights")
    # Guarded, the weights stay finite but the run ends at chance after a spike: diverged, not
    # "did not learn".
    # default_v1: its fixed clip keeps the weights finite while the run blows up (the new default's
    # update bound keeps this run training, so it is no example of a blow-up).
    guarded, _ = train_run(RunConfig(**{**BASE, "lr": 3.0, "mitigation": "default_v1"}))
    assert outcome(guarded) == ("diverged", True, False, "grad_norm_spike")
    assert guarded["max_grad_norm"] > NORM_SPIKE * guarded["median_grad_norm"]
    assert not guarded["success"]


@pytest.mark.slow
def test_the_bench_tables_count_both_end_to_end(tmp_path):
    from gradguard.bench.config import expand_grid
    from gradguard.bench.runner import DB_NAME, run_grid
    from gradguard.bench.store import ResultStore
    from gradguard.bench.summary import write_outputs

    grid = expand_grid(BASE, {"lr": [1e-6, 3.0], "mitigation": ["none"], "seed": [0]})
    runs = run_grid(grid, tmp_path, workers=1, progress=False)
    with ResultStore(tmp_path / DB_NAME) as store:  # as `gradguard bench` does
        write_outputs(runs, store.steps, tmp_path)
    csv_text = (tmp_path / "summary.csv").read_text().splitlines()
    head = csv_text[0].split(",")
    at = {float(line.split(",")[3]): line.split(",") for line in csv_text[1:]}
    counts = {
        lr: (at[lr][head.index("diverged")], at[lr][head.index("did_not_learn")]) for lr in at
    }
    assert counts == {1e-6: ("0", "1"), 3.0: ("1", "0")}
    assert "did not learn" in (tmp_path / "summary.md").read_text()
