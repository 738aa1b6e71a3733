"""Does ``advise``'s short probe pick what a full sweep would? On two bench settings, the
recommendation must not diverge in any seed of the sweep and must be within 1 accuracy point of
the sweep's best policy.

What is measured
    For each setting, ``gradguard.advise`` runs under a steps budget (two seeds at most, stress
    levels cut to fit). Then every candidate the probe compared (its clip threshold is the
    probe's) is trained at the same length over seeds 0-3 with the bench runner, into the probe's
    own results database: a run of the same config is the same run (training is deterministic
    from the config), so the sweep trains only what the probe did not. The probe saw two seeds at
    most; the sweep judges its answer on four.

Settings where the sweep knows the best policy: the policies differ by more than the seeds do
(checked over 6 seeds; beyond the edge of stability, e.g. this MLP at lr 0.1, two policies trade
first place from seed to seed, and the order of a 4-seed mean is a coin toss):

* digits, a 12-layer plain ReLU MLP, SGD with momentum at lr 0.03 (the bench's quick suite): at
  the edge of stability, unguarded training diverges in some seeds and from 3x that LR; the
  policies end up to 6 points apart;
* temporal order (Hochreiter & Schmidhuber 1997) at T=20 with a vanilla tanh RNN whose recurrent
  weights start at 1.7x PyTorch's init, plain SGD at lr 0.3 (the rnn suite, smaller): unguarded
  or z-score-clipped, gradients explode and it stays at chance; clipped, it solves the task.

A setting also FAILs when the sweep cannot tell the policies apart (none diverges and none trails
the best by 5 points): then it does not test the probe.

Run
    python benchmarks/bench_advise_validation.py                  # both settings: ~4 min, 2 cores
    python benchmarks/bench_advise_validation.py --settings rnn --out /tmp/val

The results database in ``--out`` makes an interrupted benchmark resume where it stopped (a
fresh temporary folder without it). Exit status 1 if a setting fails.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

SWEEP_SEEDS = 4
#: The recommendation may trail the sweep's best policy by this much (accuracy, 0-1).
MARGIN = 0.01
#: The sweep knows the best policy if some policy diverges or trails the best by this much.
SPREAD = 0.05

SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "digits-mlp12-momentum": (
        {
            "task": "digits",
            "model": "mlp",
            "optimizer": "momentum",
            "lr": 0.03,
            "steps": 300,
            "batch_size": 64,
            "model_options": {"depth": 12, "width": 64},
        },
        "10500steps",
    ),
    "temporal_order-rnn-sgd": (
        {
            "task": "temporal_order",
            "model": "rnn",
            "optimizer": "sgd",
            "lr": 0.3,
            "steps": 400,
            "batch_size": 32,
            "task_options": {"T": 20, "n_train": 4000, "n_test": 500},
            "model_options": {"hidden": 32, "init_scale": 1.7},
        },
        "14000steps",
    ),
}


def summarize(runs: list[dict[str, Any]], specs: list[str]) -> dict[str, dict[str, Any]]:
    """Per policy: runs, diverged runs, and the mean and standard error of the test metric of
    the runs that did not diverge (nan if every run diverged)."""
    out = {}
    for spec in specs:
        res = [r["result"] for r in runs if r["config"]["mitigation"] == spec]
        acc = [x["test_metric"] for x in res if not x["diverged"]]
        se = statistics.stdev(acc) / math.sqrt(len(acc)) if len(acc) > 1 else math.nan
        out[spec] = {
            "runs": len(res),
            "diverged": sum(bool(x["diverged"]) for x in res),
            "mean": statistics.fmean(acc) if acc else math.nan,
            "se": se,
        }
    return out


def judge(chosen: str, sweep: dict[str, dict[str, Any]]) -> tuple[bool, str]:
    """(passes, why): the chosen policy diverged in no seed and is within MARGIN of the best
    policy that diverged in none, and the sweep tells the policies apart."""
    clean = {s: v["mean"] for s, v in sweep.items() if v["diverged"] == 0}
    if not clean:
        return False, "every policy diverged in some seed: no best policy"
    best_spec = max(clean, key=lambda s: clean[s])
    best = clean[best_spec]
    apart = any(v["diverged"] > 0 or v["mean"] < best - SPREAD for v in sweep.values())
    mine = sweep[chosen]
    if mine["diverged"]:
        return False, f"{chosen} diverged in {mine['diverged']} of {mine['runs']} seeds"
    if not apart:
        return False, f"no policy diverges or trails the best by {SPREAD:g}: nothing to tell apart"
    gap = best - mine["mean"]
    ok = gap <= MARGIN
    why = f"{chosen} {mine['mean']:.3f} vs best {best_spec} {best:.3f} ({gap * 100:+.1f} points"
    return ok, why + f"; allowed {MARGIN * 100:g})"


def validate(name: str, out: Path, workers: int) -> tuple[bool, list[str]]:
    """Advise, sweep and judge one setting; its lines of the report."""
    import gradguard
    from gradguard.bench.config import expand_grid
    from gradguard.bench.runner import run_grid

    setting, budget = SETTINGS[name]
    t0 = time.perf_counter()
    advice = gradguard.advise(setting, budget=budget, out=out, workers=workers, progress=False)
    specs = [r["spec"] for r in advice.table]
    base = {**setting, "eval_every": setting["steps"]}  # as advise stores its runs
    grid = expand_grid(base, {"mitigation": specs, "seed": list(range(SWEEP_SEEDS))})
    runs = run_grid(grid, out, workers=workers, progress=False)
    if len(runs) != len(grid):
        raise RuntimeError(f"{name}: {len(runs)} of {len(grid)} sweep runs came back")
    sweep = summarize(runs, specs)
    ok, why = (
        judge(advice.spec, sweep) if advice.trains else (False, "advise says it does not train")
    )
    plan = advice.plan
    lines = [
        f"{name}: advise (budget {budget}: {plan['runs']} runs, {plan['seeds']} seeds, "
        f"{plan['total_steps']} steps) recommends {advice.spec}",
        f"  sweep over seeds 0-{SWEEP_SEEDS - 1} ({time.perf_counter() - t0:.0f} s with the probe):",
    ]
    order = sorted(
        sweep, key=lambda s: -sweep[s]["mean"] if sweep[s]["mean"] == sweep[s]["mean"] else math.inf
    )
    for spec in order:
        v = sweep[spec]
        mark = "  <- advise" if spec == advice.spec else ""
        lines.append(
            f"    {spec:<40} diverged {v['diverged']}/{v['runs']}  "
            f"test accuracy {v['mean']:.3f} +- {v['se']:.3f}{mark}"
        )
    lines.append(f"  {'PASS' if ok else 'FAIL'}: {why}")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--settings",
        nargs="*",
        default=None,
        help=f"setting name prefixes (default: all): {', '.join(SETTINGS)}",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results folder (resumable)")
    args = ap.parse_args(argv)
    names = [
        n for n in SETTINGS if not args.settings or any(n.startswith(p) for p in args.settings)
    ]
    if not names:
        ap.error(
            f"no setting starts with {' or '.join(args.settings)}; settings: {', '.join(SETTINGS)}"
        )
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    root = args.out or Path(tempfile.mkdtemp(prefix="gradguard-advise-validation-"))
    verdicts = []
    for name in names:
        ok, lines = validate(name, root / name, args.workers)
        verdicts.append(ok)
        print("\n".join(lines), flush=True)
    print(f"{sum(verdicts)} of {len(verdicts)} settings PASS")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
