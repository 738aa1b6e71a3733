"""The short probe against a full sweep (issue item 4): on two bench settings, ``advise``'s
recommendation does not diverge and is within 1 accuracy point of the best policy of a sweep of
every candidate over more seeds.

The sweep runs the candidates the probe compared (the clip threshold is the probe's), at the same
length, over seeds 0-3 with the bench runner. It shares the probe's results database: a run of the
same config is the same run (training is deterministic from the config), so the sweep trains only
what the probe did not, seeds 2 and 3 of every policy (and 0-1 of those the budget left out).
The probe saw two seeds at most, under a budget that made it cut stress levels; the sweep judges
its answer on four.

Settings where the sweep knows the best policy: the policies differ by more than the seeds do
(checked over 6 seeds; beyond the edge of stability, e.g. this MLP at lr 0.1, two policies trade
first place from seed to seed, and the order of a 4-seed mean is a coin toss):
- digits, a 12-layer plain ReLU MLP, SGD with momentum at lr 0.03 (the bench's quick suite): at
  the edge of stability, unguarded training diverges in some seeds and from 3x that LR; the
  policies end up to 6 points apart, with one best over 6 seeds (the skip ladder: 0.959 vs
  0.952 for the next);
- temporal order (Hochreiter & Schmidhuber 1997) at T=20 with a vanilla tanh RNN whose recurrent
  weights start at 1.7x PyTorch's init, plain SGD at lr 0.3 (the rnn suite, smaller): unguarded
  or z-score-clipped, gradients explode and it stays at chance; clipped, it solves the task.
"""

from __future__ import annotations

import math
import statistics

import pytest

import gradguard
from gradguard.bench.config import expand_grid
from gradguard.bench.runner import run_grid

pytestmark = pytest.mark.slow

SWEEP_SEEDS = 4
DIGITS_MLP = {
    "task": "digits",
    "model": "mlp",
    "optimizer": "momentum",
    "lr": 0.03,
    "steps": 300,
    "batch_size": 64,
    "model_options": {"depth": 12, "width": 64},
}
RNN_ORDER = {
    "task": "temporal_order",
    "model": "rnn",
    "optimizer": "sgd",
    "lr": 0.3,
    "steps": 400,
    "batch_size": 32,
    "task_options": {"T": 20, "n_train": 4000, "n_test": 500},
    "model_options": {"hidden": 32, "init_scale": 1.7},
}


def sweep(setting: dict, specs: list[str], out) -> dict[str, tuple[int, float]]:
    """(diverged runs, mean test accuracy of the others) per policy, over SWEEP_SEEDS seeds."""
    base = {**setting, "eval_every": setting["steps"]}  # as advise stores its runs
    grid = expand_grid(base, {"mitigation": specs, "seed": list(range(SWEEP_SEEDS))})
    runs = run_grid(grid, out, workers=2, progress=False)
    assert len(runs) == len(grid)
    out = {}
    for spec in specs:
        res = [r["result"] for r in runs if r["config"]["mitigation"] == spec]
        acc = [x["test_metric"] for x in res if not x["diverged"]]
        out[spec] = (sum(x["diverged"] for x in res), statistics.fmean(acc) if acc else math.nan)
    return out


@pytest.mark.parametrize(
    ("setting", "budget"),
    [(DIGITS_MLP, "10500steps"), (RNN_ORDER, "14000steps")],
    ids=["digits-mlp12-momentum", "temporal_order-rnn-sgd"],
)
def test_the_probes_answer_holds_in_a_full_sweep(tmp_path, setting, budget):
    advice = gradguard.advise(setting, budget=budget, out=tmp_path, workers=2, progress=False)
    assert advice.trains and advice.plan["total_steps"] <= int(budget.removesuffix("steps"))
    assert advice.plan["seeds"] == 2 and advice.plan["steps"] == setting["steps"]
    full = sweep(setting, [r["spec"] for r in advice.table], tmp_path)
    best = max(acc for div, acc in full.values() if div == 0)
    diverged, acc = full[advice.spec]
    report = f"{advice.spec}: {diverged} diverged, {acc:.4f} vs best {best:.4f}; sweep {full}"
    assert diverged == 0, report
    assert acc >= best - 0.01, report
    # The sweep knows the best policy only if the policies differ: some diverge or trail.
    assert any(div > 0 or acc < best - 0.05 for div, acc in full.values())
