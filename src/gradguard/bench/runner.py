"""Run a grid: worker processes claim runs from the results database until none is left.

- parallel: ``workers`` processes (default one per core); each run trains with the threads its
  config names (``RunConfig.threads``, default 1), not a share of the cores, so a run's figures
  are the same whatever the worker count, the machine or the executor;
- or on a Ray cluster (``executor="ray"``): one Ray task per run; the driver (this process) owns
  the database, claims each run before submitting it and writes each result as its task ends, so
  the cluster's nodes need not share a filesystem;
- resumable: the database knows which runs are done; runs whose worker (or driver) died are reset
  and redone from scratch (see :mod:`gradguard.bench.store`);
- a progress bar over runs (tqdm), driven from the database;
- Ctrl-C: the worker processes ignore SIGINT (from their first instruction, so a terminal's
  Ctrl-C to the whole process group reaches only this process); this process stops them, hands
  back the runs they held (a run is stored whole, in one transaction, or not at all) and raises
  :class:`gradguard.errors.Interrupted` with how many runs are done.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from ..errors import ConfigError, Interrupted
from .config import RunConfig
from .store import ResultStore, this_owner
from .train import train_run

DB_NAME = "results.db"
EXECUTORS = ("local", "ray")
#: Ray tasks in flight at once, per CPU of the cluster: enough to keep every CPU busy while the
#: driver writes results, few enough that a huge grid does not flood the scheduler.
RAY_IN_FLIGHT_PER_CPU = 2


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"


#: Trainer modules renamed since a database could store them: its rows still train (0.1.0 stored
#: gradguard.advise.runs; gradguard.advise is a function now, the package gradguard.advice).
_RENAMED = {"gradguard.advise.runs": "gradguard.advice.runs"}


def train_stored(
    cfg: dict[str, Any], log_dir: str | Path | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one run from its stored config; return what :func:`train_run` returns.

    A config with a ``trainer`` key names the function that trains it, ``"gradguard.<module>:<fn>"``
    (called as ``fn(cfg, log_dir=log_dir)``): ``gradguard advise`` stores a user's own entry point
    this way, so its runs share the bench's database, workers, resume and progress bar. Any other
    config is a :class:`RunConfig`'s fields.
    """
    trainer = cfg.get("trainer")
    if trainer is None:
        return train_run(RunConfig.from_dict(cfg), log_dir=log_dir)
    module, _, name = str(trainer).partition(":")
    module = _RENAMED.get(module, module)
    # Only gradguard's own trainers: a results database names code to run, not any code.
    if not (module == "gradguard" or module.startswith("gradguard.")) or not name:
        raise ConfigError(
            f"trainer {trainer!r}: must name a gradguard function, gradguard.<module>:<fn>"
        )
    import importlib

    return getattr(importlib.import_module(module), name)(cfg, log_dir=log_dir)


#: Characters a run folder's name keeps; any run of others (a spec's ``:``, ``=``, ``,``, ``+``,
#: a path's ``/``) becomes one ``_``, so the name is one safe word per part, whatever the shell.
_UNSAFE = re.compile(r"[^A-Za-z0-9.]+")
#: Hex digits of the run key that end every name: they keep two names apart when the readable
#: parts coincide (two task options, two batch sizes, ...) or are cut.
NAME_HASH = 10
_PART_MAX = 40  # a long spec is cut here; the hash keeps the name unique


def _part(value: Any) -> str:
    text = _UNSAFE.sub("_", f"{value:g}" if isinstance(value, float) else str(value)).strip("_")
    return text[:_PART_MAX].rstrip("_") or "_"


def run_dir_name(config: Mapping[str, Any], key: str) -> str:
    """A run's folder name: what it is, then a short hash of its key,
    ``task-model[-optimizer]-mitigation[-faults]-lr<lr>-seed<seed>-<hash>``: the optimizer and the
    faults only where they are not :class:`RunConfig`'s defaults, each part cut to 40 characters
    and made safe for any filesystem (``skip_nonfinite+zclip:z_thresh=2.0`` becomes
    ``skip_nonfinite_zclip_z_thresh_2.0``). An entry-point run (``gradguard advise --entry``) is
    named by its function instead of the task and model. Recomputed from the stored config,
    never stored itself."""
    defaults = RunConfig()
    if config.get("trainer") is not None:
        parts = [str(config.get("entry", "entry")).rpartition(":")[2] or "entry"]
    else:
        parts = [config.get("task", defaults.task), config.get("model", defaults.model)]
        if config.get("optimizer", defaults.optimizer) != defaults.optimizer:
            parts.append(config["optimizer"])
    parts.append(config.get("mitigation", defaults.mitigation))
    if config.get("faults", defaults.faults) != defaults.faults:
        parts.append(config["faults"])
    parts += [f"lr{_part(float(config.get('lr', defaults.lr)))}"]
    parts += [f"seed{_part(config.get('seed', defaults.seed))}", key[:NAME_HASH]]
    return "-".join(_part(p) for p in parts)


