"""The bench's figures stay legible with a dozen mitigations: one colour each, never repeated; a
y-range that a spike does not flatten, with what it leaves out marked; non-finite values marked."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from matplotlib.colors import to_hex

from gradguard.bench.config import RunConfig
from gradguard.bench.plots import curve_figure, mitigation_colors, robust_limits
from gradguard.bench.summary import write_outputs

MITIGATIONS = ["none", *(f"clip_norm:{c}" for c in range(1, 12))]  # 12


def _lines(fig, gid):
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == gid]


def _curve(n=100, level=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return list(level * np.exp(rng.normal(0.0, 0.3, n)))


@pytest.mark.parametrize("n", [12, 20, 25, 70])
def test_every_mitigation_gets_its_own_colour(n):
    names = ["none", *(f"m{i}" for i in range(n - 1))]
    colors = mitigation_colors(names)
    assert list(colors) == names
    assert len({to_hex(c, keep_alpha=True) for c in colors.values()}) == n


def test_a_figure_of_12_mitigations_draws_each_in_its_own_colour():
    cells = {(m, 0.1): [_curve(seed=i)] for i, m in enumerate(MITIGATIONS)}
    fig = curve_figure(cells, MITIGATIONS, [0.1], mitigation_colors(MITIGATIONS), "loss", "t")
    medians = _lines(fig, "median")
    assert len(medians) == 12
    assert len({to_hex(line.get_color()) for line in medians}) == 12
    # The `none` baseline is drawn faintly in every other panel.
    assert len(_lines(fig, "baseline")) == 11


def test_a_1e20_spike_stays_out_of_the_y_range_and_is_marked():
    spiked = _curve()
    spiked[40] = 1e20
    cells = {("none", 0.1): [_curve(seed=1)], ("zclip", 0.1): [spiked, _curve(seed=2)]}
    mits = ["none", "zclip"]
    fig = curve_figure(cells, mits, [0.1], mitigation_colors(mits), "gradient norm", "t", log=True)
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert ax.get_yscale() == "log"
        assert 0.05 < lo < 1.0 < hi < 100.0  # the curves' level, not the spike's
    (above,) = _lines(fig, "above")
    assert list(above.get_xdata()) == [40]
    assert above.get_ydata()[0] == pytest.approx(fig.axes[1].get_ylim()[1])
    assert not _lines(fig, "nonfinite")


def test_robust_limits_ignore_non_finite_and_non_positive_values():
    v = np.array([1.0, 2.0, 4.0, math.nan, math.inf, -3.0, 0.0])
    lo, hi = robust_limits(v, log=True)
    assert 0.5 < lo < 1.0 and 4.0 < hi < 8.0
    assert robust_limits(np.array([math.nan, math.inf]), log=False) is None


def test_non_finite_values_do_not_crash_and_are_marked():
    diverged = _curve()
    diverged[30:] = [math.inf] * 70  # the run blew up at step 30
    skipped = _curve(seed=3)
    skipped[10] = math.nan  # one skipped step, then training went on
    cells = {("none", 0.1): [diverged], ("skip_nonfinite", 0.1): [skipped, _curve()]}
    mits = ["none", "skip_nonfinite"]
    fig = curve_figure(cells, mits, [0.1], mitigation_colors(mits), "loss", "t")
    marks = {
        line.axes.get_subplotspec().rowspan.start: list(line.get_xdata())
        for line in _lines(fig, "nonfinite")
    }
    assert marks == {0: [30], 1: [10]}  # one x where each stretch of non-finite values starts
    for line in _lines(fig, "median"):
        y = np.asarray(line.get_ydata(), dtype=float)
        assert not np.isinf(y).any()
    fig.savefig(io.BytesIO(), format="png")  # draws without error


def test_a_column_with_nothing_finite_still_draws_its_marks():
    cells = {("none", 0.1): [[math.nan] * 5]}
    fig = curve_figure(cells, ["none"], [0.1], mitigation_colors(["none"]), "loss", "t")
    (mark,) = _lines(fig, "nonfinite")
    assert list(mark.get_xdata()) == [0]


def test_write_outputs_plots_12_mitigations(tmp_path):
    runs, steps = [], {}
    for lr in (0.1,):
        for i, mit in enumerate(MITIGATIONS):
            for seed in (0, 1):
                cfg = RunConfig(task="digits", model="mlp", lr=lr, seed=seed, mitigation=mit)
                key = f"{mit}-{lr}-{seed}"
                loss = _curve(50, 2.0, seed=i + seed)
                norm = _curve(50, 1.0, seed=i + seed + 100)
                if mit == "none" and lr == 0.1:
                    norm[20] = 1e20
                    loss[25:] = [math.inf] * 25
                steps[key] = [{"loss": a, "grad_norm": b} for a, b in zip(loss, norm, strict=True)]
                diverged = mit == "none" and lr == 0.1
                result = {
                    "diverged": diverged,
                    "test_metric": 0.9,
                    "steps_to_target": None,
                    "seconds_to_target": None,
                    "guard_share": 0.0,
                    "interventions": {},
                }
                runs.append({"key": key, "config": cfg.as_dict(), "result": result})
    rows = write_outputs(runs, steps.__getitem__, tmp_path)
    assert len(rows) == 12
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [
        "gradnorm_digits_mlp_sgd.png",
        "loss_digits_mlp_sgd.png",
        "stability_digits_mlp_sgd.png",
    ]
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["zclip+$x$", "a$b", "C:\\runs", "a\\$b$"])
def test_mitigation_names_are_shown_as_written(name):
    """matplotlib's own reading of the escaped text (no mathtext, escapes resolved) is the name;
    a wrapped chain keeps its line breaks."""
    from matplotlib.text import Text

    from gradguard.bench import plots as bench_plots

    for escaped in (bench_plots._literal(name), bench_plots._wrap(name, width=100)):
        assert Text()._preprocess_math(escaped) == (name, False)
