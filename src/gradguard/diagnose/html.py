"""``report.html``: one self-contained page per run (``gradguard report RUN_DIR``).

The page holds the run's header, a headline verdict, the diagnosis findings, where the explosion
started (localization), the events, the Guard's counters and the figures of :mod:`.plots`. It
opens from a mail attachment or a CI artifact as it is: every figure is embedded as a base64
``data:`` URI, the CSS is inline, there is no JavaScript, and a Content-Security-Policy forbids
any network load. Every string that comes from the run (layer names, the policy, event details,
finding text) is HTML-escaped, so a hostile or odd layer name shows as text.

    path = write_report("runs/exp1")            # report.html and the PNGs next to telemetry.jsonl
    print(terminal_summary(load_run("runs/exp1"), findings, path))
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

from ..errors import ConfigError
from . import plots
from .records import RunLog, event_counts, load_run
from .rerun import rerun_html, rerun_sentences
from .rules import Finding, diagnose

REPORT_NAME = "report.html"
EVENT_ROWS_SHOWN = 20  # the first rows show; the rest sit in a collapsed <details>
MAX_EVENT_ROWS = 200  # beyond this the table says how many it left out
MAX_LOCALIZATION_ROWS = 50
MAX_DETAIL_ITEMS = 6
MAX_LAYERS_SHOWN = 3
SEVERITIES = ("high", "medium", "info")

CAPTIONS = {
    "norm_timeline": "Global gradient norm before mitigation (blue) and what the optimizer received "
    "(green), log scale. Crosses at the top edge are non-finite norms; markers show clipped, "
    "skipped and rolled-back steps; dashed lines are the policies' thresholds.",
    "layer_heatmap": "Gradient norm per layer (rows, input side at the top) and recorded step "
    "(columns), log color scale. Red cells are non-finite gradients, grey cells were not "
    "recorded; triangles above mark events, rings the layers each event names.",
    "loss_curve": "Training loss and learning rate (dashed, right axis); triangles on the top edge "
    "(with vertical lines when there are few) mark events.",
    "clip_rate": "Share of the recorded steps that were clipped or skipped, over a trailing window.",
    "update_ratio": "Per-layer ratio of the update size to the weight size on sampled steps; "
    "about 1e-3 (dashed) is a common sign of a healthy learning rate, far above it of one too "
    "high, far below of layers that barely learn.",
}
TITLES = {
    "norm_timeline": "Gradient norm",
    "layer_heatmap": "Per-layer gradient norm",
    "loss_curve": "Loss and learning rate",
    "clip_rate": "Clip and skip rate",
    "update_ratio": "Update-to-weight ratio",
}

_CSS = """
:root { --fg:#1d2330; --muted:#5b6473; --line:#dde1e8; --bg:#ffffff; --panel:#f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 0 0 4px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
.muted { color: var(--muted); }
.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 12px 0 0;
  font-size: 14px; }
.meta dt { color: var(--muted); }
.meta dd { margin: 0; overflow-wrap: anywhere; }
.verdict { margin: 20px 0 0; padding: 14px 18px; border-radius: 8px; font-size: 18px; font-weight: 600;
  border-left: 8px solid; }
