"""The answer of ``gradguard advise``: :class:`Advice`, and its text and markdown renderings."""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any


def _g(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _pct(x: float) -> str:
    return (
        "-" if x is None or not math.isfinite(x) else f"{x:.0%}" if x >= 0.01 or x == 0 else "<1%"
    )


@dataclass
class Advice:
    """The recommendation and the evidence behind it.

    ``spec``: the recommended Guard policy spec; ``code``: the line that uses it; ``reason``: why,
    in one sentence; ``trains``: whether it trained at the user's LR in every seed;
    ``table``: one row per candidate (divergences per stress level, stability ``margin``, score
    at the user's LR, final loss, overhead, interventions), best first; ``probe``: the LR range
    probe (rows, where unguarded training diverges, the clip threshold and where it comes from);
    ``diagnosis``: what to change in the model (the diagnosis rules' findings); ``notes``: the LR
    advice and anything the plan had to cut; ``plan``: the runs made; ``spent``: steps and seconds.
    """

    setting: str
    lr: float
    spec: str
    code: str
    reason: str
    trains: bool
    metric: str
    higher_is_better: bool
    table: list[dict[str, Any]]
    probe: dict[str, Any]
    diagnosis: list[dict[str, Any]]
    notes: list[str]
    plan: dict[str, Any]
    budget: str
    spent: dict[str, float]
    out: str
    extra: dict[str, Any] = field(default_factory=dict)

    # ----- data ---------------------------------------------------------------------------------
    @property
    def threshold(self) -> dict[str, Any]:
        """The clip threshold: ``value`` (the exact percentile), ``percentile``, ``lr`` of the run."""
        return self.probe["threshold"]

    @property
    def recommended(self) -> dict[str, Any]:
        """The table row of the recommended policy."""
        return next(r for r in self.table if r["spec"] == self.spec)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        # NaN (a diverged run's score) as null: the file stays standard JSON.
        return json.dumps(_nan_to_none(self.as_dict()), indent=indent)

    # ----- text ---------------------------------------------------------------------------------
    def __str__(self) -> str:
        return "\n".join(self._lines(markdown=False))

    def markdown(self) -> str:
        return "\n".join(self._lines(markdown=True))

    def _lines(self, markdown: bool) -> list[str]:
        p = self.plan
        levels = " ".join(f"x{x:g}" for x in p["levels"])
        lines = [
            ("# " if markdown else "") + f"gradguard advise: {self.setting}",
            "",
            f"probe: {p['probe_runs']} unguarded LR-probe runs + {p['candidates']} policies x "
            f"{len(p['levels'])} LRs ({levels}) x {p['seeds']} seed(s), {p['steps']} steps each: "
            f"{p['runs']} runs, {p['total_steps']} steps, {self.spent['seconds']:.0f} s "
            f"(budget {self.budget})",
        ]
        if p.get("cuts"):
            lines.append(f"to fit the budget: {'; '.join(p['cuts'])}")
        lines += ["", ("## " if markdown else "") + f"Recommended policy: {self.spec}", ""]
        lines += [f"    {self.code}", ""]
        lines += _wrap(f"why: {self.reason}", markdown)
        lines += self._probe_lines(markdown)
        lines += self._table_lines(markdown)
        lines += self._diagnosis_lines(markdown)
        if self.notes:
            lines += ["", ("## " if markdown else "") + "Notes", ""]
            for n in self.notes:
                lines += _wrap(f"- {n}", markdown)
        lines += [
            "",
            f"results: {self.out}/ (results.db, advice.json, advice.md, runs/ telemetry: a folder"
            " a run, task-model-mitigation-lrLR-seedN-hash)",
        ]
        return lines

    def _probe_lines(self, markdown: bool) -> list[str]:
        rows = self.probe["rows"]
        head = [
            "lr",
            "x",
            "unguarded run",
            "final loss",
            self.metric,
            "grad norm p50",
            "p90",
            "max",
        ]
        body = [_probe_row(r) for r in rows]
        title = "LR range probe (no Guard, seed 0)"
        out = ["", ("## " if markdown else "") + title, "", *_table(head, body, markdown), ""]
        out += _wrap(self._probe_verdict(), markdown)
        out += self._threshold_lines(markdown)
        return out

    def _probe_verdict(self) -> str:
        """Where unguarded training trains and where it diverges, in the LR probe."""
        d, t = self.probe["diverges_at"], self.probe["trains_up_to"]
        if d is None:
            return (
                f"Unguarded training trains at every probed LR, up to x{t:g} ({self.lr * t:.3g})."
            )
        if t is None:
            low = min(r["factor"] for r in self.probe["rows"])
            return (
                f"Unguarded training diverges (or ends at chance) at every probed LR, down to "
                f"x{low:g} yours."
            )
        return (
            f"Unguarded training diverges (or ends at chance) from lr {self.lr * d:.3g} "
            f"(x{d:g}); it trains up to lr {self.lr * t:.3g} (x{t:g})."
        )

    def _threshold_lines(self, markdown: bool) -> list[str]:
        """The clip threshold the clip_norm candidates use, and where it came from."""
        th = self.threshold
        if th.get("lr") is None or th.get("value") is None:
            return []
        scaled = (
            f" x {th['lr']:g}/{self.lr:g} (its LR over yours: the same largest step)"
            if th.get("scale", 1.0) != 1.0
            else ""
        )
        return _wrap(
            f"Clip threshold {th['value']:.4g} (the clip_norm candidates): "
            f"p{th['percentile']:g} of the gradient norms of the unguarded run at lr "
            f"{th['lr']:g} ({th['norms']} step{'s' if th['norms'] != 1 else ''}){scaled}"
            + ("" if th.get("healthy") else "; no run up to your LR trained: its first step's")
            + ".",
            markdown,
        )

    def _table_lines(self, markdown: bool) -> list[str]:
        levels = [f"x{x:g}" for x in self.plan["levels"]]
        head = [
            "rank",
            "policy",
            *[f"div {x}" for x in levels],
            "margin",
            f"{self.metric} @x1",
            "final loss",
            "overhead",
            "clipped",
            "skipped",
        ]
        body = []
        for r in sorted(self.table, key=lambda r: r["rank"]):
            score = (
                "-"
                if r["score"] is None or not math.isfinite(r["score"])
                else f"{r['score']:.4g} +- {r['score_std']:.2g}"
            )
            margin = "-" if r["margin"] is None else f"{r['margin_lr']:g} (x{r['margin']:g})"
            body.append(
                [
                    str(r["rank"]),
                    ("`" + r["spec"] + "`") if markdown else r["spec"],
                    *[
                        (lambda c: f"{c[0]}/{c[1]}" if c[1] else "-")(r["runs"].get(x, [0, 0]))
                        for x in levels
                    ],
                    margin,
                    score,
                    _g(r["final_loss"]),
                    _pct(r["overhead"]) if r["spec"] != "none" else "0%",
                    _pct(r["clipped"]),
                    _pct(r["skipped"]),
                ]
            )
        return [
            "",
            ("## " if markdown else "")
            + f"Evidence (x1 = your lr {self.lr:g}; div = seeds that diverged or did not learn/seeds; "
            "margin = the highest LR "
            "up to which every seed trained)",
            "",
            *_table(head, body, markdown),
        ]

    def _diagnosis_lines(self, markdown: bool) -> list[str]:
        out = ["", ("## " if markdown else "") + "Diagnosis (rules on the probe's telemetry)", ""]
        if not self.diagnosis:
            out.append(
                "No finding: the unguarded runs' telemetry shows no init, normalization, LR or "
                "input problem."
            )
            return out
        for f in self.diagnosis:
            out += _wrap(
                f"[{f['severity']}] {f['title']} (at lr {f['lr']:g}, {f['run']}): {f['summary']}",
                markdown,
            )
            for a in f["advice"]:
                out += _wrap(f"    - {a}", markdown, indent="      ")
        return out


def _probe_row(r: dict[str, Any]) -> list[str]:
    """One LR-probe run as a table row: its LR, factor, how it ended, loss, metric and norms."""
    if r["status"] == "failed":
        what = f"raised {r.get('error') or ''}"[:40]
    elif r["status"] != "done":
        what = "not run"
    elif r["reason"] == "at_chance":  # did not learn; one that blew up names the spike
        what = f"ended at chance (step {r['steps_run']})"
    elif r["diverged"]:
        what = f"diverged ({r['reason']}, step {r['steps_run']})"
    else:
        what = "trained"
    return [
        _g(r["lr"]),
        f"x{r['factor']:g}",
        what,
        _g(r["final_loss"]),
        _g(r["metric"]),
        _g(r["norm_p50"]),
        _g(r["norm_p90"]),
        _g(r["norm_max"]),
    ]


def _wrap(text: str, markdown: bool, indent: str = "  ") -> list[str]:
    if markdown:
        return [text]
    return textwrap.wrap(text, 100, subsequent_indent=indent, break_on_hyphens=False) or [""]


def _table(head: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return lines + ["| " + " | ".join(row) + " |" for row in body]
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)
    ]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)]


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj
