"""What ``rollback``'s snapshots cost: their bytes against the parameters', and their time
amortized per step against an optimizer step.

What is measured
    For two parameter sets (those of ``bench_guard_overhead.py``: ResNet-50's 25.6M parameters in
    161 tensors, and a 0.67M-parameter MLP) and an optimizer (SGD with momentum: 1 state tensor
    per parameter; AdamW: 2 and a step count):

    * ``bytes``: the tensors one snapshot holds (the model's ``state_dict``, buffers included, and
      the optimizer state), as a multiple of the parameters' bytes; ``kept`` is the most rollback
      holds at once: 2 snapshots with the runaway trigger (the default), 1 without.
    * ``snapshot``: one ``take_snapshot`` (the finiteness pass, the copy to CPU memory; ``disk``:
      the ``torch.save`` with checksum and fsync) in optimizer steps, and amortized over ``every``
      steps (the default 100) as a fraction of one optimizer step. Timed interleaved with an
      optimizer step, round by round (``--rounds``); the median of the per-round ratios.
    * ``restore``: one rollback's restore (validation and copy back), in optimizer steps.
    * ``trigger``: the runaway trigger's own host work per step on a full window (the median and
      MAD of 100 losses, as on a step whose loss is above ``rel x level``; most steps need only the
      median), independent of the model.

Run
    python benchmarks/bench_rollback_snapshot.py            # ~1 min on 2 cores, 1 thread
    python benchmarks/bench_rollback_snapshot.py --quick    # ~10 s: the MLP, fewer calls
    python benchmarks/bench_rollback_snapshot.py --optimizer adamw --disk
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradguard
from bench_guard_overhead import PARAM_SETS, fixed_grads, make_optimizer
from gradguard import Guard

EVERY = 100  # rollback's default snapshot interval


def nbytes(obj) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(name: str, optimizer: str, rounds: int, disk: bool) -> None:
    model = PARAM_SETS[name]()
    params = list(model.parameters())
    grads = fixed_grads(params)
    opt = make_optimizer(optimizer, params)

    def refill() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g

    refill()
    opt.step()  # the optimizer state exists, as in a run
    p_bytes = sum(nbytes(p) for p in params)
    n_el = sum(p.numel() for p in params)
    print(f"\n== {name}: {n_el / 1e6:.2f}M parameters ({p_bytes / 2**20:.1f} MiB), {optimizer}")
    folder = tempfile.mkdtemp(prefix="gradguard-bench-") if disk else None
    for to in ("memory", "disk") if disk else ("memory",):
        spec = f"rollback:every={EVERY},to={to}" + (f",path={folder}" if to == "disk" else "")
        guard = Guard(model, opt, spec)
        pol = guard.policies[0]
        pol.take_snapshot(0)
        if to == "memory":
            s_bytes = nbytes(pol._snapshot)
            print(
                f"  snapshot bytes       {s_bytes / p_bytes:6.2f}x the parameters "
                f"({s_bytes / 2**20:.1f} MiB); at most {pol.keep} kept: "
                f"{pol.keep * s_bytes / p_bytes:.2f}x ({pol.keep * s_bytes / 2**20:.1f} MiB)"
            )
        # Interleaved round by round (an optimizer step, a snapshot, a restore), so that load from
        # other processes hits all three alike; the ratios are per round, then their median.
        step, snap, restore = [], [], []
        for _ in range(rounds):
            refill()
            step.append(timed(opt.step))
            snap.append(timed(lambda pol=pol: pol.take_snapshot(0)))
            restore.append(timed(pol.restore))
        ratio = statistics.median(b / a for a, b in zip(step, snap, strict=True))
        ms = 1e3 * statistics.median(step)
        print(f"  optimizer step       {ms:9.3f} ms")
        print(
            f"  snapshot ({to:6s})    {1e3 * statistics.median(snap):9.3f} ms = {ratio:.1f} optimizer "
            f"steps; amortized over every={EVERY}: {ratio / EVERY:.3f}x an optimizer step"
        )
        r_ratio = statistics.median(b / a for a, b in zip(step, restore, strict=True))
        print(
            f"  restore  ({to:6s})    {1e3 * statistics.median(restore):9.3f} ms = "
            f"{r_ratio:.1f} optimizer steps (once per rollback)"
        )
        guard.close()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    per_step = trigger_cost()
    print(
        f"  runaway trigger      {1e6 * per_step:9.1f} us/step (host work, whatever the model) = "
        f"{per_step / statistics.median(step):.4f}x this optimizer step"
    )


def trigger_cost(calls: int = 2000) -> float:
    """The runaway trigger's own host work per step, on a full window of 100 losses: the slow
    path (a loss above ``rel x level`` needs the MAD: two sorts of 100 floats) plus the window's
    append; the fast path (most steps) is one sort."""
    model = torch.nn.Linear(2, 2)
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.0), "rollback:window=100")
    pol = guard.policies[0]
    pol.state["losses"] = [1.0 + 0.01 * (i % 7) for i in range(100)]
    t = time.perf_counter()
    for _ in range(calls):
        pol._is_high(1.6)  # above 1.5 x the level: the MAD is computed
        pol.state["losses"] = [*pol.state["losses"], 1.01][-pol.window :]
    return (time.perf_counter() - t) / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    ap.add_argument("--quick", action="store_true", help="the MLP only, fewer calls (~10 s)")
    ap.add_argument("--disk", action="store_true", help="also snapshot to disk (a temp folder)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 9, quick 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 9)
    torch.set_num_threads(args.threads)
    print(
        f"gradguard {gradguard.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU, python {platform.python_version()}; "
        f"load average (1 min) {os.getloadavg()[0]:.2f}"
    )
    for name in ("mlp",) if args.quick else tuple(PARAM_SETS):
        measure(name, args.optimizer, rounds, args.disk)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
