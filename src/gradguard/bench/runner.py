"""Run a grid: worker processes claim runs from the results database until none is left.

- parallel: ``workers`` processes (default one per core), each with its torch threads set so the
  cores are not oversubscribed (``cores // workers``, at least 1);
- resumable: the database knows which runs are done; runs whose worker died are reset and redone
  from scratch (see :mod:`gradguard.bench.store`);
- a progress bar over runs (tqdm), driven from the database.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import RunConfig
from .store import ResultStore, this_owner
from .train import train_run

DB_NAME = "results.db"


def _work(db_path: str, keys: Sequence[str], threads: int) -> int:
    """Claim and train runs until none of ``keys`` is pending. Returns how many it ran."""
    torch.set_num_threads(threads)
    store = ResultStore(db_path)
    owner = this_owner()
    n = 0
    try:
        while (claimed := store.claim(keys, owner=owner)) is not None:
            key, cfg = claimed
            try:
                result, steps = train_run(RunConfig.from_dict(cfg))
            except Exception as e:
                store.fail(
                    key, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}", owner=owner
                )
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
) -> list[dict]:
    """Run every config not already done; return the finished runs of this grid."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    db = out / DB_NAME
    with ResultStore(db) as store:
        keys = store.add_runs([c.as_dict() for c in configs])
        store.reset_stale()
        todo = [r["key"] for r in store.runs("pending", keys)]
    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, len(todo) or 1))
    threads = max(1, cores // workers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(keys), initial=len(keys) - len(todo), unit="run", desc="bench")
    if todo:
        if workers == 1:
            _run_inline(db, todo, threads, bar)
        else:
            _run_pool(db, todo, workers, threads, bar, len(keys))
    if bar is not None:
        bar.close()
    with ResultStore(db) as store:
        return store.runs("done", keys)


def _run_inline(db: Path, todo: list[str], threads: int, bar) -> None:
    old = torch.get_num_threads()
    try:
        for key in todo:
            _work(str(db), [key], threads)
            if bar is not None:
                bar.update(1)
    finally:
        torch.set_num_threads(old)


def _run_pool(db: Path, todo: list[str], workers: int, threads: int, bar, total: int) -> None:
    # spawn: a fresh interpreter per worker (fork would copy torch's thread pools and locks).
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_work, args=(str(db), todo, threads), daemon=True)
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        with ResultStore(db) as store:
            done_before = total - len(todo)
            while any(p.is_alive() for p in procs):
                time.sleep(0.5)
                if bar is not None:
                    c = store.counts_of(todo)
                    bar.n = done_before + c["done"] + c["failed"]
                    bar.refresh()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
