"""The bench end to end: a tiny grid through training, SQLite and the table; resume without
recomputing; a run killed mid-way redone, never half-counted; bad grids refused up front."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from gradguard.bench import runner
from gradguard.bench.config import RunConfig, expand_grid
from gradguard.bench.runner import DB_NAME, run_grid
from gradguard.bench.store import ResultStore
from gradguard.bench.summary import summarize
from gradguard.bench.train import train_run
from gradguard.cli import main

from tests.helpers import KILL_MID_RUN

pytestmark = pytest.mark.slow

BASE = {
    "steps": 40,
    "batch_size": 32,
    "eval_every": 20,
    "optimizer": "momentum",
    "model_options": {"depth": 6, "width": 32},
}


def tiny_grid(**axes):
    return expand_grid(
        BASE, {"lr": [0.01, 0.5], "mitigation": ["none", "clip_norm:1.0"], "seed": [0], **axes}
    )


def test_train_run_measures_what_the_bench_compares():
    result, steps = train_run(RunConfig(**{**BASE, "lr": 0.05, "mitigation": "zclip"}))
    assert len(steps) == 40 and result["steps_run"] == 40
    assert {"loss", "grad_norm", "grad_norm_after", "clipped", "skipped", "lr"} <= set(steps[0])
    assert not result["diverged"] and 0.0 <= result["test_metric"] <= 1.0
    assert result["max_grad_norm"] >= result["median_grad_norm"] > 0
    assert 0 < result["guard_share"] < 1 and result["policy"] == "zclip"
    assert set(result["interventions"]) >= {"clipped", "skipped"}


def test_a_diverging_run_is_called_diverged():
    result, _ = train_run(RunConfig(**{**BASE, "lr": 3.0, "mitigation": "none"}))
    assert result["diverged"] and result["diverged_reason"] in (
        "nonfinite_weights",
        "nonfinite_loss",
        "loss_blowup",
        "at_chance",
    )
    guarded, _ = train_run(RunConfig(**{**BASE, "lr": 3.0, "mitigation": "default"}))
    assert (
        guarded["diverged_reason"] != "nonfinite_weights"
    )  # a Guard never lets NaN into the weights


def test_tiny_grid_end_to_end_through_sqlite_to_the_table(tmp_path, capsys):
    # The grid the command line below asks for (its eval_every is the bench's 50).
    grid = [replace(c, eval_every=50) for c in tiny_grid(seed=[0, 1])]
    runs = run_grid(grid, tmp_path, workers=2, progress=False)
    assert len(runs) == 8
    with ResultStore(tmp_path / DB_NAME) as store:
        assert store.counts() == {"pending": 0, "running": 0, "done": 8, "failed": 0}
        assert all(len(store.steps(r["key"])) == r["result"]["steps_run"] for r in runs)
    rows = summarize(runs)
    assert len(rows) == 4 and all(r["runs"] == 2 for r in rows)
    # The CLI on the same folder resumes (nothing left to do) and writes the outputs.
    argv = ["bench", "--lr", "0.01", "0.5", "--mitigation", "none", "clip_norm:1.0", "--seeds", "2"]
    argv += ["--steps", "40", "--batch-size", "32", "--optimizer", "momentum"]
    argv += ["--model-option", "depth=6", "--model-option", "width=32"]
    argv += ["--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mitigation" in out
    with ResultStore(tmp_path / DB_NAME) as store:  # nothing was left to do
        assert store.counts() == {"pending": 0, "running": 0, "done": 8, "failed": 0}


def test_rerun_skips_finished_runs(tmp_path, monkeypatch):
    calls = []
    real = runner.train_run

    def counting(cfg, **kw):
        calls.append((cfg.lr, cfg.mitigation))
        return real(cfg, **kw)

    monkeypatch.setattr(runner, "train_run", counting)
    grid = tiny_grid()
    run_grid(grid[:2], tmp_path, workers=1, progress=False)
    assert len(calls) == 2
    runs = run_grid(grid, tmp_path, workers=1, progress=False)
    assert len(calls) == 4 and len(runs) == 4  # only the two new runs were trained
    run_grid(grid, tmp_path, workers=1, progress=False)
    assert len(calls) == 4


def test_killed_bench_resumes_without_recomputing_or_double_counting(tmp_path):
    out = tmp_path / "bench"
    args = [
        sys.executable,
        "-m",
        "gradguard",
        "bench",
        "--lr",
        "0.01",
        "0.02",
        "0.03",
        "--mitigation",
        "none",
        "zclip",
        "--seeds",
        "1",
        "--steps",
        "100",
        "--workers",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    # kill -9 mid-grid: at step 50 of the 3rd run, after exactly 2 finished, however slow the
    # machine (no deadline, no polling).
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_RUN, "2", "50", *args[3:]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=900,  # a hang guard only
    )
    assert proc.returncode == -signal.SIGKILL
    db = out / DB_NAME
    with ResultStore(db) as store:
        assert store.counts() == {"pending": 3, "running": 1, "done": 2, "failed": 0}
        before = {r["key"]: r for r in store.runs("done")}
        assert store.integrity_ok()
    assert subprocess.run(args, capture_output=True).returncode == 0
    with ResultStore(db) as store:
        after = {r["key"]: r for r in store.runs("done")}
        assert store.counts() == {"pending": 0, "running": 0, "done": 6, "failed": 0}
        assert store.integrity_ok()
        for key, run in before.items():
            assert after[key]["result"] == run["result"]  # not recomputed
            assert len(store.steps(key)) == run["result"]["steps_run"]  # not double counted
    assert (out / "summary.md").exists() and (out / "summary.csv").exists()
    assert any(p.suffix == ".png" for p in out.iterdir())


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--task", "imagenet"], "unknown task"),
        (["--lr", "0"], "lr must be"),
        (["--mitigation", "zclipp"], "neither a model/optimizer variant"),
        (["--model", "resnet51"], "unknown model"),
        (["--faults", "nan:p=2"], "probability per step"),
        (["--faults", "meteor"], "unknown fault"),
    ],
)
def test_bad_grids_exit_2_before_any_run(tmp_path, capsys, argv, fragment):
    args = ["bench", *argv, "--out", str(tmp_path / "b")]
    if argv[0] == "--task":  # one through a real process: its exit status and stderr
        proc = subprocess.run(
            [sys.executable, "-m", "gradguard", *args], capture_output=True, text=True
        )
        status, err = proc.returncode, proc.stderr
    else:  # the others in this process (the same main(); starting Python costs seconds)
        status, err = main(args), capsys.readouterr().err
    assert status == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "b" / DB_NAME).exists()


def test_summary_rates(tmp_path):
    runs = run_grid(tiny_grid(), tmp_path, workers=1, progress=False)
    rows = {(r["lr"], r["mitigation"]): r for r in summarize(runs)}
    for (lr, mit), row in rows.items():
        (run,) = [r for r in runs if r["config"]["lr"] == lr and r["config"]["mitigation"] == mit]
        assert row["divergence_rate"] == float(run["result"]["diverged"])
        if math.isfinite(run["result"]["test_metric"]):
            assert row["metric_mean"] == pytest.approx(run["result"]["test_metric"])


@pytest.mark.parametrize("name", ["seed", "rnn", "transformer"])
def test_each_suite_trains(name):
    """A few steps of each suite's settings (every task/model pair it uses), through the real loop."""
    from gradguard.bench.config import suite

    seen = {}
    for cfg in suite(name):
        seen.setdefault((cfg.task, cfg.model), cfg)
    for cfg in seen.values():
        opts = dict(cfg.task_options)
        if cfg.task in ("adding", "temporal_order"):
            opts.update(n_train=64, n_test=64)
        result, steps = train_run(
            replace(
                cfg, steps=3, eval_every=3, batch_size=8, mitigation="default", task_options=opts
            )
        )
        assert len(steps) == 3 and result["steps_run"] == 3
        assert all(math.isfinite(s["grad_norm"]) for s in steps)


