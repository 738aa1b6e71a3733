"""Where the quick suite's time goes: runs per second of ``gradguard bench``, end to end, and its
parts measured in the same run.

What is measured
    ``gradguard bench --workers W --out TMP --no-progress`` (the quick suite, or the slice given by
    ``--lr``/``--mitigation``/``--seeds``) in a fresh process, wall clock from start to exit;
    then, from the results it stored: the training itself (the sum of the runs' own
    ``wall_seconds``, divided by the workers: the part no runner can remove), and the summary
    with its plots (``write_outputs`` timed again on the same results). What is left is the
    runner's own cost: interpreter and torch start per worker, task and model setup per run,
    SQLite. Target (issue 18): the full quick suite in <= 45 s on 2 cores.

Run
    python benchmarks/bench_quick_suite.py                    # the quick suite: ~2 min on 2 cores
    python benchmarks/bench_quick_suite.py --lr 0.1 --seeds 1 # a slice: 11 runs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 45.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr", nargs="+")
    ap.add_argument("--mitigation", nargs="+")
    ap.add_argument("--seeds", type=int)
    args = ap.parse_args()
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    sys.path.insert(0, str(src))
    from gradguard.bench.runner import DB_NAME
    from gradguard.bench.store import ResultStore
    from gradguard.bench.summary import write_outputs

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gradguard", "bench", "--workers", str(args.workers)]
        cmd += ["--out", tmp, "--no-progress"]
        for flag in ("lr", "mitigation"):
            if getattr(args, flag):
                cmd += [f"--{flag}", *getattr(args, flag)]
        if args.seeds:
            cmd += ["--seeds", str(args.seeds)]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        total = time.perf_counter() - t0
        with ResultStore(Path(tmp) / DB_NAME) as store:
            runs = store.runs("done")
            train = sum(r["result"]["wall_seconds"] for r in runs)
            again = Path(tmp) / "again"
            again.mkdir()
            t1 = time.perf_counter()
            write_outputs(runs, store.steps, again)
            outputs = time.perf_counter() - t1
    n = len(runs)
    per_worker = train / args.workers
    rest = total - per_worker - outputs
    print(f"{n} runs in {total:.1f} s: {n / total:.2f} runs/s with {args.workers} workers")
    print(
        f"  training (sum of the runs' wall / workers)  {per_worker:6.1f} s  {per_worker / total:6.1%}"
    )
    print(f"  summary, tables and plots                   {outputs:6.1f} s  {outputs / total:6.1%}")
    print(f"  the rest (process and torch start, setup)   {rest:6.1f} s  {rest / total:6.1%}")
    if not (args.lr or args.mitigation or args.seeds):
        ok = total <= TARGET_S
        print(
            f"quick suite {total:.1f} s: {'within' if ok else 'ABOVE'} the {TARGET_S:.0f} s target"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
