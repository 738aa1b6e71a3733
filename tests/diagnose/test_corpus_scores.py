"""The corpus benchmark's scoring (``benchmarks/bench_diagnosis.py``) on hand-made rows: recall
and precision count what each run's case expects of it, a run whose weights went NaN is judged on
its case's ``if_nonfinite``, and the table says how many runs that was."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_diagnosis", ROOT / "benchmarks" / "bench_diagnosis.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(case: str, strength, seed: int, found: list[str], truth: dict) -> dict:
    return {
        "key": f"{case}|{strength!r}|{seed}",
        "case": case,
        "strength": strength,
        "seed": seed,
        "found": found,
        "truth": truth,
    }


def test_a_nan_run_of_a_dead_relu_case_is_judged_on_the_lr(bench):
    finite = {"finite": True, "dead": 0.7, "dead_layer": 1.0}
    nan = {"finite": False, "dead": None, "dead_layer": None}
    rows = [
        _row("dead_relu/lr", 0.3, 0, ["dead_units", "missing_normalization"], finite),
        _row("dead_relu/lr", 0.3, 1, ["lr_too_high", "dead_units"], nan),
        _row("dead_relu/lr", 0.3, 2, ["missing_normalization"], nan),
    ]
    s = bench.scores(rows)
    # dead units are expected of the finite run only, the LR of the two NaN runs
    assert (s["dead_units"]["expected"], s["dead_units"]["recalled"]) == (1, 1)
    assert (s["lr_too_high"]["expected"], s["lr_too_high"]["recalled"]) == (2, 1)
    assert s["lr_too_high"]["recall"] == 0.5
    # dead units in a NaN run may have come before the NaN: not a false finding
    assert s["dead_units"]["precision"] == 1.0
    text, ok = bench.report(rows)
    assert not ok
    assert "dead_relu/lr: 2 of 3 runs ended with non-finite weights (judged on lr_too_high)" in text
    assert "dead_relu/lr|0.3|2: found ['missing_normalization']" in text


def test_a_false_finding_lowers_precision(bench):
    rows = [
        _row("outlier", 1e3, 0, ["outlier_batch"], {"finite": True, "dead": 0.0}),
        _row("outlier", 1e3, 1, ["outlier_batch", "dead_units"], {"finite": True, "dead": 0.1}),
    ]
    s = bench.scores(rows)
    assert s["outlier_batch"]["recall"] == 1.0
    assert s["dead_units"]["precision"] == 0.0
