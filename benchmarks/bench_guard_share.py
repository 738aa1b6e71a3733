"""The default Guard's share of a real training step: ResNet-50 on the handwritten digits.

What is measured
    One training step of the bench's ResNet-50 on ``load_digits`` (batch 64, SGD with momentum),
    in two variants interleaved step by step: ``baseline`` (forward, backward,
    ``clip_grad_norm_(1.0)``, ``optimizer.step()``) and ``default`` (forward, backward,
    ``Guard(model, opt, "default").step(loss=loss)``, the weight check included, as users get
    it). Each variant has its own copy of the model and optimizer, fed the same batches. Reported:
    the median step time of each, and the Guard's extra time as a share of the baseline's step.

    Target: the default's extra time <= 2% of the training step (issue: the default's cost).

Run
    python benchmarks/bench_guard_share.py            # ~2 min on 2 cores
    python benchmarks/bench_guard_share.py --steps 6  # quicker, noisier
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from gradguard import Guard
from gradguard.bench.models import build_model
from gradguard.bench.tasks import make_task

TARGET = 0.02


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = make_task("digits")
    model_a = build_model("resnet50", task.input_shape, task.num_outputs)
    model_b = copy.deepcopy(model_a)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.01, momentum=0.9)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.01, momentum=0.9)
    guard = Guard(model_b, opt_b, "default")
    batches = task.batches(64, torch.Generator().manual_seed(0))

    def baseline(x, y):
        opt_a.zero_grad(set_to_none=True)
        task.loss(model_a(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model_a.parameters(), 1.0, foreach=True)
        opt_a.step()

    def guarded(x, y):
        opt_b.zero_grad(set_to_none=True)
        loss = task.loss(model_b(x), y)
        loss.backward()
        guard.step(loss=loss)

    times: dict[str, list[float]] = {"baseline": [], "default": []}
    for i in range(args.steps + 2):  # two untimed warmup steps
        x, y = next(batches)
        order = [("baseline", baseline), ("default", guarded)]
        for name, fn in order if i % 2 else order[::-1]:
            t = time.perf_counter()
            fn(x, y)
            if i >= 2:
                times[name].append(time.perf_counter() - t)
    base, dflt = (statistics.median(times[k]) for k in ("baseline", "default"))
    share = (dflt - base) / base
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} steps per variant")
    print(f"  baseline step (clip_grad_norm_ + SGD)  {base * 1e3:9.1f} ms")
    print(f"  default Guard step                      {dflt * 1e3:9.1f} ms")
    ok = share <= TARGET
    print(
        f"  Guard's extra time: {share:+.2%} of a step (target <= {TARGET:.0%})  {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
