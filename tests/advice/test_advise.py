"""gradguard advise end to end: the example entry point, budgets in steps (exact) and seconds
(within a margin), the clip threshold against numpy, resume after a kill, the CLI."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gradguard
from gradguard.advice.runs import TRAINER
from gradguard.bench import runner
from gradguard.bench.runner import DB_NAME
from gradguard.bench.store import ResultStore
from gradguard.cli import main
from gradguard.policies import parse_spec

from tests.helpers import KILL_MID_RUN

ROOT = Path(__file__).resolve().parents[2]
#: A small bench setting that trains in a fraction of a second per run.
SMALL = {
    "task": "digits",
    "model": "mlp",
    "optimizer": "momentum",
    "lr": 0.1,
    "batch_size": 32,
    "model_options": {"depth": 4, "width": 32},
}
SMALL_ARGS = ["--task", "digits", "--model", "mlp", "--optimizer", "momentum", "--lr", "0.1"]
SMALL_ARGS += ["--batch-size", "32", "--model-option", "depth=4", "--model-option", "width=32"]


@pytest.fixture
def repo_cwd(monkeypatch):
    """Run from the repository root, where ``examples`` is importable (as the example says; the
    root is on the path because ``tests`` is a package in it)."""
    monkeypatch.chdir(ROOT)


def db_runs(out: Path) -> list[dict]:
    with ResultStore(out / DB_NAME) as store:
        return [{**r, "steps": store.steps(r["key"])} for r in store.runs(None)]


def test_the_example_entry_point_within_a_steps_budget(tmp_path, repo_cwd):
    out = tmp_path / "adv"
    advice = gradguard.advise(
        entry="examples.advise_entry:build",
        budget="1000steps",
        steps=60,
        out=out,
        progress=False,
    )
    # The answer: a spec that parses, its one-liner, the evidence of every candidate.
    assert advice.spec in {r["spec"] for r in advice.table} and len(advice.table) == 8
    if advice.spec != "none":
        parse_spec(advice.spec)
    assert advice.code == f'guard = gradguard.Guard(model, optimizer, policy="{advice.spec}")'
    assert advice.metric == "eval score" and advice.higher_is_better
    assert advice.table[0]["spec"] == advice.spec and advice.table[0]["rank"] == 1
    text = str(advice)
    for part in ("Recommended policy: " + advice.spec, advice.code, "LR range probe", "Evidence"):
        assert part in text
    saved = json.loads((out / "advice.json").read_text())
    assert saved["spec"] == advice.spec and (out / "advice.md").exists()
    # The steps budget: planned exactly, never exceeded; the runs are the bench's rows.
    runs = db_runs(out)
    assert advice.plan["total_steps"] <= 1000 and len(runs) == advice.plan["runs"]
    assert sum(r["config"]["steps"] for r in runs) == advice.plan["total_steps"]
    assert sum(r["result"]["steps_run"] for r in runs) <= 1000
    assert all(r["config"]["trainer"] == TRAINER and r["status"] == "done" for r in runs)
    assert all(len(r["steps"]) == r["result"]["steps_run"] for r in runs)


def test_the_clip_threshold_is_numpys_percentile_of_the_healthy_runs_recorded_norms(tmp_path):
    out = tmp_path / "adv"
    advice = gradguard.advise(
        SMALL, budget="2000steps", steps=80, stress=(3,), out=out, progress=False
    )
    th = advice.threshold
    healthy = next(r for r in advice.probe["rows"] if r["lr"] == th["lr"])
    norms = [s["grad_norm"] for r in db_runs(out) if r["key"] == healthy["key"] for s in r["steps"]]
    expected = float(np.percentile([x for x in norms if math.isfinite(x)], 90))
    assert th["value"] == pytest.approx(expected * th["lr"] / advice.lr, rel=1e-12)
    assert th["scale"] == pytest.approx(th["lr"] / advice.lr)
    clip = next(r["spec"] for r in advice.table if r["spec"].startswith("clip_norm:"))
    assert float(clip.split(":")[1]) == pytest.approx(th["value"], rel=5e-3)


@pytest.mark.slow
def test_a_seconds_budget_is_respected_within_a_margin(tmp_path):
    budget = 25.0
    t0 = time.perf_counter()
    advice = gradguard.advise(SMALL, budget=f"{budget:g}s", out=tmp_path / "adv", progress=False)
    elapsed = time.perf_counter() - t0
    # Timings vary between processes and machines: the plan aims at 85% of the budget.
    assert elapsed <= 1.25 * budget, (elapsed, advice.plan)
    assert advice.spent["seconds"] <= elapsed and advice.plan["runs"] >= 10


@pytest.mark.slow
def test_a_killed_probe_resumes_without_recomputing(tmp_path, monkeypatch):
    out = tmp_path / "adv"
    argv = ["advise", *SMALL_ARGS, "--budget", "2400steps", "--steps", "60", "--workers", "1"]
    argv += ["--out", str(out), "--no-progress"]
    # kill -9 mid-probe: at step 20 of the 9th run, after exactly 8 finished, however slow the
    # machine (no deadline, no polling).
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_RUN, "8", "20", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=900,  # a hang guard only
    )
    assert proc.returncode == -signal.SIGKILL
    with ResultStore(out / DB_NAME) as store:
        counts = store.counts()
    assert counts["done"] == 8 and counts["running"] == 1 and counts["failed"] == 0, counts
    before = {r["key"]: r for r in db_runs(out) if r["status"] == "done"}

    calls = []
    real = runner.train_stored

    def counting(cfg, **kw):
        calls.append(cfg)
        return real(cfg, **kw)

    monkeypatch.setattr(runner, "train_stored", counting)
    assert main([*argv, "--json"]) == 0
    after = {r["key"]: r for r in db_runs(out)}
    assert all(r["status"] == "done" for r in after.values())
    # Only what was not finished was trained; what was finished is as it was.
    assert len(calls) == len(after) - len(before) > 0
    for key, run in before.items():
        assert after[key]["result"] == run["result"]
        assert len(after[key]["steps"]) == run["result"]["steps_run"]  # not double counted
    first = json.loads((out / "advice.json").read_text())
    calls.clear()
    assert main(argv) == 0
    assert calls == []  # a finished probe reruns nothing
    assert json.loads((out / "advice.json").read_text())["spec"] == first["spec"]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--budget", "300"], "budget must say its unit|is not understood"),
        (["--budget", "10steps"], "too small"),
        (["--task", "imagenet"], "unknown task"),
        (["--lr", "0"], "lr must be"),
        (["--stress", "0.5"], "stress levels are LR multiples"),
        (["--seeds", "0"], "seeds must be an integer"),
        (["--model-option", "depth"], "expected KEY=VALUE"),
        (["--model-option", "depht=3"], "unknown option"),
        (["--entry", "examples.advise_entry:build"], "give one or the other"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_any_run(tmp_path, capsys, extra, fragment):
    import re

    out = tmp_path / "adv"
    assert main(["advise", *SMALL_ARGS, *extra, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(fragment, err) and err.startswith("gradguard: error:"), err
    assert "Traceback" not in err and not (out / DB_NAME).exists()


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("not_a_module_xyz:build", "cannot import module 'not_a_module_xyz'"),
        ("examples.advise_entry:biuld", "has no 'biuld'; it defines: build, digits"),
        ("examples/advise_entry.py:build", "not a file path (e.g. examples.advise_entry:build"),
    ],
)
def test_a_bad_entry_point_exits_2(tmp_path, capsys, repo_cwd, entry, fragment):
    out = tmp_path / "adv"
    assert main(["advise", "--entry", entry, "--budget", "60s", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and not (out / DB_NAME).exists()


def test_the_out_folder_cannot_be_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["advise", *SMALL_ARGS, "--budget", "60s", "--out", str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
