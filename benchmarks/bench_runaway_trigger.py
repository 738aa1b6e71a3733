"""How close healthy runs come to ``rollback``'s runaway trigger, and how fast it catches an LR
burst: the measurement behind its defaults (``window=100, z=8, rel=0.5, patience=4``).

What is measured
    Each configuration below is trained once per seed by the bench's own loop (``train_run``) with
    a Guard that never rolls back (``skip_nonfinite``, or the chain named), and its per-step
    losses are replayed through a ``rollback`` with the trigger's parameters on a one-weight
    model (LR 0): the real trigger code, on the real losses. Reported per run:

    * ``margin``: over every stretch of ``patience`` steps, the smallest of
      ``(loss - level) / (threshold - level)`` (1.0: the trigger fires); the largest such stretch
      of the run. A healthy run must stay well below 1.
    * ``fires at``: the steps where the replayed trigger rolls back (none for a healthy run; the
      LR burst's runs must fire just after step 200).

    The healthy runs: the quick suite's 12-layer MLP on digits at LRs 0.01 and 0.03 unguarded,
    0.1 with the default chain and 0.3 with ZClip+AGC (its noisiest loss); the digits CNN; an
    LSTM on temporal order and a vanilla RNN (clipped) on adding, T=20; the transformer suite's
    GPT at LR 1e-3 and 1e-2 (the default chain). The faults: the faults suite's LR burst
    (``lr_burst:factor=100,steps=10,at=200``) on the MLP, unguarded but for ``skip_nonfinite``
    (its loss goes non-finite) and behind the default chain (finite but ruined).

Run
    python benchmarks/bench_runaway_trigger.py --quick     # the MLP runs, 1 seed: ~1 min
    python benchmarks/bench_runaway_trigger.py             # everything, 3 seeds: ~30 min, 2 cores
    python benchmarks/bench_runaway_trigger.py --save DIR  # also keep the loss traces as JSON
    python benchmarks/bench_runaway_trigger.py --load DIR  # replay stored traces (e.g. --z 6)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from gradguard import Guard

MLP = {"depth": 12, "width": 64}
DIGITS = {"task": "digits", "optimizer": "momentum", "steps": 300, "batch_size": 64}
RNN = {"optimizer": "sgd", "steps": 1500, "batch_size": 32, "task_options": {"T": 20}}
RNN_MODEL = {"hidden": 64, "init_scale": 1.7}
GPT = {
    "task": "charlm",
    "model": "gpt",
    "optimizer": "adamw",
    "steps": 400,
    "batch_size": 32,
    "task_options": {"context": 64, "max_chars": 300000},
    "model_options": {"d_model": 128, "n_layers": 2, "n_heads": 4},
}
BURST = "lr_burst:factor=100,steps=10,at=200"
CONFIGS = {
    "mlp lr 0.01": DIGITS | {"model": "mlp", "lr": 0.01, "model_options": MLP},
    "mlp lr 0.03": DIGITS | {"model": "mlp", "lr": 0.03, "model_options": MLP},
    "mlp lr 0.1 default": DIGITS
    | {"model": "mlp", "lr": 0.1, "model_options": MLP, "mitigation": "default"},
    "mlp lr 0.3 zclip+agc": DIGITS
    | {
        "model": "mlp",
        "lr": 0.3,
        "model_options": MLP,
        "mitigation": "skip_nonfinite+zclip+agc:0.01",
    },
    "cnn lr 0.03": DIGITS | {"model": "cnn", "lr": 0.03},
    "lstm temporal order": RNN
    | {"task": "temporal_order", "model": "lstm", "lr": 0.3, "model_options": RNN_MODEL},
    "rnn adding clipped": RNN
    | {
        "task": "adding",
        "model": "rnn",
        "lr": 0.1,
        "model_options": RNN_MODEL,
        "mitigation": "clip_norm:1.0",
    },
    "gpt lr 1e-3": GPT | {"lr": 1e-3},
    "gpt lr 1e-2 default": GPT | {"lr": 1e-2, "mitigation": "default"},
    "BURST mlp": DIGITS | {"model": "mlp", "lr": 0.03, "model_options": MLP, "faults": BURST},
    "BURST mlp default": DIGITS
    | {"model": "mlp", "lr": 0.03, "model_options": MLP, "faults": BURST, "mitigation": "default"},
}
QUICK = ("mlp lr 0.03", "mlp lr 0.3 zclip+agc", "BURST mlp default")


def train_losses(cfg: dict, seed: int) -> list[float]:
    from gradguard.bench.config import RunConfig
    from gradguard.bench.train import train_run

    cfg = {"mitigation": "skip_nonfinite"} | cfg | {"seed": seed}
    _, steps = train_run(RunConfig.from_dict(cfg))
    return [r["loss"] for r in steps]


def replay(losses: list[float], spec: str) -> tuple[float, int | None]:
    """(margin, the first step where it fires or None) of the trigger ``spec`` on a loss
    sequence, replayed up to that first firing (after it the real run would differ)."""
    model = torch.nn.Linear(1, 1, bias=False)
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.0), spec)
    pol = guard.policies[0]
    ratios: list[float] = []
    fired = None
    for t, loss in enumerate(losses):
        thr = pol.threshold()
        if thr is not None and math.isfinite(loss):
            level = statistics.median(pol.state["losses"])
            ratios.append((loss - level) / (thr - level) if thr > level else 0.0)
        model.weight.grad = torch.zeros_like(model.weight)
        if guard.step(loss=loss).rolled_back:
            fired = t
            break
    p = pol.patience
    stretches = [min(ratios[i : i + p]) for i in range(len(ratios) - p + 1)]
    return max(stretches, default=0.0), fired


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}; 1 seed")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per config (default 3)")
    ap.add_argument("--save", type=Path, help="write each run's losses here as JSON")
    ap.add_argument("--load", type=Path, help="replay the losses stored here instead of training")
    for name, default in (("window", 100), ("z", 8.0), ("rel", 0.5), ("patience", 4)):
        ap.add_argument(f"--{name}", type=type(default), default=default)
    args = ap.parse_args()
    spec = f"rollback:window={args.window},z={args.z},rel={args.rel},patience={args.patience}"
    seeds = range(args.seeds or (1 if args.quick else 3))
    names = QUICK if args.quick else tuple(CONFIGS)
    print(f"trigger: {spec}")
    print(f"{'run':<24} {'seed':>4} {'steps':>6} {'margin':>7}  fires at (first)")
    worst = 0.0
    for name in names:
        for seed in seeds:
            file = f"{name.replace(' ', '_')}_{seed}.json"
            t0 = time.perf_counter()
            if args.load:
                losses = json.loads((args.load / file).read_text())
            else:
                losses = train_losses(CONFIGS[name], seed)
                if args.save:
                    args.save.mkdir(parents=True, exist_ok=True)
                    (args.save / file).write_text(json.dumps(losses))
            margin, fired = replay(losses, spec)
            if not name.startswith("BURST"):
                worst = max(worst, margin)
            took = "" if args.load else f"   ({time.perf_counter() - t0:.0f} s)"
            fires = "-" if fired is None else str(fired)
            print(f"{name:<24} {seed:>4} {len(losses):>6} {margin:>7.2f}  {fires}{took}")
    print(f"\nhealthy runs: largest margin {worst:.2f} (1.0 fires)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