def telemetry_dir(out_dir: str | Path, key: str, config: Mapping[str, Any]) -> Path:
    """Where a bench run's telemetry goes with ``telemetry=True``: ``OUT/runs/<name>``
    (:func:`run_dir_name`). A folder an older gradguard wrote, ``OUT/runs/<key>`` (the bare key), is
    found too: a finished run keeps its telemetry where it was written."""
    runs = Path(out_dir) / "runs"
    named, old = runs / run_dir_name(config, key), runs / key
    return old if old.is_dir() and not named.exists() else named


def _work(db_path: str, keys: Sequence[str], telemetry: bool = False) -> int:
    """Claim and train runs until none of ``keys`` is pending. Returns how many it ran. (Each run
    sets its own thread count: :func:`gradguard.bench.train.pinned_threads`.)"""
    store = ResultStore(db_path)
    owner = this_owner()
    n = 0
    try:
        while (claimed := store.claim(keys, owner=owner)) is not None:
            key, cfg = claimed
            log_dir = None
            if telemetry:
                # A run redone after a crash starts its telemetry afresh, like its metrics
                # (under its name, whatever folder an older gradguard had begun).
                runs = Path(db_path).parent / "runs"
                log_dir = runs / run_dir_name(cfg, key)
                for stale in (log_dir, runs / key):
                    shutil.rmtree(stale, ignore_errors=True)
            try:
                result, steps = train_stored(cfg, log_dir=log_dir)
            except Exception as e:
                store.fail(key, _error_text(e), owner=owner)
            except BaseException:  # Ctrl-C while training here: the run goes back to pending
                store.release(key, owner=owner)
                raise
            else:
                store.finish(key, result, steps, owner=owner)
            n += 1
    finally:
        store.close()
    return n


def run_grid(
    configs: Sequence[RunConfig],
    out_dir: str | Path,
    workers: int | None = None,
    progress: bool = True,
    executor: str = "local",
    ray_address: str | None = None,
    cpus_per_run: float = 1,
    telemetry: bool = False,
    desc: str = "bench",
) -> list[dict]:
    """Run every config not already done; return the finished runs of this grid.

    ``executor``: ``"local"`` (worker processes on this machine) or ``"ray"`` (one Ray task per
    run, see :func:`_run_ray`): the same rows, resume and table either way. ``ray_address``: the
    cluster to connect to (else ``RAY_ADDRESS``, else a local Ray of ``workers`` CPUs started for
    this call); ``cpus_per_run``: the CPUs each Ray task reserves (its runs train with their
    config's ``threads`` whatever it reserves: give it as many).
    ``telemetry``: each run also records the Guard's telemetry in ``OUT/runs/<name>`` (see
    :func:`run_dir_name`; for ``gradguard report``); local executor only. ``desc``: the progress bar's label.
    ``configs``: :class:`RunConfig` s, or any objects whose ``as_dict()`` gives a stored config
    (see :func:`train_stored`).
    """
    _check_executor(executor, telemetry, cpus_per_run)
    ray = _import_ray() if executor == "ray" else None  # before the database is touched
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    db = out / DB_NAME
    keys, todo = _add_runs(db, configs)
    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, len(todo) or 1))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(keys), initial=len(keys) - len(todo), unit="run", desc=desc)
    try:
        if todo:
            if ray is not None:
                _run_ray(ray, db, todo, bar, ray_address, workers, cpus_per_run)
            elif workers == 1 and _inline_ok(db, todo):
                _run_inline(db, todo, bar, telemetry)
            else:
                _run_pool(db, todo, workers, bar, len(keys), telemetry)
    except KeyboardInterrupt:
        with _sigint_ignored():  # a second Ctrl-C does not cut the clean-up short
            if bar is not None:
                bar.close()
            raise _interrupted(db, keys, todo, desc) from None
    if bar is not None:
        bar.close()
    with ResultStore(db) as store:
        return store.runs("done", keys)


