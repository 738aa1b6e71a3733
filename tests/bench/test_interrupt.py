"""Ctrl-C during ``gradguard bench``, ``advise`` and ``train``: one line on stderr, no traceback
from the command or its workers, exit status 130; every run stored whole or not at all, none left
claimed, and rerunning the same command finishes the grid without redoing a finished run.

Each test waits for a stored run (or a training step) before it interrupts, polling the SQLite
file (or stderr) under a generous deadline that only guards against a hang, so a loaded machine
makes it slower, not flaky."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gradguard.bench.runner import DB_NAME, run_dir_name, telemetry_dir
from gradguard.bench.store import ResultStore

pytestmark = pytest.mark.slow  # each starts the command line, torch and workers, then reruns it

HANG_GUARD_S = 600
LINE = re.compile(r"interrupted: (\d+) of (\d+) runs done; rerun the same command to resume")


def _sigint_default() -> None:
    """In the child before it starts Python: SIGINT back to its default. A shell starts a
    background job with SIGINT ignored, the child would inherit that, and Python installs its
    Ctrl-C handler only where SIGINT is not ignored (a test run launched with ``&`` would fail)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "gradguard", *argv]


def _done(db: Path) -> int:
    """Runs stored as done, read without taking a write lock (0 before the file exists)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'done'").fetchone()[0]
    except sqlite3.Error:  # the schema is not written yet
        return 0


def _interrupt_after_a_run(args: list[str], db: Path, group: bool) -> tuple[int, str]:
    """Start ``args`` in a session of its own, wait until a run is stored, send SIGINT to its
    process group (a terminal's Ctrl-C) or to the command only; return (status, stderr)."""
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_sigint_default,
    )
    deadline = time.monotonic() + HANG_GUARD_S
    while _done(db) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    (os.killpg if group else os.kill)(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    return proc.returncode, err


def _assert_one_line(status: int, err: str, pattern: re.Pattern = LINE) -> re.Match:
    assert status == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    match = pattern.fullmatch(lines[0])
    assert match, err
    return match


def _assert_whole(db: Path, total: int | None = None) -> dict:
    """No run left claimed, every done run has exactly its steps' rows; the status counts."""
    with ResultStore(db) as store:
        assert store.integrity_ok()
        counts = store.counts()
        assert counts["running"] == 0
        for run in store.runs("done"):
            assert len(store.steps(run["key"])) == run["result"]["steps_run"]
        if total is not None:
            assert sum(counts.values()) == total
        return counts


@pytest.mark.parametrize(
    ("group", "workers"),
    # Each case costs ~30 s of fresh interpreters on 2 cores: the two that differ most.
    [(True, "2"), (False, "1")],
    ids=["ctrl-c-to-the-group-with-workers", "sigint-to-the-parent-running-the-runs"],
)
def test_ctrl_c_during_bench_prints_one_line_and_resumes(tmp_path, group, workers):
    out = tmp_path / "bench"
    db = out / DB_NAME
    args = _cli(
        *("bench", "--lr", "0.01", "--mitigation", "none", "zclip", "--seeds", "4"),
        *("--steps", "50", "--workers", workers, "--out", str(out), "--no-progress"),
    )
    status, err = _interrupt_after_a_run(args, db, group)
    done, total = map(int, _assert_one_line(status, err).groups())
    assert total == 8 and 1 <= done < 8
    counts = _assert_whole(db, total=8)
    assert counts["done"] == done and counts["pending"] == 8 - done
    with ResultStore(db) as store:
        before = {r["key"]: r["result"] for r in store.runs("done")}

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert rerun.returncode == 0, rerun.stderr
    assert _assert_whole(db, total=8) == {"pending": 0, "running": 0, "done": 8, "failed": 0}
    with ResultStore(db) as store:
        for key, result in before.items():  # not recomputed
            assert store.runs("done", [key])[0]["result"] == result


def test_ctrl_c_during_advise_prints_one_line_and_resumes(tmp_path):
    out = tmp_path / "advise"
    db = out / DB_NAME
    args = _cli(
        # 18 runs of 50 steps (plenty left to interrupt after the first), in two phases, trained
        # in the command's own process: Ctrl-C to a group with workers is the bench test's case,
        # the advise phases are this one's (each spawned worker would start torch again).
        *("advise", "--budget", "1000steps", "--workers", "1", "--steps", "50"),
        *("--out", str(out), "--no-progress"),
    )
    status, err = _interrupt_after_a_run(args, db, group=True)
    phase = re.compile(
        r"interrupted \(advise [12]/2: [^)]+\): (\d+) of (\d+) runs done; "
        "rerun the same command to resume"
    )
    _assert_one_line(status, err, phase)
    _assert_whole(db)

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert rerun.returncode == 0, rerun.stderr
    counts = _assert_whole(db)
    assert counts["pending"] == 0 and counts["done"] > 0
    assert (out / "advice.json").exists()
    with ResultStore(db) as store:  # the LR probe's telemetry, each run in its named folder
        probe = [r for r in store.runs("done") if r["config"]["mitigation"] == "none"]
    assert probe
    for run in probe:
        folder = telemetry_dir(out, run["key"], run["config"])
        assert folder.name == run_dir_name(run["config"], run["key"])
        assert (folder / "telemetry.jsonl").exists()


def test_ctrl_c_during_train_says_the_step(tmp_path, group=True):
    proc = subprocess.Popen(
        _cli("train", "--steps", "100000", "--out", str(tmp_path / "run")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_sigint_default,
    )
    chunks: list[bytes] = []

    def read() -> None:  # the progress bar rewrites its line with \r: read as it comes
        while chunk := proc.stderr.read1(4096):
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + HANG_GUARD_S
    stepped = re.compile(rb" [1-9]\d*/100000 ")  # the bar shows a finished step
    while not stepped.search(b"".join(chunks)) and proc.poll() is None:
        assert time.monotonic() < deadline, "no training step in time"
        time.sleep(0.05)
    assert proc.poll() is None
    (os.killpg if group else os.kill)(proc.pid, signal.SIGINT)
    proc.wait(timeout=HANG_GUARD_S)
    reader.join(timeout=HANG_GUARD_S)
    err = b"".join(chunks).decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]  # after the bar's own lines
    match = re.fullmatch(r"interrupted at step (\d+) of 100000", last)
    assert match and int(match.group(1)) >= 1, err
