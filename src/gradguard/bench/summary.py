"""Turn finished runs into the comparison: one row per setting x mitigation (divergence rate over
seeds, the runs that did not learn, test metric mean +- std, time to target, Guard overhead,
interventions), as ``summary.md``, ``summary.csv``, a terminal table, and PNG plots
(:mod:`gradguard.bench.plots`: the stability map, loss curves and gradient-norm timelines).

A run's outcome (diverged, did not learn, trained) is :func:`gradguard.bench.outcome.outcome_of`:
rows stored before results carried an ``outcome`` are read by the same rule."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .outcome import outcome_of

SETTING = ("task", "model", "optimizer", "lr")
COLUMNS = (
    "task",
    "model",
    "optimizer",
    "lr",
    "options",
    "mitigation",
    "runs",
    "diverged",
    "did_not_learn",
    "divergence_rate",
    "metric_mean",
    "metric_std",
    "score_mean",
    "score_se",
    "reached_target",
    "steps_to_target",
    "seconds_to_target",
    "guard_share",
    "clipped_per_run",
    "skipped_per_run",
    "faults",
    "vs_clean",
    "nonfinite_weights",
    "steps_to_recover",
    "unrecovered",
)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


_CHANCE: dict[str, float] = {}


def _chance(config: dict[str, Any]) -> float:
    """The task's chance metric (what a model that learned nothing scores), built once per task."""
    key = repr((config.get("task"), sorted(dict(config.get("task_options") or {}).items())))
    if key not in _CHANCE:
        from .tasks import make_task

        _CHANCE[key] = make_task(
            config["task"], **dict(config.get("task_options") or {})
        ).chance_metric
    return _CHANCE[key]