def _check_executor(executor: str, telemetry: bool, cpus_per_run: float) -> None:
    """Refuse an executor, or options for it, that cannot run the grid."""
    if telemetry and executor != "local":
        raise ConfigError(
            "telemetry is written by the local executor only (Ray's nodes need not share a disk)"
        )
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    if not (isinstance(cpus_per_run, (int, float)) and cpus_per_run > 0):
        raise ConfigError(f"cpus_per_run must be a number > 0, got {cpus_per_run!r}")


def _add_runs(db: Path, configs: Sequence[RunConfig]) -> tuple[list[str], list[str]]:
    """Store the grid's runs (those already there are kept) and put runs of dead workers back
    to pending; return (the grid's run keys, the keys still to train)."""
    with ResultStore(db) as store:
        keys = store.add_runs([c.as_dict() for c in configs])
        store.reset_stale()
        todo = [r["key"] for r in store.runs("pending", keys)]
    return keys, todo


def _interrupted(db: Path, keys: list[str], todo: list[str], desc: str) -> Interrupted:
    """Hand back the runs this process's workers held (they are stopped by now) and say how many
    of the grid's runs are done."""
    owner = this_owner()
    with ResultStore(db) as store:
        for key in todo:  # a run trained here, interrupted while it was being stored
            store.release(key, owner=owner)
        store.reset_stale()  # the stopped workers' runs
        c = store.counts_of(keys)
    failed = f" ({c['failed']} failed)" if c["failed"] else ""
    where = "" if desc == "bench" else f" ({desc})"
    return Interrupted(
        f"interrupted{where}: {c['done'] + c['failed']} of {len(keys)} runs done{failed}; "
        "rerun the same command to resume"
    )


def _can_set_signals() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored inside (signal handlers can be set from the main thread only)."""
    if not _can_set_signals():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def _children_ignore_sigint():
    """Processes started inside ignore SIGINT from their first instruction: an ignored signal
    stays ignored across ``exec``, and Python then installs no KeyboardInterrupt handler. (Set in
    the worker itself, it would come after the seconds it takes to import torch, in which a
    Ctrl-C prints a traceback.) SIGINT is blocked meanwhile, so a Ctrl-C to this process waits
    until the end of the block instead of being lost."""
    mask = hasattr(signal, "pthread_sigmask")
    if mask:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with _sigint_ignored():
            yield
    finally:
        if mask:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _pool_worker(db_path: str, keys: Sequence[str], telemetry: bool) -> int:
    """A worker process: Ctrl-C is the parent's to handle (it stops the workers and hands back
    their runs), so a worker never prints a traceback for it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # already so when started by _run_pool
    return _work(db_path, keys, telemetry)


def _inline_ok(db: Path, todo: list[str]) -> bool:
    """Whether this process can train ``todo`` with each run's own thread count: always for torch
    runs; a Keras run needs TensorFlow's intra-op pool at its ``threads``, which TensorFlow fixes
    when its runtime starts, so once it runs here with another count the runs go to a fresh
    worker process instead."""
    from . import keras_train

    with ResultStore(db) as store:
        configs = [r["config"] for r in store.runs(None, todo)]
    wanted = {
        int(c.get("threads", 1))
        for c in configs
        if "trainer" not in c and keras_train.is_keras_model(str(c.get("model", "")))
    }
    if not wanted:
        return True
    return len(wanted) == 1 and keras_train.can_pin_threads(wanted.pop())


def _run_inline(db: Path, todo: list[str], bar, telemetry: bool = False) -> None:
    for key in todo:
        _work(str(db), [key], telemetry)
        if bar is not None:
            bar.update(1)


def _run_pool(
    db: Path, todo: list[str], workers: int, bar, total: int, telemetry: bool = False
) -> None:
    # spawn: a fresh interpreter per worker (fork would copy torch's thread pools and locks).
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_pool_worker, args=(str(db), todo, telemetry), daemon=True)
        for _ in range(workers)
    ]
    try:
        with _children_ignore_sigint():
            for p in procs:
                p.start()
        with ResultStore(db) as store:
            done_before = total - len(todo)
            while any(p.is_alive() for p in procs):
                time.sleep(0.5)
                if bar is not None:
                    c = store.counts_of(todo)
                    bar.n = done_before + c["done"] + c["failed"]
                    bar.refresh()
    finally:
        # Stopped mid-run (Ctrl-C, an error here), a worker loses only the run it held: its
        # result and metrics are written in one transaction, so nothing is stored half.
        with _sigint_ignored():
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                if p.pid is not None:
                    p.join()


