"""The report's figures, drawn from a run's telemetry (:class:`RunLog`): one PNG per function.

Each function takes the run and an output folder, writes ``NAME.png`` there and returns its path,
or None when the run holds no data for that figure (no steps, no sampled update ratios).

Figures are drawn on a bare :class:`matplotlib.figure.Figure` (the Agg canvas), never through
``pyplot``: no global figure state, no backend switch in the caller's process (a notebook keeps
its inline backend), and nothing to close.

Steps are sampled (the writer keeps every k-th step plus the steps around events), so every x axis
uses the recorded step values, never the record index.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .records import RunLog

# One color per event kind, shared with the HTML report's badges.
EVENT_COLORS = {
    "nonfinite_grad": "#d62728",
    "nonfinite_loss": "#8c0000",
    "grad_spike": "#ff7f0e",
    "layer_spike": "#bcbd22",
    "loss_spike": "#9467bd",
    "vanishing": "#17becf",
    "amp_overflow": "#e377c2",
}
OTHER_EVENT_COLOR = "#7f7f7f"
NONFINITE_COLOR = "#d62728"
HEALTHY_UPDATE_RATIO = 1e-3  # Karpathy's rule of thumb: ~1e-3 per step is a healthy update size
MAX_LAYER_TICKS = 40
MAX_LEGEND_LAYERS = 10
DPI = 100


def event_color(kind: str) -> str:
    return EVENT_COLORS.get(kind, OTHER_EVENT_COLOR)


def _float(v: Any) -> float:
    """A record's number as a float; None, strings and lists become NaN."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return math.nan