.verdict p { margin: 4px 0 0; font-size: 14px; font-weight: 400; }
.verdict.healthy { background: #e9f7ee; border-color: #2e9d57; }
.verdict.events { background: #fff5e6; border-color: #f08c00; }
.verdict.diverged { background: #fdecec; border-color: #d62728; }
.finding { border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; margin: 10px 0;
  background: var(--panel); }
.finding ul { margin: 4px 0 8px; padding-left: 22px; }
.finding .label { font-size: 13px; font-weight: 600; color: var(--muted); margin-top: 6px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
  color: #fff; background: #7f7f7f; vertical-align: middle; margin-right: 6px; }
.badge.high { background: #d62728; } .badge.medium { background: #f08c00; } .badge.info { background: #1f77b4; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--panel); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
details summary { cursor: pointer; color: var(--muted); margin: 8px 0; }
figure { margin: 18px 0 26px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 6px; }
.counters { width: auto; min-width: 320px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12.5px; }
"""

# No script, no network: a browser that opens the file loads nothing but what is inside it.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: Any) -> str:
    """Any run-supplied value as escaped HTML text."""
    return html.escape(value if isinstance(value, str) else str(value), quote=True)


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value).replace("inf", "Inf").replace("nan", "NaN")
    return f"{value:.3g}"


def _field(finding: Finding | Mapping[str, Any], name: str, default: Any = None) -> Any:
    """A finding's field, whether the rules return :class:`Finding` objects or plain dicts."""
    if isinstance(finding, Mapping):
        return finding.get(name, default)
    return getattr(finding, name, default)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _step_of(record: Mapping[str, Any]) -> float:
    """A record's step for sorting; a missing or odd one sorts last."""
    step = record.get("step")
    return float(step) if _finite(step) else math.inf


def total_steps(run: RunLog) -> int:
    """Steps the run went through: the end record's count, else the last recorded step + 1."""
    if run.end and isinstance(run.end.get("step"), int):
        return run.end["step"]
    return run.steps[-1]["step"] + 1 if run.steps else 0


def divergence(run: RunLog) -> str | None:
    """Why the run looks diverged at its end, or None: the last recorded losses are non-finite,
    the weights are, or the loss ended above 10x its first value (the bench's criterion)."""
    steps = run.steps
    if not steps:
        return None
    tail = steps[-3:]
    if all(s.get("loss") is not None and not _finite(s.get("loss")) for s in tail):
        return f"the loss is not finite at the last {len(tail)} recorded step(s)"
    weights = steps[-1].get("weight_norms")
    if isinstance(weights, list) and any(
        isinstance(w, float) and not math.isfinite(w) for w in weights
    ):
        return "the weights are not finite at the last recorded step"
    losses = [s["loss"] for s in steps if _finite(s.get("loss"))]
    if len(losses) >= 2 and losses[0] > 0 and losses[-1] > 10 * losses[0]:
        return f"the loss ended at {losses[-1]:.3g}, above 10x its first value {losses[0]:.3g}"
    return None


def verdict(run: RunLog, findings: Sequence[Finding] = ()) -> tuple[str, str]:
    """The headline: ``(state, sentence)``, state one of ``healthy``, ``events``, ``diverged``.

    A run without events is "healthy" only when the diagnosis found nothing either: a loss that
    degraded quietly (``loss_degradation``) is not healthy for want of a NaN."""
    n = len(run.events)
    counts = ", ".join(f"{k} {v}" for k, v in event_counts(run.events).items())
    why = divergence(run)
    if why:
        return "diverged", f"Diverged: {why}" + (f" ({n} events: {counts})." if n else ".")
    if n:
        return "events", f"{n} event{'s' if n != 1 else ''}: {counts}."
    if findings:
        titles = "; ".join(str(_field(f, "title", "")) for f in findings)
        return "events", f"Not healthy, though no events were recorded: {titles}."
    return "healthy", "Healthy: no events were recorded."


def open_run(run_dir: str | os.PathLike) -> RunLog:
    """:func:`load_run`, with a plain error for a path that does not exist."""
    if not Path(run_dir).exists():
        raise ConfigError(
            f"{run_dir} does not exist; give the folder a Guard's log_dir (or `gradguard train --out`) wrote"
        )
    return load_run(run_dir)


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Load the run in ``run_dir``, diagnose it, and write the figures and ``report.html`` into
    ``out_dir`` (default: the run's folder). Returns the report's path."""
    run = open_run(run_dir)
    return render_report(run, diagnose(run), run.path.parent if out_dir is None else out_dir)


def render_report(run: RunLog, findings: Sequence[Finding], out_dir: str | os.PathLike) -> Path:
    """Write the PNGs and ``report.html`` for an already loaded and diagnosed run."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder; give a folder for the report")
    try:
        out.mkdir(parents=True, exist_ok=True)
        figures = plots.write_all(run, out)
        path = out / REPORT_NAME
        path.write_text(report_html(run, findings, figures), encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write the report into {out}: {e}") from None
    return path


# ---------------------------------------------------------------------------------------------
# The page, section by section. Every function returns HTML with run text already escaped.


def report_html(
    run: RunLog, findings: Sequence[Finding], figures: Mapping[str, str | os.PathLike]
) -> str:
    """The whole page as a string; ``figures`` maps a figure name to its PNG (embedded)."""
    name = run.path.parent.name or str(run.path.parent)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>gradguard report: {_e(name)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        _header(run, name),
        _verdict(run, findings),
        _findings(run, findings),
        _localizations(run),
        rerun_html(run.steps),
        _events(run),
        _counters(run),
        _figures(figures),
        f'<footer>Written by gradguard {_e(_version())} from <span class="mono">{_e(run.path)}</span>.</footer>',
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _version() -> str:
    from .._version import __version__

    return __version__


def _header(run: RunLog, name: str) -> str:
    m = run.meta
    policy = m.get("policy")
    if policy is not None and not isinstance(policy, str):
        policy = json.dumps(policy, default=str)
    recorded = len(run.steps)
    steps = total_steps(run)
    params = m.get("layer_params")
    n_params = sum(p for p in params if isinstance(p, int)) if isinstance(params, list) else None
    rows: list[tuple[str, str]] = [
        ("policy", f'<span class="mono">{_e(policy or "none")}</span>'),
        ("steps", f"{steps:,} ({recorded:,} recorded)"),
        (
            "layers",
            f"{len(run.layers):,}" + (f" ({n_params:,} parameters)" if n_params else ""),
        ),
    ]
    if m.get("recurrent"):
        rows.append(("recurrent layers", _e(", ".join(map(str, _as_list(m["recurrent"]))))))
    flags = [
        label
        for key, label in (("amp", "fp16 AMP"), ("normalization", "normalization layers"))
        if m.get(key)
    ]
    if flags:
        rows.append(("model", _e(", ".join(flags))))
    if m.get("created"):
        rows.append(("started", _e(m["created"])))
    end = run.end or {}
    for key in ("finished", "time", "created"):
        if end.get(key):
            rows.append(("finished", _e(end[key])))
            break
    if not run.end:
        rows.append(("finished", "no end record: the run stopped early or is still running"))
    rows.append(
        (
            "versions",
            f"gradguard {_e(m.get('gradguard', '?'))}, torch {_e(m.get('torch', '?'))}",
        )
    )
    for note in run.notes:  # unreadable lines (a run killed mid-write), values of a wrong type
        rows.append(("note", _e(note)))
    items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return (
        f'<header><h1>gradguard report: {_e(name)}</h1><div class="muted mono">{_e(run.path)}</div>'
        f'<dl class="meta">{items}</dl></header>'
    )


def _verdict(run: RunLog, findings: Sequence[Finding]) -> str:
    state, sentence = verdict(run, findings)
    first = min(run.events, key=_step_of) if run.events else None
    more = ""
    if first is not None:
        layers = ", ".join(map(str, _as_list(first.get("layers"))[:MAX_LAYERS_SHOWN]))
        more = f"<p>First event at step {_e(first.get('step'))}: {_e(first.get('kind'))}" + (
            f" in {_e(layers)}" if layers else ""
        )
        more += "</p>"
    return f'<section class="verdict {state}">{_e(sentence)}{more}</section>'


def _findings(run: RunLog, findings: Sequence[Finding]) -> str:
    out = ["<section><h2>Diagnosis</h2>"]
    if not findings:
        out.append(
            '<p class="muted">No likely cause found'
            + (" for the events below." if run.events else ": nothing to diagnose.")
            + "</p>"
        )
    for f in findings:
        severity = str(_field(f, "severity", "medium"))
        css = severity if severity in SEVERITIES else ""
        step, layers = _field(f, "step"), _as_list(_field(f, "layers"))
        where = []
        if step is not None:
            where.append(f"step {_e(step)}")
        if layers:
            where.append("layers " + _e(", ".join(map(str, layers))))
        out.append(
            f'<article class="finding"><h3><span class="badge {css}">{_e(severity)}</span>'
            f"{_e(_field(f, 'title', ''))}</h3>"
            f'<div class="muted mono">{_e(_field(f, "cause", ""))}'
            + (f" &middot; {' &middot; '.join(where)}" if where else "")
            + f"</div><p>{_e(_field(f, 'summary', ''))}</p>"
        )
        for label, key in (("Evidence", "evidence"), ("What to try", "advice")):
            items = _as_list(_field(f, key))
            if items:
                lis = "".join(f"<li>{_e(x)}</li>" for x in items)
                out.append(f'<div class="label">{label}</div><ul class="{key}">{lis}</ul>')
        out.append("</article>")
    out.append("</section>")
    return "".join(out)


def _localizations(run: RunLog) -> str:
    if not run.localizations:
        return ""
    rows = []
    for rec in run.localizations[:MAX_LOCALIZATION_ROWS]:
        if not reproduced(rec):
            rows.append(
                f'<tr><td class="num">{_e(rec.get("step", ""))}</td>'
                f'<td class="mono">(not reproduced)</td><td></td>'
                f"<td>{_e(started_in(rec).removeprefix('not found: '))}</td>"
                f"<td>{_e(rec.get('method', ''))}</td></tr>"
            )
            continue
        path = " → ".join(map(str, _as_list(rec.get("path"))))
        rows.append(
            f'<tr><td class="num">{_e(rec.get("step", ""))}</td>'
            f'<td class="mono">{_e(rec.get("origin", ""))}</td><td>{_e(rec.get("phase", ""))}</td>'
            f'<td class="mono">{_e(path)}</td><td>{_e(rec.get("method", ""))}</td></tr>'
        )
    left = len(run.localizations) - MAX_LOCALIZATION_ROWS
    note = f'<p class="muted">{left} more not shown.</p>' if left > 0 else ""
    return (
        "<section><h2>Where it started</h2><table><thead><tr><th>step</th><th>origin</th>"
        "<th>phase</th><th>path (order it spread)</th><th>method</th></tr></thead><tbody>"
        + "".join(rows)
        + f"</tbody></table>{note}</section>"
    )


def reproduced(loc: Mapping[str, Any]) -> bool:
    """Whether a localization found where it started (a replay that saw every value finite
    records phase ``none`` and no origin)."""
    return bool(loc.get("origin")) and loc.get("phase") not in (None, "", "none")


def started_in(loc: Mapping[str, Any]) -> str:
    """Where a non-finite step started, in words; plain when the replay could not reproduce it."""
    step = loc.get("step")
    if reproduced(loc):
        return f"{loc.get('origin')} ({loc.get('phase')}, step {step})"
    return (
        f"not found: the replay of step {step} did not reproduce the NaN/Inf (every value "
        "came out finite): the fault was transient, or depends on state the replay does not "
        "restore (a random draw such as dropout, a value that changed since)"
    )


def _ranked(ranked: Any) -> str:
    """The layers an event ranks (name, z-score, share of the global norm), one short clause each."""
    if not isinstance(ranked, list):
        return _num(ranked)
    parts = []
    for r in ranked:
        if isinstance(r, Mapping):
            share = r.get("share")
            pct = f" {100 * share:.0f}% of norm" if isinstance(share, (int, float)) else ""
            parts.append(f"{r.get('name')} (z={_num(r.get('z'))}{pct})")
    return "; ".join(parts)


def _detail(detail: Any) -> str:
    if not isinstance(detail, Mapping):
        return "" if detail is None else _e(detail)
    items = list(detail.items())
    text = ", ".join(
        f"{k}: {_ranked(v)}" if k == "ranked" else f"{k}={_num(v)}"
        for k, v in items[:MAX_DETAIL_ITEMS]
    )
    if len(items) > MAX_DETAIL_ITEMS:
        text += f", +{len(items) - MAX_DETAIL_ITEMS} more"
    return _e(text)


def _event_row(e: Mapping[str, Any]) -> str:
    kind = str(e.get("kind", ""))
    layers = [str(x) for x in _as_list(e.get("layers"))]
    shown = ", ".join(layers[:MAX_LAYERS_SHOWN])
    if len(layers) > MAX_LAYERS_SHOWN:
        shown += f" +{len(layers) - MAX_LAYERS_SHOWN} more"
    # The color comes from a fixed table keyed by kind, never from the run's text itself.
    color = plots.event_color(kind)
    return (
        f'<tr class="event"><td class="num">{_e(e.get("step", ""))}</td>'
        f'<td><span class="badge" style="background:{color}">{_e(kind)}</span></td>'
        f'<td class="mono">{_e(shown)}</td><td>{_e(e.get("action", ""))}</td>'
        f'<td class="mono">{_detail(e.get("detail"))}</td></tr>'
    )


def _episode_cells(group: Sequence[Mapping[str, Any]]) -> tuple[list[str], str, str]:
    """An episode's layers (each once), the first few of them as shown, and its actions."""
    layers = list(dict.fromkeys(str(x) for e in group for x in _as_list(e.get("layers"))))
    shown = ", ".join(layers[:MAX_LAYERS_SHOWN])
    if len(layers) > MAX_LAYERS_SHOWN:
        shown += f" +{len(layers) - MAX_LAYERS_SHOWN} more"
    actions = ", ".join(dict.fromkeys(str(e.get("action", "")) for e in group))
    return layers, shown, actions


def _episode_row(group: Sequence[Mapping[str, Any]]) -> str:
    """One row for an episode of ``vanishing`` events: the step range, how many layers, the
    first few by name."""
    layers, shown, actions = _episode_cells(group)
    steps = [e.get("step") for e in group]
    span = f"{steps[0]}–{steps[-1]}" if steps[0] != steps[-1] else str(steps[0])
    return (
        f'<tr class="event"><td class="num">{_e(span)}</td>'
        f'<td><span class="badge" style="background:{plots.event_color("vanishing")}">'
        f"vanishing</span></td>"
        f'<td class="mono">{len(layers)} layer{"s" if len(layers) != 1 else ""}: {_e(shown)}</td>'
        f"<td>{_e(actions)}</td><td>{len(group)} events: each layer's gradient norm stayed "
        f"1000x below its early level (one row for the episode)</td></tr>"
    )


#: Events of one kind this many steps apart or less are one episode: one row, expandable.
EPISODE_GAP = 50
VANISH_EPISODE_GAP = EPISODE_GAP  # the name it had when only ``vanishing`` events were grouped
#: At most this many events listed inside an expanded row.
MAX_EPISODE_ITEMS = 50


def event_rows(events: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Events by step, grouped by kind into episodes (runs of one kind at most
    :data:`EPISODE_GAP` steps apart), one row each, placed at its first step: one row per layer
    per occurrence would bury the rest. An event without a step keeps its own row."""
    rows: list[list[Mapping[str, Any]]] = []
    open_by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for e in sorted(events, key=_step_of):
        if not _finite(e.get("step")):
            rows.append([e])
            continue
        kind = str(e.get("kind", ""))
        episode = open_by_kind.get(kind)
        if episode is not None and e["step"] - episode[-1]["step"] <= EPISODE_GAP:
            episode.append(e)
            continue
        open_by_kind[kind] = episode = [e]
        rows.append(episode)
    return rows


def _grouped_row(group: Sequence[Mapping[str, Any]]) -> str:
    """One row for an episode of events of one kind: the step range, the layers, the actions,
    and each event (step, layers, detail) in a collapsed list."""
    kind = str(group[0].get("kind", ""))
    _, shown, actions = _episode_cells(group)
    steps = [e.get("step") for e in group]
    items = "".join(
        f"<li>step {_e(e.get('step', ''))}: "
        f"{_e(', '.join(str(x) for x in _as_list(e.get('layers'))[:MAX_LAYERS_SHOWN]))} "
        f"{_detail(e.get('detail'))}</li>"
        for e in group[:MAX_EPISODE_ITEMS]
    )
    if len(group) > MAX_EPISODE_ITEMS:
        items += f"<li>+{len(group) - MAX_EPISODE_ITEMS} more</li>"
    return (
        f'<tr class="event"><td class="num">{_e(f"{steps[0]}–{steps[-1]}")}</td>'
        f'<td><span class="badge" style="background:{plots.event_color(kind)}">{_e(kind)}'
        f'</span></td><td class="mono">{_e(shown)}</td><td>{_e(actions)}</td>'
        f"<td><details><summary>{len(group)} events</summary><ul>{items}</ul></details></td></tr>"
    )


def _row(group: Sequence[Mapping[str, Any]]) -> str:
    if group[0].get("kind") == "vanishing":
        return _episode_row(group)
    return _event_row(group[0]) if len(group) == 1 else _grouped_row(group)


def _events(run: RunLog) -> str:
    events = event_rows(run.events)
    if not events:
        return '<section><h2>Events</h2><p class="muted">No events.</p></section>'
    head = (
        "<table><thead><tr><th>step</th><th>kind</th><th>layers</th><th>action</th>"
        "<th>detail</th></tr></thead><tbody>"
    )
    kept = events[:MAX_EVENT_ROWS]
    first = "".join(_row(g) for g in kept[:EVENT_ROWS_SHOWN])
    out = [f"<section><h2>Events ({len(run.events)})</h2>", head, first, "</tbody></table>"]
    rest = kept[EVENT_ROWS_SHOWN:]
    if rest:
        n_rest = sum(len(g) for g in rest)
        out += [
            f"<details><summary>Show {len(rest)} more row(s) ({n_rest} event(s))</summary>",
            head,
            "".join(_row(g) for g in rest),
            "</tbody></table></details>",
        ]
    omitted = sum(len(g) for g in events[MAX_EVENT_ROWS:])
    if omitted:
        out.append(
            f'<p class="muted">{omitted} more event(s) in {len(events) - len(kept)} row(s) '
            f"omitted ({len(run.events)} in total); every event is in {_e(run.path.name)}.</p>"
        )
    out.append("</section>")
    return "".join(out)


def _counters(run: RunLog) -> str:
    if not run.end:
        return ""
    rows = []
    for group in ("counters", "events"):
        values = run.end.get(group)
        if isinstance(values, Mapping):
            for k, v in values.items():
                label = f"{k} events" if group == "events" else k
                rows.append(f'<tr><td>{_e(label)}</td><td class="num">{_e(_num(v))}</td></tr>')
    if not rows:
        return ""
    return (
        '<section><h2>Counters</h2><table class="counters"><tbody>'
        + "".join(rows)
        + "</tbody></table></section>"
    )


def _figures(figures: Mapping[str, str | os.PathLike]) -> str:
    if not figures:
        return '<section><h2>Figures</h2><p class="muted">No step records to plot.</p></section>'
    out = ["<section><h2>Figures</h2>"]
    for name, path in figures.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        title = TITLES.get(name, name)
        out.append(
            f'<figure id="{_e(name)}"><img src="data:image/png;base64,{data}" alt="{_e(title)}">'
            f"<figcaption><b>{_e(title)}.</b> {_e(CAPTIONS.get(name, ''))}</figcaption></figure>"
        )
    out.append("</section>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------


def terminal_summary(
    run: RunLog, findings: Sequence[Finding], report_path: str | os.PathLike | None = None
) -> str:
    """A few plain lines for the terminal: steps, events by kind, the first event and its layers,
    where it started, the findings, and where the report was written."""
    lines = [
        f"run: {run.path.parent}",
        f"steps: {total_steps(run)} ({len(run.steps)} recorded), layers: {len(run.layers)}",
    ]
    state, sentence = verdict(run, findings)
    lines.append(f"verdict: {sentence}")
    if run.events:
        first = min(run.events, key=_step_of)
        layers = ", ".join(map(str, _as_list(first.get("layers"))[:MAX_LAYERS_SHOWN]))
        lines.append(
            f"first event: step {first.get('step')} {first.get('kind')}"
            + (f" in {layers}" if layers else "")
        )
    if run.localizations:
        lines.append(f"started in: {started_in(run.localizations[0])}")
    lines.extend(rerun_sentences(run.steps))
    if findings:
        lines.append("findings:")
        for f in findings:
            lines.append(f"  [{_field(f, 'severity', 'medium')}] {_field(f, 'title', '')}")
            summary = " ".join(str(_field(f, "summary", "")).split())
            if summary:
                lines.append(f"      {summary}")
    elif state != "healthy":
        lines.append("findings: no likely cause found")
    lines.extend(f"note: {note}" for note in run.notes)
    if report_path is not None:
        lines.append(f"report: {report_path}")
    # Run text reaches the terminal too: control characters (an escape sequence hidden in a layer
    # name) are shown as "?", never sent to the terminal.
    return "\n".join("".join(c if c.isprintable() else "?" for c in line) for line in lines)