def test_a_fault_axis_runs_end_to_end_to_the_table(tmp_path):
    grid = expand_grid(
        BASE,
        {
            "lr": [0.05],
            "mitigation": ["none", "default"],
            "faults": ["none", "nan:at=10"],
            "seed": [0],
        },
    )
    runs = run_grid(grid, tmp_path, workers=1, progress=False)
    by = {(r["config"]["mitigation"], r["config"].get("faults", "none")): r["result"] for r in runs}
    assert by[("none", "nan:at=10")]["diverged_reason"] == "nonfinite_weights"
    assert by[("none", "nan:at=10")]["faults"] == {"nan": 1}
    guarded = by[("default", "nan:at=10")]
    assert not guarded["diverged"] and guarded["interventions"]["skipped"] == 1
    assert guarded["steps_to_recover"] == 0 and guarded["unrecovered"] == 0
    rows = {(r["mitigation"], r["faults"]): r for r in summarize(runs)}
    assert rows[("default", "nan:at=10")]["vs_clean"] is not None
    assert abs(rows[("default", "nan:at=10")]["vs_clean"]) < 0.05
    assert rows[("none", "nan:at=10")]["nonfinite_weights"] == 1


@pytest.mark.slow
def test_bench_killed_at_random_moments_loses_and_double_counts_nothing(tmp_path):
    """kill -9 the whole bench (driver and workers) at seeded random moments, several times in a
    row; after each kill the database is intact, every run finished before is still there and
    unchanged, and no run has more step rows than steps; the last rerun completes the grid."""
    import random

    out = tmp_path / "bench"
    args = [
        *(sys.executable, "-m", "gradguard", "bench", "--lr", "0.01", "0.03", "0.1"),
        *("--mitigation", "none", "zclip", "default", "--seeds", "1", "--steps", "60"),
        *("--workers", "2", "--out", str(out), "--no-progress"),
    ]
    db = out / DB_NAME
    rng = random.Random(7)
    finished: dict[str, dict] = {}
    for _ in range(4):
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        time.sleep(rng.uniform(1.0, 4.0))  # startup, mid-run or mid-write: wherever it falls
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if not db.exists():
            continue
        with ResultStore(db) as store:
            assert store.integrity_ok()
            done = {r["key"]: r for r in store.runs("done")}
            for key, run in finished.items():
                assert done[key]["result"] == run["result"]  # never lost, never recomputed
            for key, run in done.items():
                assert len(store.steps(key)) == run["result"]["steps_run"]
            finished = done
    assert subprocess.run(args, capture_output=True).returncode == 0
    with ResultStore(db) as store:
        assert store.counts() == {"pending": 0, "running": 0, "done": 9, "failed": 0}
        assert store.integrity_ok()
        for key, run in finished.items():
            assert store.runs("done", [key])[0]["result"] == run["result"]
