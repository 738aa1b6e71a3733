"""Generate the results tables in the docs from the stored results, so nothing is copied by hand.

Stored results live in ``docs/results/``: ``NAME.csv`` is a bench ``summary.csv`` exactly as
``gradguard bench`` wrote it, ``NAME.txt`` the output of a benchmark script or of ``gradguard
advise``, and ``NAME.json`` beside either says how it was made (the command, its wall time, the
commit, torch, the machine). A table in a Markdown file sits between marker comments::

    <!-- table:quick-pivot -->
    (generated: never edit by hand)
    <!-- /table:quick-pivot -->

and :data:`TABLES` says what goes there: which stored result, rendered how. Every block ends with
a line naming its source and the command that made it.

    python scripts/docs_tables.py            # rewrite every table from docs/results/
    python scripts/docs_tables.py --check    # exit 1 if a table is stale or edited by hand, or a link is broken (CI)
    python scripts/docs_tables.py store quick /tmp/bench-quick/summary.csv \\
        --command "gradguard bench --out /tmp/bench-quick" --wall-s 180

``store`` copies a result into ``docs/results/`` and writes its ``.json``; run the generator after
it. ``--check`` also refuses hand-kept test counts ("999 tests") anywhere in the docs (a count of
tests is what ``python -m pytest`` prints, not something to keep in prose) and relative links, or
their ``#anchors``, that lead nowhere.

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("docs/results")
#: The Markdown files that may hold tables (relative to the root).
DOC_GLOBS = ("README.md", "CHANGELOG.md", "docs/*.md")
#: A marker is a line of its own (one quoted in prose, inside backticks, is not a marker).
MARKER = re.compile(
    r"^<!-- table:(?P<name>[\w.-]+) -->\n(?P<body>.*?)^<!-- /table:(?P=name) -->$", re.S | re.M
)
OPEN_MARKER = re.compile(r"^<!-- (/?)table:([\w.-]+) -->$", re.M)
#: Test counts kept by hand go stale on the next commit; CI prints the real one.
TEST_COUNT = re.compile(r"\b\d[\d,]*\s+(?:tests|passed)\b", re.I)


# ----- stored results ------------------------------------------------------------------------------
def _num(s: str) -> float | None:
    """A number from the summary CSV: '' (None in the bench) -> None, 'nan' -> nan."""
    return None if s == "" else float(s)


def read_summary(path: Path) -> list[dict]:
    """The rows of a bench ``summary.csv`` with numbers as numbers."""
    ints = (
        "runs",
        "diverged",
        "did_not_learn",
        "reached_target",
        "nonfinite_weights",
        "unrecovered",
    )
    floats = (
        "lr",
        "divergence_rate",
        "metric_mean",
        "metric_std",
        "score_mean",
        "score_se",
        "steps_to_target",
        "seconds_to_target",
        "guard_share",
        "clipped_per_run",
        "skipped_per_run",
        "vs_clean",
        "steps_to_recover",
    )
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ints:
            if k in r:
                r[k] = int(r[k]) if r[k] != "" else 0
        for k in floats:
            if k in r:
                r[k] = _num(r[k])
    return rows


class MissingResult(Exception):
    """A table's stored result is not in docs/results/."""


def read_meta(root: Path, name: str) -> dict:
    path = root / RESULTS / f"{name}.json"
    if not path.exists():
        raise MissingResult(f"{path.relative_to(root)} is missing (run `store` first)")
    return json.loads(path.read_text())


def _wall(seconds: float | None) -> str:
    if seconds is None:
        return "wall time not recorded"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


# ----- cells -----------------------------------------------------------------------------------------
def _is_nan(x: float | None) -> bool:
    return x is None or math.isnan(x)


def _g(x: float | None, digits: int = 3) -> str:
    return "-" if _is_nan(x) else f"{x:.{digits}g}"


def _f3(x: float | None) -> str:
    return "-" if _is_nan(x) else f"{x:.3f}"


def _lr(x: float) -> str:
    return f"{x:g}"


