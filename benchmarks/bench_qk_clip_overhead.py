"""Overhead of ``qk_clip``: a GPT training step with ``Guard(..., "qk_clip")`` against the same
step with ``Guard(..., "none")``, in the same run.

What is measured
    Two identical bench GPTs (``gradguard.bench`` model ``gpt``: d_model 128, 4 layers, 4 heads,
    context 128, vocabulary 256, batch 16) train in lockstep on the same batches, one step each in
    turn (alternating which goes first, to cancel drift): forward, backward, ``guard.step``, AdamW.
    ``qk_clip`` adds, per attention module and forward, the TorchFunctionMode its hooks enter (a
    Python call per torch function inside that module's forward) and one ``q @ k^T`` in float32
    with the causal mask (the max logit, without gradient); after the step, a few small kernels
    and a multiply of each block's ``qkv`` weight. ``tau=1e9`` (never binds) and ``tau=1`` (binds
    on every head) are both timed. Reported: median step time of each and the ratio to the
    unguarded ("none") step.

Run
    python benchmarks/bench_qk_clip_overhead.py            # ~1 min on 2 cores
    python benchmarks/bench_qk_clip_overhead.py --steps 30 --context 256
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import gradguard
from gradguard.bench.models.transformer import gpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    vocab = 256
    base = gpt((args.context,), vocab, d_model=128, n_layers=args.layers, n_heads=4)
    specs = {"none": "none", "qk_clip:tau=1e9": "qk_clip:tau=1e9", "qk_clip:tau=1": "qk_clip:tau=1"}
    runs = {}
    for name, spec in specs.items():
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs[name] = (model, opt, gradguard.Guard(model, opt, spec, check_finite=False))
    times: dict[str, list[float]] = {name: [] for name in specs}
    gen = torch.Generator().manual_seed(1)
    order = list(specs)
    for step in range(args.warmup + args.steps):
        x = torch.randint(0, vocab, (args.batch, args.context + 1), generator=gen)
        order = order[1:] + order[:1]  # rotate who goes first
        for name in order:
            model, opt, guard = runs[name]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            guard.step()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["none"])
    print(
        f"GPT d_model=128 layers={args.layers} heads=4 context={args.context} "
        f"batch={args.batch}, {args.steps} steps, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for name in specs:
        med = statistics.median(times[name])
        print(f"{name:>16}: {med * 1e3:8.1f} ms/step  {med / ref:5.3f}x")


if __name__ == "__main__":
    main()
