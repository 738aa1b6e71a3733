#!/usr/bin/env bash
# The Guard's checks that need a CUDA GPU (CI has none, so they are skipped there): the CUDA tests
# (same numbers as torch, sync budget counted by CUDA, fp16 GradScaler overflow, fused optimizers,
# bf16, rollback, CPU+GPU parameters), then the overhead benchmark on the GPU with SGD and AdamW.
# Works from an installed gradguard or straight from the checkout. Logs go to $1 (default: .).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name())"
status=0
python3 -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log" || status=1
python3 benchmarks/bench_guard_overhead.py --device cuda 2>&1 | tee "$out/bench_cuda_sgd.log"
python3 benchmarks/bench_guard_overhead.py --device cuda --optimizer adamw --no-parts 2>&1 |
    tee "$out/bench_cuda_adamw.log"
exit $status
