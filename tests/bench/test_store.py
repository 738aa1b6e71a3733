"""The results database: idempotent grids, exclusive claims, atomic finishes, and recovery of runs
whose worker died (a real ``kill -9``)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from gradguard.bench.store import ResultStore, run_key
from gradguard.errors import ConfigError

GRID = [
    {"task": "digits", "lr": lr, "seed": s, "policy": p}
    for lr in (0.01, 0.1)
    for s in (0, 1)
    for p in ("none", "zclip")
]


def test_keys_are_stable_and_grids_idempotent(tmp_path):
    assert run_key({"a": 1, "b": [1, 2]}) == run_key({"b": [1, 2], "a": 1})
    assert run_key({"a": 1}) != run_key({"a": 2})
    with ResultStore(tmp_path / "r.db") as store:
        keys = store.add_runs(GRID)
        assert len(set(keys)) == 8 and store.counts()["pending"] == 8
        key, cfg = store.claim()
        store.finish(
            key, {"accuracy": 0.9}, steps=[{"step": 0, "loss": 2.3}, {"step": 1, "loss": 1.1}]
        )
        assert store.add_runs(GRID) == keys  # rerunning the command: nothing new, nothing reset
        assert store.counts() == {"pending": 7, "running": 0, "done": 1, "failed": 0}
        (done,) = store.runs("done")
        assert done["config"] == cfg and done["result"] == {"accuracy": 0.9}
        assert store.steps(key) == [{"step": 0, "loss": 2.3}, {"step": 1, "loss": 1.1}]


def test_finish_needs_the_claim(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        (key,) = store.add_runs(GRID[:1])
        with pytest.raises(ConfigError, match="not running"):
            store.finish(key, {"x": 1})
        store.claim(owner="host:1")
        with pytest.raises(ConfigError, match="not running under"):
            store.finish(key, {"x": 1}, owner="host:2")
        store.finish(key, {"x": 1}, owner="host:1")
        with pytest.raises(ConfigError):
            store.finish(key, {"x": 2}, owner="host:1")  # never counted twice
        assert store.runs()[0]["result"] == {"x": 1}


def test_failed_runs_are_recorded_not_retried(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        store.add_runs(GRID[:2])
        key, _ = store.claim()
        store.fail(key, "ValueError: boom")
        assert store.counts()["failed"] == 1
        assert store.claim()[0] != key


def _claim_all(path, out):
    store = ResultStore(path)
    got = []
    while (c := store.claim()) is not None:
        got.append(c[0])
        store.finish(c[0], {"by": os.getpid()})
    out.put(got)


def test_concurrent_workers_never_take_the_same_run(tmp_path):
    path = tmp_path / "r.db"
    with ResultStore(path) as store:
        keys = store.add_runs([{"i": i} for i in range(60)])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(path, out)) for _ in range(3)]
    for p in procs:
        p.start()
    taken = [k for _ in procs for k in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=60)
    assert sorted(taken) == sorted(keys)  # every run once, none twice
    with ResultStore(path) as store:
        assert store.counts()["done"] == 60 and store.integrity_ok()


def test_a_killed_worker_leaves_nothing_half_counted(tmp_path):
    path = tmp_path / "r.db"
    with ResultStore(path) as store:
        store.add_runs(GRID)
    worker = textwrap.dedent(
        f"""
        import time
        from gradguard.bench.store import ResultStore
        store = ResultStore({str(path)!r})
        key, _ = store.claim()
        store.finish(key, {{"ok": 1}}, steps=[{{"step": 0, "loss": 1.0}}])
        key, _ = store.claim()
        print("claimed", flush=True)
        time.sleep(60)  # mid-run: metrics are in memory only
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", worker], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "claimed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with ResultStore(path) as store:
        assert store.counts() == {"pending": 6, "running": 1, "done": 1, "failed": 0}
        assert store.reset_stale() == 1
        assert store.counts() == {"pending": 7, "running": 0, "done": 1, "failed": 0}
        assert store.integrity_ok()
        # The finished run survived with its steps; the killed one is redone from scratch.
        (done,) = store.runs("done")
        assert store.steps(done["key"]) == [{"step": 0, "loss": 1.0}]


def test_live_workers_are_not_reset(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        store.add_runs(GRID[:2])
        store.claim()  # owned by this (live) process
        assert store.reset_stale() == 0
        assert store.counts()["running"] == 1


def test_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "r.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="not a gradguard results database"):
        ResultStore(bad)


def test_wal_mode(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_release_puts_only_its_own_claim_back(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        keys = store.add_runs(GRID[:2])
        mine, _ = store.claim([keys[0]], owner="me:1")
        theirs, _ = store.claim([keys[1]], owner="them:2")
        store.release(theirs, owner="me:1")  # not mine: untouched
        store.release(mine, owner="me:1")
        assert store.counts() == {"pending": 1, "running": 1, "done": 0, "failed": 0}
        assert store.claim(owner="me:1")[0] == mine  # pending again, claimable
