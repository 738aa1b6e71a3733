"""The bench's figures: a stability map and, per metric, a grid of small multiples.

Per setting (everything but LR, mitigation and seed) :func:`plot_all` writes

- ``stability_<tag>.png``: the divergence rate over seeds against the LR, one line per mitigation;
- ``loss_<tag>.png`` and ``gradnorm_<tag>.png``: one panel per mitigation (rows) and LR (columns),
  the median over seeds with a min-max band, the unguarded ``none`` baseline drawn faintly in
  every panel for reference.

A dozen mitigations stay legible because no panel holds more than two curves, every mitigation has
its own colour (:func:`mitigation_colors`, never repeating within a figure), and each LR column's
y-range comes from robust quantiles of its finite values (:func:`robust_limits`), so a 1e20 spike
does not flatten the rest. What that range leaves out is marked, not dropped: a triangle on the top
(or bottom) edge at each step a seed's value lies beyond it, a red ``x`` where a seed's value turns
non-finite (NaN/Inf).

Figures are drawn on a bare :class:`matplotlib.figure.Figure` (the Agg canvas), as
:mod:`gradguard.diagnose.plots` does: no ``pyplot``, no backend switch in the caller's process.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

from .summary import _flat_and_varying, _option_label, outcomes

BASELINE = "none"  # the unguarded run every other mitigation is drawn against
BASELINE_COLOR = "#000000"
NONFINITE_COLOR = "#d62728"  # as the diagnose report marks non-finite steps
QUANTILES = (0.5, 99.5)  # the percentiles of the finite values that set a column's y-range
MARGIN = 0.08  # of that range's span (in decades on a log axis), added on each side
DPI = 110
PANEL_W, PANEL_H = 3.0, 1.15  # inches per small multiple


def mitigation_colors(mitigations: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """A distinct RGBA colour per mitigation, for any number of them.

    The baseline ``none`` is black; the others take a qualitative map sized to their count:
    tab10 up to 10, tab20 (its dark shades first) up to 20, tab20 + tab20b + tab20c up to 60, and
    beyond that evenly spaced hues. No colour repeats within one call.
    """
    names = list(dict.fromkeys(mitigations))
    others = [m for m in names if m != BASELINE]
    palette = _palette(len(others))
    colors = dict(zip(others, palette, strict=True))
    if BASELINE in names:
        colors[BASELINE] = (0.0, 0.0, 0.0, 1.0)
    return {m: colors[m] for m in names}


def _palette(n: int) -> list[tuple[float, ...]]:
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](2 * i % 20 + i // 10) for i in range(n)]
    if n <= 60:
        maps = ("tab20", "tab20b", "tab20c")
        return [colormaps[maps[i // 20]](i % 20) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]


def robust_limits(values: np.ndarray, log: bool) -> tuple[float, float] | None:
    """The y-range for ``values``: their 0.5th-99.5th percentile (finite values only, positive ones on
    a log axis) widened by ``MARGIN`` of its span; None when no value qualifies."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v) & (v > 0)] if log else v[np.isfinite(v)]
    if v.size == 0:
        return None
    if log:
        v = np.log10(v)
    lo, hi = np.percentile(v, QUANTILES)
    span = hi - lo
    pad = MARGIN * span if span > 0 else (0.5 if log else max(abs(hi) * 0.5, 1.0))
    lo, hi = lo - pad, hi + pad
    return (10.0**lo, 10.0**hi) if log else (float(lo), float(hi))


