#!/usr/bin/env bash
# The Guard's checks that need a CUDA GPU (CI has none, so they are skipped there): the CUDA tests
# (same numbers as torch, sync budget counted by CUDA, fp16 GradScaler overflow, fused optimizers,
# bf16, rollback, CPU+GPU parameters, a bench run on the GPU), then the overhead benchmark on the
# GPU with SGD and AdamW, then (when SEED_SECONDS is given) the seed suite on the GPU for at most
# that long: resumable (its results folder is kept under ${SEED_OUT:-/tmp/seed-cuda}, so running
# the script again goes on where it stopped), summarized from whatever runs finished.
# Works from an installed gradguard or straight from the checkout. Logs go to $1 (default: .).
#
#   bash benchmarks/run_cuda_checks.sh OUT                  # checks and overhead (~3 min)
#   SEED_SECONDS=300 bash benchmarks/run_cuda_checks.sh OUT  # and the seed suite for 5 min
#   CHECKS=0 SEED_SECONDS=300 bash benchmarks/run_cuda_checks.sh OUT  # the seed suite alone
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, '|',
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" |
    tee "$out/device.log"
status=0
if [ "${CHECKS:-1}" != 0 ]; then
    timeout 150 python3 -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py 2>&1 |
        tee "$out/cuda_tests.log" || status=1
    timeout 100 python3 benchmarks/bench_guard_overhead.py --device cuda 2>&1 |
        tee "$out/bench_cuda_sgd.log" || status=1
    timeout 70 python3 benchmarks/bench_guard_overhead.py --device cuda --optimizer adamw \
        --no-parts 2>&1 | tee "$out/bench_cuda_adamw.log" || status=1
fi
if [ -n "${SEED_SECONDS:-}" ]; then
    seed_out="${SEED_OUT:-/tmp/seed-cuda}"
    workers="${SEED_WORKERS:-12}"
    start=$(date +%s)
    # SIGINT at the deadline: the bench stores what finished and says how far it got.
    # SEED_DEVICE / SEED_ARGS: a smoke run elsewhere (e.g. cpu, "--seeds 1 --steps 3").
    # shellcheck disable=SC2086
    timeout -s INT "$SEED_SECONDS" python3 -m gradguard bench --suite seed \
        --device "${SEED_DEVICE:-cuda}" ${SEED_ARGS:-} --workers "$workers" --no-progress \
        --out "$seed_out" 2>&1 | tee -a "$out/seed.log"
    echo "seed suite: $(($(date +%s) - start)) s this call, $workers workers" | tee -a "$out/seed.log"
    python3 - "$seed_out" "$out" <<'PY' 2>&1 | tee -a "$out/seed.log"
import shutil, sys
from pathlib import Path
from gradguard.bench.runner import DB_NAME
from gradguard.bench.store import ResultStore
from gradguard.bench.summary import terminal_table, write_outputs

src, dest = Path(sys.argv[1]), Path(sys.argv[2])
with ResultStore(src / DB_NAME) as store:
    runs = store.runs("done")
    rows = write_outputs(runs, store.steps, src)
    walls = sorted(r["result"]["wall_seconds"] for r in runs)
print(terminal_table(rows))
if walls:
    print(f"{len(runs)} runs done; wall per run: median {walls[len(walls) // 2]:.1f} s, "
          f"max {walls[-1]:.1f} s")
shutil.copy(src / "summary.csv", dest / "seed_summary.csv")
shutil.copy(src / DB_NAME, dest / "seed_results.sqlite")
PY
fi
exit $status
