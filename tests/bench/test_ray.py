"""The bench on Ray (``executor="ray"``): the same rows as the local executor, resume without
submitting a task, claims held by the driver, failed and lost runs, the CLI, and a clear error
without Ray (the one test that needs no Ray, and the one not marked slow).

One local Ray session (2 CPUs) is shared by the module; the first test instead lets ``run_grid``
start and stop its own, as the CLI does."""

from __future__ import annotations

import sys

import pytest

from gradguard.bench import runner
from gradguard.bench.config import expand_grid
from gradguard.bench.runner import DB_NAME, run_grid
from gradguard.bench.store import ResultStore, canonical_json, this_owner
from gradguard.cli import main
from gradguard.errors import ConfigError

BASE = {
    "steps": 20,
    "batch_size": 32,
    "eval_every": 10,
    "optimizer": "momentum",
    "model_options": {"depth": 3, "width": 16},
}
#: Result fields that measure time, so differ between any two executions of the same run.
TIMING = {"wall_seconds", "guard_seconds", "guard_share", "seconds_to_target"}


def tiny_grid():
    return expand_grid(BASE, {"lr": [0.01, 0.5], "mitigation": ["none", "clip_norm:1.0"]})


def rows(out) -> dict[str, tuple]:
    """Every run of a folder: its config, status, result less timing, error and step metrics."""
    with ResultStore(out / DB_NAME) as store:
        return {
            r["key"]: (
                r["config"],
                r["status"],
                canonical_json({k: v for k, v in (r["result"] or {}).items() if k not in TIMING}),
                r["error"],
                canonical_json(store.steps(r["key"])),  # NaN == NaN as text
            )
            for r in store.runs(None)
        }


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def submitted(ray_session, monkeypatch):
    """The configs of every Ray task the driver submits."""
    calls: list[dict] = []
    real_remote = ray_session.remote

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def remote(self, cfg, *args):
            calls.append(cfg)
            return self.handle.remote(cfg, *args)

    monkeypatch.setattr(
        ray_session, "remote", lambda **kw: lambda fn: Counting(real_remote(**kw)(fn))
    )
    return calls


