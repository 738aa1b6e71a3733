"""The short probe against a full sweep: the measurement is
``benchmarks/bench_advise_validation.py`` (its stored output in docs/advise.md; ~4 min, too long
for the suite). Here its verdict on hand-made sweeps: the recommendation may trail the best policy
that never diverged by at most 1 point and must never diverge, and a sweep whose policies do not
differ tests nothing; its summary from bench rows."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_advise_validation", ROOT / "benchmarks" / "bench_advise_validation.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _v(mean: float, diverged: int = 0, runs: int = 4) -> dict:
    return {"runs": runs, "diverged": diverged, "mean": mean, "se": 0.0}


def test_within_the_margin_of_the_best_passes_and_beyond_it_fails(bench):
    sweep = {"a": _v(0.950), "b": _v(0.941), "c": _v(0.930), "none": _v(0.5, diverged=2)}
    assert bench.judge("a", sweep)[0]
    assert bench.judge("b", sweep)[0]  # 0.9 points short
    ok, why = bench.judge("c", sweep)
    assert not ok and "+2.0 points" in why and "best a 0.950" in why


def test_a_recommendation_that_diverges_fails_whatever_its_mean(bench):
    sweep = {"a": _v(0.99, diverged=1), "b": _v(0.90), "none": _v(0.5, diverged=3)}
    ok, why = bench.judge("a", sweep)
    assert not ok and "diverged in 1 of 4" in why
    # The best is taken among policies that never diverged: b.
    assert bench.judge("b", sweep)[0]


def test_a_sweep_whose_policies_do_not_differ_tests_nothing(bench):
    flat = {"a": _v(0.95), "b": _v(0.94), "c": _v(0.92)}
    ok, why = bench.judge("a", flat)
    assert not ok and "nothing to tell apart" in why
    flat["c"] = _v(0.899)  # one trails by more than 5 points: now the sweep can tell
    assert bench.judge("a", flat)[0]
    assert not bench.judge("a", {"a": _v(0.9, diverged=1)})[0]  # no clean policy at all


def test_summary_counts_diverged_runs_and_averages_the_others(bench):
    def run(spec: str, acc: float, diverged: bool) -> dict:
        return {
            "config": {"mitigation": spec},
            "result": {"test_metric": acc, "diverged": diverged},
        }

    rows = [run("a", 0.9, False), run("a", 0.8, False), run("a", 0.1, True), run("b", 0.1, True)]
    s = bench.summarize(rows, ["a", "b"])
    assert s["a"]["runs"] == 3 and s["a"]["diverged"] == 1
    assert s["a"]["mean"] == pytest.approx(0.85)
    assert s["a"]["se"] == pytest.approx(math.sqrt(0.005) / math.sqrt(2))
    assert s["b"]["diverged"] == 1 and math.isnan(s["b"]["mean"])


def test_bad_settings_are_refused_before_any_work(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--settings", "imagenet"])
    assert e.value.code == 2
    assert "settings: digits-mlp12-momentum" in capsys.readouterr().err