def metric_pm(r: dict) -> str:
    """Mean +- std over seeds, '-' where no seed has a finite metric."""
    if _is_nan(r["metric_mean"]):
        return "-"
    return f"{_f3(r['metric_mean'])} ± {_g(r['metric_std'], 2)}"


def count(r: dict, key: str) -> str:
    """``k/n`` runs; '-' where the stored summary predates the column (``did_not_learn``)."""
    return "-" if r.get(key) is None else f"{r[key]}/{r['runs']}"


def with_divergence(r: dict, cell: str) -> str:
    """A cell, with the seeds that diverged (div) and those that did not learn (no-learn: ended
    at chance with calm norms) appended when any did."""
    notes = [f"div {r['diverged']}/{r['runs']}"] if r["diverged"] else []
    if r.get("did_not_learn"):
        notes.append(f"no-learn {r['did_not_learn']}/{r['runs']}")
    return f"{cell} ({', '.join(notes)})" if notes else cell


def fault_cell(r: dict) -> str:
    """A faults-suite cell: the mean metric; in brackets the runs whose weights went non-finite
    (NaN), those that diverged otherwise (div), those that did not learn (no-learn: at chance
    with calm norms), and the median steps to recover when above 0."""
    notes = []
    nan = r.get("nonfinite_weights", 0)
    other = r["diverged"] - nan
    if nan:
        notes.append(f"NaN {nan}/{r['runs']}")
    if other:
        notes.append(f"div {other}/{r['runs']}")
    if r.get("did_not_learn"):
        notes.append(f"no-learn {r['did_not_learn']}/{r['runs']}")
    rec = r.get("steps_to_recover")
    if rec is not None and not math.isnan(rec) and rec > 0:
        notes.append(f"rec {rec:g}")
    cell = _f3(r["metric_mean"])
    return f"{cell} ({', '.join(notes)})" if notes else cell


def share(x: float | None) -> str:
    return "-" if _is_nan(x) else f"{x:.1%}"