@pytest.mark.slow
def test_ray_lands_the_same_rows_as_local_and_stops_the_ray_it_started(tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # the module's shared session; this test starts its own
        pytest.skip("a Ray session is already open")
    # The local rows in this process (a worker pool lands the same: tests/bench/test_reproducible.py).
    run_grid(tiny_grid(), tmp_path / "local", workers=1, progress=False)
    runs = run_grid(tiny_grid(), tmp_path / "ray", workers=2, progress=False, executor="ray")
    assert not ray.is_initialized()
    assert len(runs) == 4
    local, on_ray = rows(tmp_path / "local"), rows(tmp_path / "ray")
    assert set(on_ray) == set(local) and len(local) == 4
    for key, row in local.items():
        assert on_ray[key] == row and row[1] == "done"


@pytest.mark.slow
def test_rerun_submits_nothing_and_claims_of_another_bench_are_left_alone(
    tmp_path, ray_session, submitted, monkeypatch
):
    grid = tiny_grid()
    with ResultStore(tmp_path / DB_NAME) as store:  # another bench, alive elsewhere, holds one run
        keys = store.add_runs([c.as_dict() for c in grid])
        assert store.claim([keys[0]], owner="elsewhere:1")[0] == keys[0]
    monkeypatch.setattr(runner, "RAY_IN_FLIGHT_PER_CPU", 0.5)  # 2 CPUs -> one task at a time
    seen = []
    real_wait = ray_session.wait

    def wait(refs, **kw):  # what the database says while tasks are in flight
        with ResultStore(tmp_path / DB_NAME) as store:
            seen.append(
                (len(refs), store.counts()["running"], {r["owner"] for r in _running(store)})
            )
        return real_wait(refs, **kw)

    monkeypatch.setattr(ray_session, "wait", wait)
    runs = run_grid(grid, tmp_path, progress=False, executor="ray")
    assert len(submitted) == 3 and len(runs) == 3  # every run but the one held elsewhere
    assert keys[0] not in {r["key"] for r in runs}
    # Claimed before submitting, by the driver; never more in flight than the bound.
    assert seen and all(n == 1 and running == 2 for n, running, _ in seen)
    assert all(owners == {"elsewhere:1", this_owner()} for *_, owners in seen)
    before = rows(tmp_path)
    run_grid(grid, tmp_path, progress=False, executor="ray")
    assert len(submitted) == 3  # a rerun submits no task
    assert rows(tmp_path) == before
    with ResultStore(tmp_path / DB_NAME) as store:
        assert store.counts() == {"pending": 0, "running": 1, "done": 3, "failed": 0}


def _running(store):
    return [
        {"key": k, "owner": o}
        for k, o in store.conn.execute("SELECT key, owner FROM runs WHERE status = 'running'")
    ]


@pytest.mark.slow
def test_a_run_that_raises_lands_failed_with_its_error(tmp_path, ray_session, submitted):
    bad = expand_grid(
        {**BASE, "task": "mnist", "task_options": {"path": str(tmp_path / "no-such-dir")}},
        {"lr": [0.01]},
    )
    runs = run_grid([*tiny_grid()[:1], *bad], tmp_path, progress=False, executor="ray")
    assert len(runs) == 1 and len(submitted) == 2
    with ResultStore(tmp_path / DB_NAME) as store:
        (failed,) = store.runs("failed")
        assert "ConfigError" in failed["error"] and "no-such-dir" in failed["error"]
        assert store.steps(failed["key"]) == []
    run_grid([*tiny_grid()[:1], *bad], tmp_path, progress=False, executor="ray")
    assert len(submitted) == 2  # a failed run is not retried, as with the local executor


@pytest.mark.slow
def test_a_run_lost_to_ray_is_left_pending_and_redone_next_time(
    tmp_path, ray_session, submitted, monkeypatch, capsys
):
    real_get = ray_session.get
    crashed = []

    def get(ref, **kw):
        if not crashed:  # the first task's worker "dies"
            crashed.append(ref)
            raise ray_session.exceptions.WorkerCrashedError()
        return real_get(ref, **kw)

    monkeypatch.setattr(ray_session, "get", get)
    grid = tiny_grid()[:2]
    assert len(run_grid(grid, tmp_path, progress=False, executor="ray")) == 1
    assert "1 run(s) lost to Ray errors" in capsys.readouterr().err
    with ResultStore(tmp_path / DB_NAME) as store:
        assert store.counts() == {"pending": 1, "running": 0, "done": 1, "failed": 0}
    assert len(run_grid(grid, tmp_path, progress=False, executor="ray")) == 2
    assert len(submitted) == 3


@pytest.mark.slow
def test_the_cli_runs_the_bench_on_ray(tmp_path, ray_session, submitted, capsys):
    argv = ["bench", "--lr", "0.05", "--mitigation", "none", "--seeds", "1", "--steps", "10"]
    argv += ["--executor", "ray", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    assert len(submitted) == 1 and "mitigation" in capsys.readouterr().out
    assert (tmp_path / "summary.md").exists()
    assert main(argv) == 0 and len(submitted) == 1  # resumed: nothing submitted


def test_without_ray_a_clear_error_before_the_database(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"gradguard\[ray\]"):
        run_grid(tiny_grid(), tmp_path / "b", progress=False, executor="ray")
    argv = ["bench", "--lr", "0.01", "--mitigation", "none", "--seeds", "1", "--steps", "5"]
    assert main([*argv, "--executor", "ray", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "pip install 'gradguard[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "b" / DB_NAME).exists()
    with pytest.raises(ConfigError, match="unknown executor"):
        run_grid(tiny_grid(), tmp_path / "b", executor="dask")