def _as_array(curves: Sequence[Sequence[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Seed curves as one (seeds, steps) float array padded with NaN, and where a value was
    non-finite (NaN/Inf); a missing value (None, a shorter run) is neither plotted nor marked."""
    n = max((len(c) for c in curves), default=0)
    arr = np.full((len(curves), n), np.nan)
    bad = np.zeros((len(curves), n), dtype=bool)
    for i, c in enumerate(curves):
        for j, v in enumerate(c):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if math.isfinite(v):
                    arr[i, j] = v
                else:
                    bad[i, j] = True
    return arr, bad


def _median(arr: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns after every run ended
        return np.nanmedian(arr, 0)


def _band(ax, arr: np.ndarray, bad: np.ndarray, color, limits, log: bool) -> None:
    """Median over seeds with a min-max band, then the marks for what the y-range leaves out:
    a triangle on the edge at each step a seed lies beyond it, a red x where a seed turns
    non-finite (the first step of each non-finite stretch)."""
    if arr.size == 0:
        return
    shown = np.where(arr > 0, arr, np.nan) if log else arr
    x = np.arange(arr.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanmin(shown, 0), np.nanmax(shown, 0)
    ax.plot(x, _median(shown), color=color, lw=1, zorder=3, gid="median")
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0, zorder=2)
    ymin, ymax = limits
    finite = ~np.isnan(arr)
    below = (arr < ymin) | (arr <= 0) if log else arr < ymin
    _edge_marks(ax, finite & (arr > ymax), ymax, "above", marker="^", ms=3.5, color=color)
    _edge_marks(ax, finite & below, ymin, "below", marker="v", ms=3.5, color=color)
    starts = bad & ~np.pad(bad, ((0, 0), (1, 0)))[:, :-1]  # non-finite here, not the step before
    _edge_marks(ax, starts, ymax, "nonfinite", marker="x", ms=6, mew=1.5, color=NONFINITE_COLOR)


def _edge_marks(ax, mask: np.ndarray, y: float, gid: str, **style: Any) -> None:
    """A marker on the axis edge ``y`` at each step where any seed's ``mask`` holds; unclipped, so
    it sits on the frame. ``gid`` names the artist (the tests find it by that)."""
    steps = np.flatnonzero(mask.any(0))
    if steps.size:
        ax.plot(steps, np.full(steps.size, y), ls="none", clip_on=False, zorder=5, gid=gid, **style)


def curve_figure(
    cells: dict[tuple[str, float], list[list[Any]]],
    mitigations: Sequence[str],
    lrs: Sequence[float],
    colors: dict[str, Any],
    ylabel: str,
    title: str,
    log: bool | None = None,
) -> Figure:
    """Small multiples of one metric: a row per mitigation, a column per LR.

    ``cells[(mitigation, lr)]`` holds that cell's per-seed curves (a value per step). Each panel
    draws its mitigation (median, min-max band) over the faint ``none`` baseline; a column shares
    its y-range (:func:`robust_limits`). ``log`` defaults to a log axis when every finite value is
    positive.
    """
    data = {k: _as_array(v) for k, v in cells.items() if v}
    every = np.concatenate([a.ravel() for a, _ in data.values()] or [np.zeros(0)])
    if log is None:
        finite = every[np.isfinite(every)]
        log = bool(finite.size) and bool((finite > 0).all())
    rows, cols = len(mitigations), len(lrs)
    fig, axes, height = _panel_grid(rows, cols)
    n_steps = max((a.shape[1] for a, _ in data.values()), default=1)
    for j, lr in enumerate(lrs):
        limits = _column_limits(data, mitigations, lr, log)
        base = data.get((BASELINE, lr))
        for i, mit in enumerate(mitigations):
            ax = axes[i][j]
            _panel_axes(ax, limits, log, n_steps)
            if base is not None and mit != BASELINE:
                b = np.where(base[0] > 0, base[0], np.nan) if log else base[0]
                ax.plot(
                    np.arange(b.shape[1]),
                    _median(b),
                    color=BASELINE_COLOR,
                    alpha=0.3,
                    lw=0.8,
                    zorder=1,
                    gid="baseline",
                )
            if (mit, lr) in data:
                _band(ax, *data[(mit, lr)], colors[mit], limits, log)
            _panel_labels(ax, i == 0, j == 0, i == rows - 1, mit, lr, colors[mit])
    fig.suptitle(_literal(f"{ylabel}: {title}"), fontsize=10, y=1 - 0.15 / height, va="top")
    fig.legend(handles=_key(), loc="lower center", ncol=4, fontsize=7, frameon=False)
    return fig


def _literal(text: str) -> str:
    """Run-supplied text (a mitigation, a task's name) shown by matplotlib as it is: each ``$``
    escaped, since a pair would start mathtext; a backslash anywhere else is shown as it is."""
    return text.replace("$", r"\$")


def _panel_grid(rows: int, cols: int) -> tuple[Figure, np.ndarray, float]:
    """A figure of ``rows`` x ``cols`` panels with fixed margins; returns it, its axes and its
    height (inches)."""
    # Fixed margins (inches), not a layout engine: constrained layout measures every tick of every
    # panel and took 10x the drawing time on a 12 x 4 grid.
    left, right, top, bottom = 1.5, 0.15, 0.65, 0.75
    width, height = PANEL_W * cols + left + right, PANEL_H * rows + top + bottom
    fig = Figure(figsize=(width, height))
    grid = {"left": left / width, "right": 1 - right / width, "top": 1 - top / height}
    grid |= {"bottom": bottom / height, "hspace": 0.25, "wspace": 0.25}
    # Limits set once per panel rather than shared axes: sharing re-propagates every limit change
    # through all the panels.
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=grid)
    return fig, axes, height


def _column_limits(
    data: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]],
    mitigations: Sequence[str],
    lr: float,
    log: bool,
) -> tuple[float, float]:
    """The y-range an LR's column of panels shares (:func:`robust_limits`)."""
    column = [data[(m, lr)][0].ravel() for m in mitigations if (m, lr) in data]
    limits = robust_limits(np.concatenate(column or [np.zeros(0)]), log)
    if limits is None:  # nothing finite in this column: every run here failed at once
        limits = (0.1, 10.0) if log else (0.0, 1.0)
    return limits


def _panel_axes(ax, limits: tuple[float, float], log: bool, n_steps: int) -> None:
    """A panel's scale, limits and ticks, set once (no autoscaling afterwards)."""
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(numticks=4))
        ax.yaxis.set_minor_locator(NullLocator())  # unlabelled clutter, and slow
    ax.set_ylim(*limits)
    ax.set_xlim(-0.01 * n_steps, 1.01 * n_steps)
    ax.xaxis.set_major_locator(MaxNLocator(4))  # few ticks: 50 panels draw them all
    ax.set_autoscale_on(False)


def _panel_labels(ax, top: bool, left: bool, bottom: bool, mit: str, lr: float, color: Any) -> None:
    """A panel's grid and labels: the LR over the top row, the mitigation left of the first
    column, steps under the bottom row."""
    ax.tick_params(labelsize=7, labelbottom=bottom)
    ax.grid(alpha=0.25, lw=0.5)
    if top:
        ax.set_title(f"lr={lr:g}", fontsize=9)
    if left:
        ax.set_ylabel(_wrap(mit), fontsize=8, color=color, rotation=0, ha="right", va="center")
    if bottom:
        ax.set_xlabel("step", fontsize=8)


def _wrap(name: str, width: int = 16) -> str:
    """A mitigation's name as a row label: broken at ``+`` so a chain fits the margin, shown as
    it is (:func:`_literal`)."""
    parts, line = [], ""
    for piece in re.split(r"(?<=\+)", name):
        if line and len(line) + len(piece) > width:
            parts.append(line)
            line = ""
        line += piece
    parts.append(line)
    return _literal("\n".join(parts))


def _key() -> list[Line2D]:
    grey = "#555555"
    return [
        Line2D([], [], color=grey, lw=1, label="median over seeds (band: min-max)"),
        Line2D([], [], color=BASELINE_COLOR, alpha=0.3, lw=0.8, label=f"{BASELINE} (baseline)"),
        Line2D([], [], color=grey, ls="none", marker="^", ms=4, label="beyond the y-range"),
        Line2D(
            [],
            [],
            color=NONFINITE_COLOR,
            ls="none",
            marker="x",
            ms=6,
            mew=1.5,
            label="turned non-finite (NaN/Inf)",
        ),
    ]


def stability_figure(
    rates: dict[str, list[float]], lrs: Sequence[float], colors: dict[str, Any], title: str
) -> Figure:
    """The divergence rate over seeds against the LR, one line per mitigation."""
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    markers = "osD^v<>ph*XP"
    for k, (mit, ys) in enumerate(rates.items()):
        # Slight vertical offsets keep lines that coincide (all 0 or all 1) visible.
        off = 0.006 * (k - len(rates) / 2)
        ax.plot(
            lrs,
            [y + off for y in ys],
            marker=markers[k % len(markers)],
            label=_literal(mit),
            color=colors[mit],
            alpha=0.85,
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("divergence rate over seeds")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(_literal(f"stability map: {title}"))
    fig.legend(fontsize=7, loc="outside right center")
    return fig


def plot_all(
    runs: Sequence[dict[str, Any]], steps_of: Callable[[str], list[dict[str, Any]]], out: Path
) -> list[Path]:
    """Write the stability map and the loss and gradient-norm grids for every setting; return
    the paths written. ``steps_of(key)`` returns a run's per-step metrics."""
    written = []
    out = Path(out)
    # One set of figures per setting (all but LR, mitigation and seed); LRs are the x axis/columns.
    flat, varying = _flat_and_varying(runs)
    outcome = outcomes(runs, steps_of)
    by_setting: dict[str, list[dict]] = defaultdict(list)
    labels: dict[str, str] = {}
    for r, f in zip(runs, flat, strict=True):
        key = repr(sorted(((k, v) for k, v in f.items() if k != "lr"), key=repr))
        by_setting[key].append(r)
        labels[key] = _option_label(f, varying)
    for key, members in by_setting.items():
        c = members[0]["config"]
        task, model, opt = c["task"], c["model"], c["optimizer"]
        tag = "_".join(
            x for x in (task, model, opt, re.sub(r"[^A-Za-z0-9.=-]+", "_", labels[key])) if x
        )
        title = " / ".join(x for x in (task, model, opt, labels[key]) if x)
        mitigations = list(dict.fromkeys(m["config"]["mitigation"] for m in members))
        lrs = sorted({m["config"]["lr"] for m in members})
        colors = mitigation_colors(mitigations)
        cell: dict[tuple[str, float], list[dict]] = defaultdict(list)
        for m in members:
            cell[(m["config"]["mitigation"], m["config"]["lr"])].append(m)

        rates = {
            mit: [_rate([outcome[id(m)] for m in cell.get((mit, lr), [])]) for lr in lrs]
            for mit in mitigations
        }
        fig = stability_figure(rates, lrs, colors, title)
        written.append(_save(fig, out / f"stability_{tag}.png"))

        steps = {m["key"]: steps_of(m["key"]) for m in members}
        for metric, fname, ylabel, log in (
            ("loss", "loss", "training loss", None),
            ("grad_norm", "gradnorm", "gradient norm (pre-clip)", True),
        ):
            cells = {
                k: [[s.get(metric) for s in steps[m["key"]]] for m in ms] for k, ms in cell.items()
            }
            fig = curve_figure(cells, mitigations, lrs, colors, ylabel, title, log=log)
            written.append(_save(fig, out / f"{fname}_{tag}.png"))
    return written


def _rate(outcomes_: list[str]) -> float:
    return sum(o == "diverged" for o in outcomes_) / len(outcomes_) if outcomes_ else math.nan


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path