def _series(steps: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([_float(s.get(key)) for s in steps], dtype=float)


def _nonfinite(steps: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """Where ``key`` holds a NaN/Inf (a missing or null value is not recorded, not non-finite)."""
    return np.array(
        [isinstance(v, float) and not math.isfinite(v) for v in (s.get(key) for s in steps)],
        dtype=bool,
    )


def _flags(steps: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([bool(s.get(key)) for s in steps], dtype=bool)


def _label(text: Any, width: int = 48) -> str:
    """Run-supplied text made safe for a matplotlib label, shown as it is: a ``$`` would start
    mathtext (and an odd one raises), so each is escaped (``\\$``, matplotlib's only escape
    outside mathtext: a backslash anywhere else is shown as it is); long names keep their tail
    (``...blocks.11.mlp.fc2``)."""
    s = str(text)
    if len(s) > width:
        s = "..." + s[-(width - 3) :]
    return s.replace("$", r"\$")


def _save(fig: Figure, out_dir: str | os.PathLike, name: str) -> Path:
    path = Path(out_dir) / f"{name}.png"
    fig.savefig(path, dpi=DPI)
    return path


def _steps_x(steps: Sequence[dict[str, Any]]) -> np.ndarray:
    return np.array([s["step"] for s in steps], dtype=float)


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around sampled step values: midpoints between neighbours, half a gap outside."""
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


MAX_EVENT_LINES = 60  # beyond this, full-height lines would hide the data: ticks on top only


def _mark_events(
    ax, events: Sequence[dict[str, Any]], *, lines: bool = True, alpha: float = 0.55
) -> list:
    """Event steps marked by a triangle on the panel's top edge (and, for a few events, a
    vertical line), one color per kind; returns legend handles."""
    # Only events inside the panel's step range: a mark drawn outside the axes (clip_on=False)
    # would pull the layout out of shape.
    lo, hi = sorted(ax.get_xlim())
    by_kind: dict[str, list[float]] = {}
    for e in events:
        if isinstance(e.get("step"), (int, float)) and lo <= e["step"] <= hi:
            by_kind.setdefault(str(e.get("kind")), []).append(float(e["step"]))
    lines = lines and sum(map(len, by_kind.values())) <= MAX_EVENT_LINES
    handles = []
    for kind, xs in by_kind.items():
        color = event_color(kind)
        # x in data, y in axes coordinates: the marks sit on the panel whatever its y scale.
        if lines:
            ax.vlines(xs, 0, 1, transform=ax.get_xaxis_transform(), colors=color, lw=1, alpha=alpha)
        ax.plot(
            xs,
            [1.0] * len(xs),
            "v",
            color=color,
            ms=6,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
        )
        handles.append(
            Line2D(
                [],
                [],
                color=color,
                marker="v",
                lw=1 if lines else 0,
                label=f"{_label(kind)} ({len(xs)})",
            )
        )
    return handles


def _positive_finite(a: np.ndarray) -> np.ndarray:
    return a[np.isfinite(a) & (a > 0)]


def layer_matrix(run: RunLog, key: str = "layer_norms") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-layer values over the recorded steps, rows in forward order (input side first).

    Returns ``(steps, values, names)``: ``values[r, j]`` is row ``r``'s layer at ``steps[j]``;
    NaN where the step did not record it, +inf where the value (or the layer, per
    ``nonfinite_layers``) was non-finite. Steps that recorded no list for ``key`` are left out.
    """
    layers = run.layers
    order = run.forward_order
    kept = [s for s in run.steps if isinstance(s.get(key), list)]
    values = np.full((len(order), len(kept)), np.nan)
    index = {name: i for i, name in enumerate(layers)}
    for j, s in enumerate(kept):
        raw = s[key]
        bad: set[int] = set()
        if key.startswith("layer_norms"):  # a gradient the writer flagged non-finite
            for b in s.get("nonfinite_layers") or []:
                bad.add(index.get(b, -1) if isinstance(b, str) else b)
        for r, i in enumerate(order):
            item = raw[i] if i < len(raw) else None
            # None: not recorded (NaN); a NaN/Inf float: a non-finite value (+inf).
            nonfinite = isinstance(item, float) and not math.isfinite(item)
            values[r, j] = math.inf if (i in bad or nonfinite) else _float(item)
    names = [layers[i] if i < len(layers) else f"layer {i}" for i in order]
    return _steps_x(kept), values, names


def layer_heatmap(run: RunLog, out_dir: str | os.PathLike) -> Path | None:
    """Per-layer gradient norm (before mitigation) over steps: log colors, layers input side at
    the top, non-finite cells in red, events marked above the panel."""
    steps, values, names = layer_matrix(run, "layer_norms")
    if values.size == 0:
        return None
    n_layers = len(names)
    height = min(14.0, max(4.0, 2.2 + 0.22 * n_layers))
    fig = Figure(figsize=(11, height), layout="constrained")
    ax = fig.add_subplot()
    ax.set_facecolor("#d9d9d9")  # steps that did not record this layer
    x_edges = _edges(steps)
    _heatmap_cells(fig, ax, x_edges, values)
    _heatmap_axes(ax, names, x_edges)
    handles = _mark_events(ax, run.events, lines=False)  # lines would cover the cells
    _event_rings(ax, run.events, names)
    if np.isinf(values).any():
        handles.append(Patch(color=NONFINITE_COLOR, label="non-finite gradient"))
    if (values == 0).any():
        handles.append(Patch(facecolor="#ffffff", edgecolor="#555555", label="zero gradient"))
    if np.isnan(values).any():
        handles.append(Patch(color="#d9d9d9", label="not recorded"))
    if handles:
        fig.legend(
            handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize=8
        )
    return _save(fig, out_dir, "layer_heatmap")


def _heatmap_cells(fig: Figure, ax, x_edges: np.ndarray, values: np.ndarray) -> None:
    """The heatmap's cells on a log color scale, non-finite ones in red, and its colorbar."""
    finite = _positive_finite(values)
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (1e-3, 1.0)
    if vmax <= vmin:
        vmin, vmax = vmin / 10, vmax * 10
    # Zero norms are below any log scale: draw them in the colormap's "under" color.
    plotted = np.where(values == 0, vmin / 10, values)
    # Bad (masked) cells are transparent: the non-finite overlay and the grey background show.
    cmap = colormaps["viridis"].with_extremes(under="#ffffff", bad=(0, 0, 0, 0))
    y_edges = np.arange(values.shape[0] + 1)
    mesh = ax.pcolormesh(
        x_edges,
        y_edges,
        np.ma.masked_invalid(plotted),
        cmap=cmap,
        norm=LogNorm(vmin=vmin, vmax=vmax),
        shading="flat",
    )
    nonfinite = np.isinf(values)
    if nonfinite.any():
        ax.pcolormesh(
            x_edges,
            y_edges,
            np.ma.masked_where(~nonfinite, np.ones_like(values)),
            cmap=ListedColormap([NONFINITE_COLOR]),
            shading="flat",
        )
    fig.colorbar(
        mesh, ax=ax, label="gradient norm (log)", extend="min" if (values == 0).any() else "neither"
    )


def _heatmap_axes(ax, names: list[str], x_edges: np.ndarray) -> None:
    """The heatmap's layer names, limits (input side at the top), labels and title."""
    n_layers = len(names)
    # Names as tick labels at the row centers, thinned to at most MAX_LAYER_TICKS.
    stride = max(1, math.ceil(n_layers / MAX_LAYER_TICKS))
    rows = list(range(0, n_layers, stride))
    ax.set_yticks([r + 0.5 for r in rows])
    ax.set_yticklabels([_label(names[r]) for r in rows], fontsize=8 if n_layers <= 20 else 6)
    ax.set_ylim(n_layers, 0)  # input side at the top
    ax.set_xlim(x_edges[0], x_edges[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("layer (forward order, input first)")
    ax.set_title(
        "Per-layer gradient norm before mitigation"
        + (f" (one layer in {stride} named)" if stride > 1 else ""),
        pad=12,  # room for the event triangles
    )


def _event_rings(ax, events: Sequence[dict[str, Any]], names: list[str]) -> None:
    """The layers an event names: a ring on their cell, so the eye finds where it started."""
    row_of = {name: r for r, name in enumerate(names)}
    rings: dict[str, tuple[list[float], list[float]]] = {}
    for e in events:
        if not isinstance(e.get("step"), (int, float)):
            continue
        xs, ys = rings.setdefault(event_color(str(e.get("kind"))), ([], []))
        for name in (e.get("layers") or [])[:3]:
            if name in row_of:
                xs.append(e["step"])
                ys.append(row_of[name] + 0.5)
    for color, (xs, ys) in rings.items():  # one scatter a color: fast with thousands of events
        ax.scatter(xs, ys, s=28, facecolors="none", edgecolors=color, linewidths=1.2)


def _top_edge_markers(ax, x: np.ndarray, label: str, color: str = NONFINITE_COLOR) -> Line2D | None:
    """Markers pinned to the top of the panel (axes coordinates) for values a log axis cannot show."""
    if not len(x):
        return None
    (line,) = ax.plot(
        x,
        [0.97] * len(x),
        "X",
        color=color,
        ms=8,
        ls="none",
        transform=ax.get_xaxis_transform(),
        label=label,
    )
    return line


def _norm_lines(
    ax, x: np.ndarray, before: np.ndarray, after: np.ndarray, steps: Sequence[dict[str, Any]]
) -> None:
    """The norm before and after mitigation, and every ``*threshold`` metric dashed."""
    # "After" is drawn wide and light under "before": where nothing acted the two coincide and
    # both stay visible. A 0 after a skipped step is off a log axis; the skip marker shows it.
    ax.plot(
        x,
        np.where(np.isfinite(after) & (after > 0), after, np.nan),
        color="#2ca02c",
        lw=3,
        alpha=0.45,
        label="after mitigation",
    )
    shown = np.where(np.isfinite(before) & (before > 0), before, np.nan)
    ax.plot(x, shown, color="#1f77b4", lw=1.1, label="before mitigation")
    thresholds = sorted(
        {
            k
            for s in steps
            for k in (s.get("metrics") or {})
            if isinstance(k, str) and k.endswith("threshold")
        }
    )
    for k, style in zip(thresholds, ("--", "-.", ":", (0, (5, 1))) * 4, strict=False):
        y = np.array([_float((s.get("metrics") or {}).get(k)) for s in steps])
        ax.plot(x, np.where(y > 0, y, np.nan), ls=style, color="#555555", lw=1, label=_label(k))


def _step_flag_markers(
    ax,
    x: np.ndarray,
    before: np.ndarray,
    skipped: np.ndarray,
    rolled: np.ndarray,
    clipped: np.ndarray,
) -> None:
    """Clipped, skipped and rolled-back steps marked on the pre-mitigation norm (where it is
    finite; non-finite ones go to the top edge, drawn apart)."""
    finite_before = np.isfinite(before) & (before > 0)
    for flag, marker, color, name in (
        (clipped & ~skipped, "v", "#2ca02c", "clipped"),
        (skipped & ~rolled, "x", "#ff7f0e", "skipped"),
        (rolled, "s", "#9467bd", "rolled back"),
    ):
        on = flag & finite_before
        if flag.any():
            ax.plot(
                x[on],
                before[on],
                marker,
                color=color,
                ms=5 if marker == "v" else 7,
                ls="none",
                mfc="none" if marker == "s" else color,
                label=f"{name} ({int(flag.sum())})",
            )


def norm_timeline(run: RunLog, out_dir: str | os.PathLike) -> Path | None:
    """Global gradient norm before and after mitigation (log y); skipped, rolled-back and clipped
    steps marked, non-finite norms pinned to the top edge, any ``*threshold`` metric drawn dashed."""
    steps = run.steps
    if not steps:
        return None
    x = _steps_x(steps)
    before = _series(steps, "grad_norm")
    after = _series(steps, "grad_norm_after")
    skipped, rolled, clipped = (_flags(steps, k) for k in ("skipped", "rolled_back", "clipped"))

    fig = Figure(figsize=(11, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.set_yscale("log")
    _norm_lines(ax, x, before, after, steps)
    _step_flag_markers(ax, x, before, skipped, rolled, clipped)
    bad = _nonfinite(steps, "grad_norm")
    _top_edge_markers(ax, x[bad], f"non-finite norm ({int(bad.sum())})")
    if not _positive_finite(np.concatenate([before, after])).size:
        ax.set_ylim(1e-1, 1e1)  # nothing finite to scale to; keep the markers visible
    ax.set_xlabel("step")
    ax.set_ylabel("global gradient norm (log)")
    ax.set_title("Global gradient norm before and after mitigation")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return _save(fig, out_dir, "norm_timeline")


def _rolling_mean(a: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` records (fewer at the start)."""
    c = np.cumsum(np.concatenate([[0.0], a.astype(float)]))
    idx = np.arange(1, len(a) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def clip_rate(run: RunLog, out_dir: str | os.PathLike) -> Path | None:
    """The fraction of recorded steps clipped and skipped, over a trailing window."""
    steps = run.steps
    if not steps or not any("clipped" in s or "skipped" in s for s in steps):
        return None
    x = _steps_x(steps)
    clipped, skipped = _flags(steps, "clipped"), _flags(steps, "skipped")
    window = int(min(50, max(5, len(steps) // 10)))

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for flag, color, name in ((clipped, "#2ca02c", "clipped"), (skipped, "#ff7f0e", "skipped")):
        ax.plot(
            x,
            100 * _rolling_mean(flag, window),
            color=color,
            lw=1.5,
            label=f"{name}: {int(flag.sum())} of {len(flag)} recorded steps ({flag.mean():.1%})",
        )
    ax.set_ylim(-2, 102)
    ax.set_xlabel("step")
    ax.set_ylabel(f"% of the last {window} recorded steps")
    ax.set_title("Clip and skip rate")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, out_dir, "clip_rate")


def update_ratio(run: RunLog, out_dir: str | os.PathLike) -> Path | None:
    """Per-layer ``||update|| / ||weight||`` on the sampled steps (log y) against the 1e-3 rule of
    thumb; the ~10 layers furthest from it are named, the others drawn in grey."""
    steps, values, names = layer_matrix(run, "update_ratio")
    if values.size == 0 or not _positive_finite(values).size:
        return None
    logs = np.where(np.isfinite(values) & (values > 0), values, np.nan)
    with np.errstate(all="ignore"):
        dev = np.log10(logs / HEALTHY_UPDATE_RATIO)
    # How far each layer strays from the reference: the largest |log10 distance| it reaches.
    extreme = np.array(
        [np.nanmax(np.abs(r)) if np.isfinite(r).any() else -1.0 for r in dev], dtype=float
    )
    named = [int(i) for i in np.argsort(-extreme)[:MAX_LEGEND_LAYERS] if extreme[i] >= 0]
    colors = colormaps["tab10"]

    fig = Figure(figsize=(11, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.set_yscale("log")
    marker = "o" if len(steps) <= 30 else None
    for r in range(len(names)):
        if r not in named:
            ax.plot(steps, logs[r], color="#b0b0b0", lw=0.8, alpha=0.6, marker=marker, ms=3)
    for k, r in enumerate(sorted(named)):
        ax.plot(
            steps,
            logs[r],
            color=colors(k % 10),
            lw=1.4,
            marker=marker,
            ms=3,
            label=_label(names[r], 36),
        )
    ax.axhline(
        HEALTHY_UPDATE_RATIO, color="black", ls="--", lw=1, label="1e-3 (healthy rule of thumb)"
    )
    if len(names) > len(named):
        ax.plot([], [], color="#b0b0b0", label=f"{len(names) - len(named)} other layers")
    ax.set_xlabel("step")
    ax.set_ylabel("||update|| / ||weight|| (log)")
    ax.set_title("Per-layer update-to-weight ratio (sampled steps)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return _save(fig, out_dir, "update_ratio")


def loss_curve(run: RunLog, out_dir: str | os.PathLike) -> Path | None:
    """Training loss and learning rate (twin axis) over steps, events marked."""
    steps = run.steps
    if not steps:
        return None
    x = _steps_x(steps)
    loss, lr = _series(steps, "loss"), _series(steps, "lr")
    if not (np.isfinite(loss).any() or np.isfinite(lr).any() or _nonfinite(steps, "loss").any()):
        return None

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax = fig.add_subplot()
    finite = loss[np.isfinite(loss)]
    # Log scale only where it helps: positive losses spanning more than two decades.
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
        ax.set_yscale("log")
    ax.plot(x, np.where(np.isfinite(loss), loss, np.nan), color="#1f77b4", lw=1.2, label="loss")
    bad = _nonfinite(steps, "loss")
    handles = [ax.get_lines()[0]]
    marker = _top_edge_markers(ax, x[bad], f"non-finite loss ({int(bad.sum())})")
    if marker is not None:
        handles.append(marker)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    if np.isfinite(lr).any():
        ax2 = ax.twinx()
        (lr_line,) = ax2.plot(x, lr, color="#ff7f0e", lw=1, ls="--", label="learning rate")
        positive = lr[np.isfinite(lr) & (lr > 0)]
        if positive.size and positive.max() / positive.min() > 10:
            ax2.set_yscale("log")
        ax2.set_ylabel("learning rate", color="#ff7f0e")
        ax2.margins(y=0.15)  # keeps a constant LR off the top edge, where the event marks sit
        handles.append(lr_line)
    handles += _mark_events(ax, run.events, alpha=0.4)
    ax.set_title("Loss and learning rate", pad=12)  # room for the event triangles
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize=8)
    return _save(fig, out_dir, "loss_curve")


# The report's figures, in the order it shows them.
FIGURES: tuple[tuple[str, Callable[[RunLog, str | os.PathLike], Path | None]], ...] = (
    ("norm_timeline", norm_timeline),
    ("layer_heatmap", layer_heatmap),
    ("loss_curve", loss_curve),
    ("clip_rate", clip_rate),
    ("update_ratio", update_ratio),
)


def write_all(run: RunLog, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Every figure the run has data for: ``{name: path}`` in :data:`FIGURES` order."""
    out: dict[str, Path] = {}
    for name, draw in FIGURES:
        path = draw(run, out_dir)
        if path is not None:
            out[name] = path
    return out