# ----- tables ----------------------------------------------------------------------------------------
def _md(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _code(s: str) -> str:
    return f"`{s}`"


def pivot(
    rows: list[dict], row_key: str, col_key: str, cell: Callable[[dict], str], col_fmt=str
) -> str:
    """Rows by ``row_key``, columns by ``col_key``, both in the order the bench wrote them."""
    row_vals = list(dict.fromkeys(r[row_key] for r in rows))
    col_vals = list(dict.fromkeys(r[col_key] for r in rows))
    at = {(r[row_key], r[col_key]): r for r in rows}
    head = [row_key if row_key != "mitigation" else "policy"] + [col_fmt(c) for c in col_vals]
    body = [
        [_code(rv)] + [cell(at[rv, cv]) if (rv, cv) in at else "" for cv in col_vals]
        for rv in row_vals
    ]
    return _md(head, body)


def bench_long(rows: list[dict], guard: bool = True) -> str:
    """Every row of a bench summary: the setting, the mitigation and what it did."""
    head = ["setting", "mitigation", "diverged", "did not learn", "test metric", "reached target"]
    head += ["steps to target"]
    head += ["guard share"] if guard else []
    head += ["clipped/run", "skipped/run"]
    body = []
    for r in rows:
        setting = f"{r['task']}/{r['model']}/{r['optimizer']} lr={_lr(r['lr'])}"
        if r.get("options"):
            setting += f" {r['options']}"
        line = [
            setting,
            _code(r["mitigation"]),
            count(r, "diverged"),
            count(r, "did_not_learn"),
            metric_pm(r),
            f"{r['reached_target']}/{r['runs']}",
            _g(r["steps_to_target"]),
        ]
        line += [share(r["guard_share"])] if guard else []
        line += [f"{r['clipped_per_run']:.0f}", f"{r['skipped_per_run']:.0f}"]
        body.append(line)
    return _md(head, body)


#: Tasks whose metric is a loss (lower is better); every other task's is an accuracy.
LOWER_IS_BETTER = ("adding", "charlm")
#: The promise's margins (issue: the default within 0.5 points of the best static clip where
#: unguarded diverges, within 0.5 of unguarded where it trains, within 1 of the clean run under
#: faults), in the metric's units for an accuracy: a point is 0.01.
MARGINS = {"diverges": 0.005, "trains": 0.005, "faults": 0.01}


def _score(r: dict) -> str:
    cell = f"{r['score_mean']:.3f} ± {r['score_se']:.3f}"
    notes = [f"div {r['diverged']}/{r['runs']}"] if r["diverged"] else []
    if r.get("did_not_learn"):
        notes.append(f"no-learn {r['did_not_learn']}/{r['runs']}")
    return f"{cell} ({', '.join(notes)})" if notes else cell


def stability(rows: list[dict]) -> str:
    """The default's promise per setting: the default beside no Guard, the old default, the peers
    and the best static clip of the sweep, as mean ± standard error over seeds (a run that
    diverged before the end scored at chance), and whether the promise holds."""
    settings = list(
        dict.fromkeys((r["task"], r["model"], r["optimizer"], r["lr"], r["faults"]) for r in rows)
    )
    at = {
        (r["task"], r["model"], r["optimizer"], r["lr"], r["faults"], r["mitigation"]): r
        for r in rows
    }
    head = ["setting", "kind", "none", "`default`", "`default_v1`", "`zclip`", "`autoclip:10`"]
    head += ["best static clip", "`default` vs reference", "holds"]
    body = []
    for st in settings:
        task = st[0]
        sign = -1.0 if task in LOWER_IS_BETTER else 1.0
        get = lambda m, st=st: at.get((*st, m))  # noqa: E731
        none, default = get("none"), get("default")
        if none is None or default is None:
            continue
        clips = [
            r
            for r in rows
            if (r["task"], r["model"], r["optimizer"], r["lr"], r["faults"]) == st
            and r["mitigation"].startswith("clip_norm:")
        ]
        best = max(clips, key=lambda r: sign * r["score_mean"]) if clips else None
        if st[4] != "none":
            kind = "faults"
            clean = at.get((*st[:4], "none", "default"))
            ref, ref_name = clean, "clean `default`"
        elif none["diverged"] * 2 >= none["runs"]:
            kind, ref, ref_name = "diverges", best, "best static clip"
        else:
            kind, ref, ref_name = "trains", none, "none"
        if ref is None:
            verdict, diff = "-", "-"
        else:
            d = sign * (default["score_mean"] - ref["score_mean"])
            diff = f"{d:+.3f} vs {ref_name}"
            ok = d >= -MARGINS[kind] and (kind != "diverges" or default["diverged"] == 0)
            verdict = "yes" if ok else "**no**"
        setting = f"{task}/{st[1]}/{st[2]} lr={_lr(st[3])}" + (
            f" {_code(st[4])}" if st[4] != "none" else ""
        )
        cells = [
            _score(r) if r else ""
            for r in (none, default, get("default_v1"), get("zclip"), get("autoclip:10"))
        ]
        body.append(
            [
                setting,
                kind,
                *cells,
                f"{_code(best['mitigation'])} {_score(best)}" if best else "",
                diff,
                verdict,
            ]
        )
    return _md(head, body)


def text_block(text: str) -> str:
    return "```text\n" + text.rstrip("\n") + "\n```"


@dataclass(frozen=True)
class Table:
    """One generated table: the stored result it reads and how it is rendered."""

    source: str  # a name in docs/results/ (NAME.csv or NAME.txt, and NAME.json)
    render: Callable[[object], str]  # the summary rows (csv) or the text (txt) -> Markdown
    what: str = ""  # a line put above the provenance line, if any


def _task(task: str) -> Callable[[list[dict]], list[dict]]:
    return lambda rows: [r for r in rows if r["task"] == task]


TABLES: dict[str, Table] = {
    # README: the quick suite as one grid, policy x LR.
    "quick-pivot": Table(
        "quick",
        lambda rows: pivot(
            rows,
            "mitigation",
            "lr",
            lambda r: with_divergence(r, metric_pm(r)),
            col_fmt=lambda lr: f"lr {_lr(lr)}",
        ),
    ),
    # docs/bench.md: every row of the quick suite.
    "quick": Table("quick", bench_long),
    "keras": Table("keras", lambda rows: bench_long(rows, guard=False)),
    "faults-digits": Table(
        "faults",
        lambda rows: pivot(_task("digits")(rows), "mitigation", "faults", fault_cell, _code),
    ),
    "faults-temporal-order": Table(
        "faults",
        lambda rows: pivot(
            _task("temporal_order")(rows), "mitigation", "faults", fault_cell, _code
        ),
    ),
    "advise-sweep": Table(
        "advise-sweep",
        lambda rows: _md(
            ["policy", "diverged", "did not learn", "test accuracy"],
            [
                [
                    _code(r["mitigation"]),
                    count(r, "diverged"),
                    count(r, "did_not_learn"),
                    metric_pm(r),
                ]
                for r in sorted(rows, key=lambda r: -(r["metric_mean"] or 0))
            ],
        ),
    ),
    "stability": Table("stability", stability),
    "advise-example": Table("advise-example", text_block),
    "advise-validation": Table("advise-validation", text_block),
    "guard-overhead-cpu": Table("guard-overhead-cpu", text_block),
    "guard-share": Table("guard-share", text_block),
    "telemetry-overhead": Table("telemetry-overhead", text_block),
    "diagnosis-corpus": Table("diagnosis-corpus", text_block),
    "diagnosis-off-grid": Table("diagnosis-off-grid", text_block),
    "diagnosis-across": Table("diagnosis-across", text_block),
    # The rnn and transformer suites (docs/bench.md) have tables here once their results are
    # stored again after the thread-pinning change: `store rnn ...`, then add the markers.
    "rnn": Table("rnn", bench_long),
    "transformer": Table("transformer", bench_long),
}


def provenance(root: Path, doc: Path, name: str, meta: dict) -> str:
    """The line under a table: its source file (linked from ``doc``) and how it was made."""
    kind = "csv" if meta.get("kind") == "bench" else "txt"
    src = root / RESULTS / f"{name}.{kind}"
    rel = os.path.relpath(src, (root / doc).parent).replace(os.sep, "/")
    made = [f"`{meta['command']}`"]
    if meta.get("runs"):
        made.append(f"{meta['runs']} runs")
    made.append(_wall(meta.get("wall_s")))
    if meta.get("machine"):
        made.append(meta["machine"])
    made.append(f"gradguard {meta.get('commit', '?')}, torch {meta.get('torch', '?')}")
    made.append(meta.get("date", "?"))
    return (
        f"<sub>Generated by `scripts/docs_tables.py` from [{rel[rel.rfind('/') + 1 :]}]({rel}); "
        f"made by {'; '.join(made)}.</sub>"
    )


def render(root: Path, doc: Path, table: str) -> str:
    spec = TABLES[table]
    meta = read_meta(root, spec.source)
    if meta.get("kind") == "bench":
        data: object = read_summary(root / RESULTS / f"{spec.source}.csv")
    else:
        data = (root / RESULTS / f"{spec.source}.txt").read_text()
    out = spec.render(data)
    return f"{out}\n\n{provenance(root, doc, spec.source, meta)}\n"


# ----- the documents ---------------------------------------------------------------------------------
def doc_files(root: Path) -> list[Path]:
    out: list[Path] = []
    for pattern in DOC_GLOBS:
        out += sorted(p.relative_to(root) for p in root.glob(pattern))
    return out


LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # no headings in code
    return {slug(h) for h in HEADING.findall(text)}


def broken_links(root: Path, doc: Path, text: str) -> list[str]:
    """Relative links (and their #anchors) in ``doc`` that lead nowhere."""
    out = []
    for target in LINK.findall(re.sub(r"```.*?```", "", text, flags=re.S)):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (root / doc).parent / path if path else root / doc
        if not dest.exists():
            out.append(f"{doc}: link to {target}: {path} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{doc}: link to {target}: no heading #{anchor} in {path or doc}")
    return out


def process(root: Path, check: bool) -> list[str]:
    """Rewrite (or, with ``check``, compare) every table; return the problems found."""
    problems: list[str] = []
    for doc in doc_files(root):
        text = (root / doc).read_text()
        new_text = process_doc(root, doc, text, check, problems)
        if not check and new_text != text:
            (root / doc).write_text(new_text)
    return problems


def process_doc(root: Path, doc: Path, text: str, check: bool, problems: list[str]) -> str:
    """One document with its tables regenerated; what is wrong with it goes to ``problems``."""
    paired = {m.start() for m in MARKER.finditer(text)}
    for m in OPEN_MARKER.finditer(text):
        if m.group(1) == "" and m.start() not in paired:
            problems.append(f"{doc}: table:{m.group(2)} has no closing marker")
    for m in TEST_COUNT.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        problems.append(
            f"{doc}:{line}: a hand-kept test count ({m.group(0)!r}); "
            "say what the tests check, not how many there are"
        )

    problems += broken_links(root, doc, text)

    def replace(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            problems.append(f"{doc}: unknown table:{name} (known: {', '.join(TABLES)})")
            return m.group(0)
        try:
            new = render(root, doc, name)
        except MissingResult as e:
            problems.append(f"{doc}: table:{name}: {e}")
            return m.group(0)
        if m.group("body") != new:
            if check:
                problems.append(
                    f"{doc}: table:{name} differs from what docs/results/"
                    f"{TABLES[name].source}.* gives (edited by hand, or results stored "
                    "without regenerating)"
                )
            else:
                print(f"{doc}: table:{name} regenerated")
        return f"<!-- table:{name} -->\n{new}<!-- /table:{name} -->"

    return MARKER.sub(replace, text)


# ----- storing a result -------------------------------------------------------------------------------
def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return out + ("+dirty src" if dirty else "")


def _torch_version() -> str:
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return out.stdout.strip()


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model})"