# ----- Ray ----------------------------------------------------------------------------------------
def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--executor ray needs Ray, which is not installed: pip install 'gradguard[ray]'"
        ) from None
    return ray


def _train_task(cfg: dict) -> tuple[bool, Any]:
    """One run on a Ray worker: ``(True, (result, steps))``, or ``(False, error text)`` when
    training raised (recorded as a failed run, as the local workers do)."""
    try:
        return True, train_stored(cfg)
    except Exception as e:
        return False, _error_text(e)


def _run_ray(
    ray: Any,
    db: Path,
    todo: list[str],
    bar,
    address: str | None,
    workers: int,
    cpus_per_run: float,
) -> None:
    """Train ``todo`` as Ray tasks; this process, the driver, is the only one that opens ``db``.

    Each run is claimed (owner: this process) just before its task is submitted, so a concurrent
    bench never takes it, and a run another bench claimed first is skipped. Results are written
    with ``finish``/``fail`` as tasks end. A driver killed mid-way leaves its claims ``running``
    under a dead owner, which the next invocation's ``reset_stale`` puts back to ``pending``;
    a task Ray itself lost (a worker or node died) is released to ``pending`` for the next
    invocation. At most ``RAY_IN_FLIGHT_PER_CPU`` tasks per cluster CPU are in flight.
    """
    started = _ray_init(ray, address, workers, cpus_per_run)
    try:
        task = ray.remote(num_cpus=cpus_per_run)(_train_task)
        cpus = ray.cluster_resources().get("CPU", 1)
        bound = max(1, int(RAY_IN_FLIGHT_PER_CPU * cpus / cpus_per_run))
        with ResultStore(db) as store:
            lost = _ray_tasks(ray, task, store, todo, bound, bar)
        if lost:
            print(
                f"gradguard bench: {len(lost)} run(s) lost to Ray errors, left pending (rerun to"
                f" retry them); the first: {lost[0][:500]}",
                file=sys.stderr,
            )
    finally:
        if started:
            ray.shutdown()


def _ray_init(ray: Any, address: str | None, workers: int, cpus_per_run: float) -> bool:
    """Connect to Ray (``address``, else ``RAY_ADDRESS``, else a fresh local Ray of ``workers``
    runs' CPUs) unless a session is open already; return whether this call started one."""
    if ray.is_initialized():  # a session the caller opened (a notebook, a test)
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:  # "local": start a fresh one even if a `ray start` cluster runs on this machine
        ray.init(
            address="local",
            num_cpus=math.ceil(workers * cpus_per_run),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    return True


def _ray_tasks(
    ray: Any, task: Any, store: ResultStore, todo: list[str], bound: int, bar
) -> list[str]:
    """Claim, submit and record ``todo``'s runs, at most ``bound`` in flight; return the errors
    of the tasks Ray lost (their runs released to pending)."""
    owner = this_owner()
    queue = deque(todo)
    in_flight: dict[Any, str] = {}  # ObjectRef -> run key
    lost: list[str] = []
    try:
        while queue or in_flight:
            _submit_claimed(task, store, queue, in_flight, bound, owner, bar)
            if not in_flight:
                break
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            key = in_flight.pop(ref)
            try:
                ok, payload = ray.get(ref)
            except ray.exceptions.RayError as e:  # not training's error: Ray's
                store.release(key, owner=owner)
                lost.append(f"{type(e).__name__}: {e}")
                continue
            if ok:  # payload: (result, steps)
                store.finish(key, *cast("tuple[Any, Any]", payload), owner=owner)
            else:
                store.fail(key, payload, owner=owner)
            if bar is not None:
                bar.update(1)
    finally:  # interrupted (Ctrl-C, cluster gone): hand the claims back now
        for ref, key in in_flight.items():
            with contextlib.suppress(Exception):  # the cluster may be gone
                ray.cancel(ref)
            store.release(key, owner=owner)
    return lost


def _submit_claimed(
    task: Any,
    store: ResultStore,
    queue: deque[str],
    in_flight: dict[Any, str],
    bound: int,
    owner: str,
    bar,
) -> None:
    """Claim runs from ``queue`` and submit each as a task until ``bound`` are in flight; a run
    another bench claimed first is skipped (it is theirs)."""
    while queue and len(in_flight) < bound:
        claimed = store.claim([queue.popleft()], owner=owner)
        if claimed is None:  # another bench took it meanwhile: it is theirs
            if bar is not None:
                bar.update(1)
            continue
        key, cfg = claimed
        in_flight[task.remote(cfg)] = key