def _score(configs: Sequence[dict[str, Any]], res: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """Mean and standard error of the final metric over every seed, a run that ended without
    one (it diverged before the end) scored at chance: unlike ``metric_mean``, which averages the
    runs that have a metric, it does not flatter a mitigation whose runs blow up."""
    xs = []
    for cfg, x in zip(configs, res, strict=True):
        m = x["test_metric"]
        xs.append(m if m is not None and math.isfinite(m) else _chance(cfg))
    if not xs:
        return math.nan, math.nan
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return statistics.fmean(xs), se


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """Every setting of a run except its mitigation and seed, task/model options flattened."""
    out = {k: v for k, v in config.items() if k not in ("mitigation", "seed")}
    for group in ("task_options", "model_options"):
        for name, value in sorted(dict(out.pop(group, {}) or {}).items()):
            out[name if name not in out else f"{group}.{name}"] = value
    return out


def _option_label(settings: dict[str, Any], varying: Sequence[str]) -> str:
    return " ".join(f"{k}={_fmt(settings.get(k))}" for k in varying)


def _flat_and_varying(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each run's flattened settings, and the names (beyond ``SETTING``) whose values differ."""
    flat = [_settings(r["config"]) for r in runs]
    names: list[str] = []
    for f in flat:
        names.extend(k for k in f if k not in names)
    varying = [k for k in names if k not in SETTING and len({repr(f.get(k)) for f in flat}) > 1]
    return flat, varying


def summarize(runs: Sequence[dict[str, Any]], steps_of=None) -> list[dict[str, Any]]:
    """Aggregate runs over seeds, keeping the order in which settings and mitigations appear.

    Runs are grouped by every setting but the seed, so runs that differ in anything else (steps,
    an init scale, a sequence length) are never pooled; what varies beyond task, model, optimizer
    and LR is named in the ``options`` column (e.g. ``T=20 init_scale=1.7``).

    ``diverged`` and ``did_not_learn`` count the runs of each outcome (:func:`outcomes`);
    ``steps_of(key)``, if given, lets a row stored before outcomes be judged by its loss too.
    """
    groups, options, clean_of = _group_runs(runs)
    outcome = outcomes(runs, steps_of)
    rows = []
    metric_of: dict[tuple, float] = {}
    for key, members in groups.items():
        rows.append(_group_row(key, members, options[key], [outcome[id(m)] for m in members]))
        metric_of[key] = rows[-1]["metric_mean"]
    # A faulted row's metric against the same setting and mitigation without the fault.
    for row, key in zip(rows, groups, strict=True):
        clean = metric_of.get(clean_of.get(key, ()))
        if clean is not None and not math.isnan(clean) and not math.isnan(row["metric_mean"]):
            row["vs_clean"] = row["metric_mean"] - clean
    return rows


def _group_key(f: dict[str, Any], mitigation: str) -> tuple:
    """A summary row's key: every setting but the seed (``f``: a run's flat settings), and the
    mitigation."""
    return (*(f[k] for k in SETTING), repr(sorted(f.items(), key=repr)), mitigation)


def _group_runs(
    runs: Sequence[dict[str, Any]],
) -> tuple[dict[tuple, list[dict[str, Any]]], dict[tuple, str], dict[tuple, tuple]]:
    """The runs by summary row key, in the order they appear; each key's ``options`` label; and
    each faulted key's clean twin (the same settings without the fault)."""
    flat, varying = _flat_and_varying(runs)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    options: dict[tuple, str] = {}
    clean_of: dict[tuple, tuple] = {}  # a faulted group -> the same settings without the fault
    for r, f in zip(runs, flat, strict=True):
        mitigation = r["config"]["mitigation"]
        key = _group_key(f, mitigation)
        groups[key].append(r)
        options[key] = _option_label(f, varying)
        if f.get("faults", "none") != "none":
            clean_of[key] = _group_key({k: v for k, v in f.items() if k != "faults"}, mitigation)
    return groups, options, clean_of


def _group_row(
    key: tuple, members: list[dict[str, Any]], options: str, seen: list[str]
) -> dict[str, Any]:
    """One summary row: a group's runs (``seen``: their outcomes) aggregated over seeds."""
    res = [m["result"] for m in members]
    metric_mean, metric_std = _mean_std([x["test_metric"] for x in res])
    score_mean, score_se = _score([m["config"] for m in members], res)
    reached = [x for x in res if x["steps_to_target"] is not None]
    inter = [x.get("interventions", {}) for x in res]
    return dict(
        zip(SETTING, key[: len(SETTING)], strict=True),
        options=options,
        mitigation=key[-1],
        runs=len(res),
        diverged=seen.count("diverged"),
        did_not_learn=seen.count("did_not_learn"),
        divergence_rate=seen.count("diverged") / len(res),
        metric_mean=metric_mean,
        metric_std=metric_std,
        score_mean=score_mean,
        score_se=score_se,
        reached_target=len(reached),
        steps_to_target=statistics.median(x["steps_to_target"] for x in reached)
        if reached
        else None,
        seconds_to_target=statistics.median(x["seconds_to_target"] for x in reached)
        if reached
        else None,
        guard_share=statistics.fmean(x["guard_share"] for x in res),
        clipped_per_run=statistics.fmean(i.get("clipped", 0) for i in inter),
        skipped_per_run=statistics.fmean(i.get("skipped", 0) for i in inter),
        faults=members[0]["config"].get("faults", "none"),
        vs_clean=None,
        nonfinite_weights=sum(x.get("diverged_reason") == "nonfinite_weights" for x in res),
        steps_to_recover=_median_or_none(
            [x["steps_to_recover"] for x in res if x.get("steps_to_recover") is not None]
        ),
        unrecovered=sum(x.get("unrecovered", 0) for x in res),
    )


def outcomes(runs: Sequence[dict[str, Any]], steps_of=None) -> dict[int, str]:
    """Each run's outcome by ``id(run)``; an old row at chance reads its steps (if ``steps_of``)."""
    out = {}
    for r in runs:
        res = r["result"]
        old_at_chance = "outcome" not in res and res.get("diverged_reason") == "at_chance"
        steps = steps_of(r["key"]) if steps_of is not None and old_at_chance else None
        out[id(r)] = outcome_of(res, steps)
    return out


def _median_or_none(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def _share(v: float) -> str:
    """A time share as a percentage; "-" where it was not measured (a Keras run's Guard runs
    inside the compiled step)."""
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.1%}"


def _metric_cell(r: dict[str, Any]) -> str:
    if math.isnan(r["metric_mean"]):
        return "-"
    return f"{_fmt(r['metric_mean'])} +- {_fmt(r['metric_std'], 2)}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    with_options = any(r.get("options") for r in rows)
    head = (
        "| task | model | opt | lr | "
        + ("options | " if with_options else "")
        + "mitigation | diverged | did not learn | test metric | reached target | steps to target | guard share | clipped/run | skipped/run |"
    )
    with_faults = any(r.get("faults", "none") != "none" for r in rows)
    if with_faults:
        head += " vs clean | non-finite weights | steps to recover | unrecovered |"
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for r in rows:
        opts = f"{r.get('options', '')} | " if with_options else ""
        line = (
            f"| {r['task']} | {r['model']} | {r['optimizer']} | {_fmt(r['lr'])} | {opts}`{r['mitigation']}` | "
            f"{r['diverged']}/{r['runs']} | {r.get('did_not_learn', 0)}/{r['runs']} | {_metric_cell(r)} | "
            f"{r['reached_target']}/{r['runs']} | {_fmt(r['steps_to_target'])} | {_share(r['guard_share'])} | "
            f"{r['clipped_per_run']:.0f} | {r['skipped_per_run']:.0f} |"
        )
        if with_faults:
            vs = r.get("vs_clean")
            line += (
                f" {'-' if vs is None else f'{vs:+.3f}'} | {r.get('nonfinite_weights', 0)}/{r['runs']} | "
                f"{_fmt(r.get('steps_to_recover'))} | {r.get('unrecovered', 0)} |"
            )
        lines.append(line)
    return "\n".join(lines)


def terminal_table(rows: Sequence[dict[str, Any]]) -> str:
    settings = [
        " ".join(
            x
            for x in (
                f"{r['task']}/{r['model']}/{r['optimizer']} lr={_fmt(r['lr'])}",
                r.get("options"),
            )
            if x
        )
        for r in rows
    ]
    width = max([28, *map(len, settings)])
    head = (
        f"{'setting':{width}s} {'mitigation':32s} {'diverged':>8s} {'no learn':>8s} "
        f"{'test metric':>15s} {'to target':>9s} {'guard':>6s}"
    )
    out = [head, "-" * len(head)]
    for r, setting in zip(rows, settings, strict=True):
        metric = (
            "-"
            if math.isnan(r["metric_mean"])
            else f"{_fmt(r['metric_mean'])}+-{_fmt(r['metric_std'], 2)}"
        )
        out.append(
            f"{setting:{width}s} {r['mitigation'][:32]:32s} {r['diverged']:>4d}/{r['runs']:<3d} "
            f"{r.get('did_not_learn', 0):>4d}/{r['runs']:<3d} {metric:>15s} "
            f"{_fmt(r['steps_to_target']):>9s} {_share(r['guard_share']):>6s}"
        )
    return "\n".join(out)


def write_outputs(
    runs: Sequence[dict[str, Any]], steps_of, out_dir: str | Path
) -> list[dict[str, Any]]:
    """Write summary.md, summary.csv and the plots; return the summary rows.

    ``steps_of(key)`` returns a run's per-step metrics (from the results database).
    """
    out = Path(out_dir)
    rows = summarize(runs, steps_of)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "summary.md").write_text(
        "# gradguard bench\n\nDiverged: the run blew up: non-finite loss or weights, a final loss above 10x its "
        "first, the Guard halting it, or a final test metric at chance after a gradient norm above 100x its "
        "median or a 10-step mean loss above 2x its first. Did not learn: at chance with neither (calm norms, "
        "a loss that never rose). Test metric: mean +- std over seeds (accuracy for classification, MSE for regression). "
        "Guard share: the fraction of training time spent in `Guard.step()`.\n\n"
        + markdown_table(rows)
        + "\n"
    )
    from .plots import plot_all  # matplotlib is imported only when plots are drawn

    plot_all(runs, steps_of, out)
    return rows