def store(root: Path, args: argparse.Namespace) -> None:
    src = Path(args.path)
    if src.is_dir():
        src = src / "summary.csv"
    if not src.is_file():
        raise SystemExit(f"docs_tables: {src} is not a file")
    kind = "bench" if src.suffix == ".csv" else "text"
    dest = root / RESULTS / f"{args.name}.{'csv' if kind == 'bench' else 'txt'}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    meta = {
        "name": args.name,
        "kind": kind,
        "command": args.command,
        "wall_s": args.wall_s,
        "date": args.date or datetime.date.today().isoformat(),
        "commit": args.commit or _git_commit(root),
        "torch": _torch_version(),
        "python": platform.python_version(),
        "machine": args.machine or _machine(),
    }
    if kind == "bench":
        meta["runs"] = sum(r["runs"] for r in read_summary(dest))
    if args.note:
        meta["note"] = args.note
    (root / RESULTS / f"{args.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"stored {dest.relative_to(root)} and {args.name}.json; now run without arguments")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(ROOT), help="the repository root (default: this one)")
    ap.add_argument("--check", action="store_true", help="exit 1 if any table is stale")
    sub = ap.add_subparsers(dest="cmd")
    st = sub.add_parser("store", help="copy a result into docs/results/ with how it was made")
    st.add_argument("name", help="the result's name (docs/results/NAME.csv or .txt)")
    st.add_argument("path", help="a bench --out folder or its summary.csv, or a text output")
    st.add_argument("--command", required=True, help="the exact command that made it")
    st.add_argument("--wall-s", type=float, help="its wall time in seconds")
    st.add_argument("--machine", help="where it ran (default: this machine's cores and CPU)")
    st.add_argument("--commit", help="the gradguard commit it ran (default: HEAD)")
    st.add_argument("--date", help="when (default: today)")
    st.add_argument("--note", help="anything a reader should know about the run")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    if args.cmd == "store":
        store(root, args)
        return 0
    problems = process(root, check=args.check)
    for p in problems:
        print(p, file=sys.stderr)
    if args.check:
        if problems:
            print(
                "docs_tables: run `python scripts/docs_tables.py` to regenerate the tables",
                file=sys.stderr,
            )
            return 1
        print("docs_tables: every table matches docs/results/")
        return 0
    # What writing cannot fix (an unknown table, an unclosed marker, a test count) still fails.
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
