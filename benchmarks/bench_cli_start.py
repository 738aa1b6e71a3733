"""How long the CLI's quick paths take to answer, against the interpreter's own start.

What is measured
    Wall time of ``python -m gradguard ARGS`` (median of ``--repeat`` runs, each a fresh process),
    for the paths a user types to look around: ``--help``, ``--version``, each subcommand's
    ``--help``, ``policies``, ``check SPEC``. In the same run: ``python -c pass`` (the interpreter
    and site start, which no command can go below) and ``python -c "import torch"`` (what each
    path cost when it imported torch). Target: every quick path <= 0.5 s on 2 cores, i.e. no
    torch import on those paths (tests/cli/test_cli_startup.py asserts that; the time is here).

Run
    python benchmarks/bench_cli_start.py             # ~30 s on 2 cores
    python benchmarks/bench_cli_start.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.5
PATHS = [
    ["--help"],
    ["--version"],
    ["bench", "--help"],
    ["train", "--help"],
    ["advise", "--help"],
    ["report", "--help"],
    ["policies"],
    ["check", "default"],
    ["check", "skip_nonfinite+zclip:z_thresh=2.0+update_clip+rollback"],
]


def wall(argv: list[str], repeat: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *argv], env=env, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    base = wall(["-c", "pass"], args.repeat)
    torch_s = wall(["-c", "import torch"], args.repeat)
    print(f"{'python -c pass':48s} {base:6.3f} s  (the floor)")
    label = 'python -c "import torch"'
    print(f"{label:48s} {torch_s:6.3f} s  (what an eager import costs)")
    worst = 0.0
    for argv in PATHS:
        t = wall(["-m", "gradguard", *argv], args.repeat)
        worst = max(worst, t)
        print(f"{'gradguard ' + ' '.join(argv):48s} {t:6.3f} s  (+{t - base:.3f} s over the floor)")
    ok = worst <= TARGET_S
    print(
        f"slowest quick path {worst:.3f} s: {'within' if ok else 'ABOVE'} the {TARGET_S} s target"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
