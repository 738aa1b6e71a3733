"""How often the diagnosis is right: the labelled corpus (``tests/diagnose/corpus.py``) trained
over its strengths and seeds, every run diagnosed, and the confusion table printed.

What is measured
    Every case of the corpus is one known cause injected into a small model (or a healthy control)
    at each of its strengths, over ``--seeds`` seeds: each run is trained with a Guard recording
    telemetry, read back and diagnosed by the registered rules. A case names the causes the
    diagnosis must find (``expect``) and those it may also find (``allow``: true effects of the
    injected cause, each with its reason in the corpus). Per cause:

    * recall: among the runs whose case expects it, the share where it was found;
    * precision: among the runs where it was found, the share whose case expects or allows it.

    Targets (issue 16): precision >= 0.95 and recall >= 0.9 for every cause. The confusion table
    gives, per case, how many runs found each cause.

Run
    python benchmarks/bench_diagnosis.py                   # every case, 3 seeds: ~3 min, 2 cores
    python benchmarks/bench_diagnosis.py --seeds 5 --workers 2 --out /tmp/diag
    python benchmarks/bench_diagnosis.py --cases lr/ attention --seeds 1
    python benchmarks/bench_diagnosis.py --out DIR --table  # re-print from DIR's stored runs
    python benchmarks/bench_diagnosis.py --off-grid          # the cases at other strengths
    python benchmarks/bench_diagnosis.py --across            # the causes on other models

Runs are stored one JSON line each in ``OUT/runs.jsonl`` (keyed by case, strength and seed), so an
interrupted benchmark resumes where it stopped; ``--fresh`` recomputes. Each run trains with one
CPU thread, so its figures do not depend on the machine's core count.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

PRECISION_TARGET = 0.95
RECALL_TARGET = 0.90


def _key(case: str, strength: Any, seed: int) -> str:
    return f"{case}|{strength!r}|{seed}"


def run_one(case_name: str, strength: Any, seed: int) -> dict[str, Any]:
    """Train, record and diagnose one run (in a worker process)."""
    import torch

    from tests.diagnose import corpus

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    case = corpus.BY_NAME[case_name]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        measured = corpus.make(case, strength, seed, Path(d))
        found = sorted(corpus.diagnosed(Path(d)))
    return {
        "key": _key(case_name, strength, seed),
        "case": case_name,
        "strength": strength,
        "seed": seed,
        "found": found,
        "truth": measured,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _load(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption: that run is recomputed
        out[row["key"]] = row
    return out


def scores(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per cause: runs expecting it, found in them, runs finding it, right among those."""
    from tests.diagnose import corpus

    out: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"expected": 0, "recalled": 0, "found": 0, "right": 0}
    )
    for r in rows:
        case = corpus.BY_NAME[r["case"]]
        found = set(r["found"])
        must = corpus.expected(case, r.get("truth"))
        ok = must | corpus.allowed(case, r.get("truth"))
        for cause in must:
            out[cause]["expected"] += 1
            out[cause]["recalled"] += cause in found
        for cause in found:
            out[cause]["found"] += 1
            out[cause]["right"] += cause in ok
    for s in out.values():
        s["recall"] = s["recalled"] / s["expected"] if s["expected"] else None
        s["precision"] = s["right"] / s["found"] if s["found"] else None
    return dict(out)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def report(rows: list[dict[str, Any]]) -> tuple[str, bool]:
    """The confusion table and the per-cause scores, and whether every target holds."""
    from tests.diagnose import corpus

    causes = sorted(
        {c for r in rows for c in r["found"]} | {c for k in _all_cases() for c in k.expect}
    )
    lines = ["Confusion: runs of each case (rows) in which each cause was found (columns).", ""]
    short = {c: c[:10] for c in causes}
    lines.append(f"{'case':28s} {'runs':>4s} " + " ".join(f"{short[c]:>10s}" for c in causes))
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_case[r["case"]].append(r)
    for case in _all_cases():
        rs = by_case.get(case.name)
        if not rs:
            continue
        n = Counter(c for r in rs for c in r["found"])
        cells = []
        for c in causes:
            mark = "*" if c in case.expect else ("+" if c in case.allow else " ")
            cells.append(f"{n.get(c, 0):>9d}{mark}")
        lines.append(f"{case.name:28s} {len(rs):>4d} " + " ".join(cells))
    lines += [
        "",
        "* expected, + allowed (a true effect of the cause; see the corpus); dead_units is also",
        f"allowed in any run whose trained model had >= {corpus.DEAD_TRUTH:.0%} of its ReLU units",
        "measured dead on the training inputs; a dead_relu/lr run whose trained model was",
        "measured non-finite must find lr_too_high (dead_units allowed: its units may have died",
        "before the NaN); recurrent_explosion is expected of an rnn_radius run only where its",
        "vanilla RNN's recurrent radius measured (the larger of start and end) above "
        f"{corpus.RADIUS_TRUTH + corpus.RADIUS_BAND:g},",
        f"and allowed in any run above {corpus.RADIUS_TRUTH - corpus.RADIUS_BAND:g} (an init "
        "scale does not put every seed past 1)",
        "",
    ]
    lines.append(f"{'cause':24s} {'recall':>8s} {'precision':>10s}   (runs expecting / finding)")
    ok = True
    for cause, s in sorted(scores(rows).items()):
        good = (s["recall"] is None or s["recall"] >= RECALL_TARGET) and (
            s["precision"] is None or s["precision"] >= PRECISION_TARGET
        )
        ok &= good
        lines.append(
            f"{cause:24s} {_fmt(s['recall']):>8s} {_fmt(s['precision']):>10s}   "
            f"({s['expected']} / {s['found']}) {'PASS' if good else 'FAIL'}"
        )
    wrong = [r for r in rows if _wrong(r)]
    lines += ["", f"runs: {len(rows)}; with a missed or a false cause: {len(wrong)}"]
    for r in wrong:
        dead = (r.get("truth") or {}).get("dead")
        shown = "" if dead is None else f" (measured dead share {dead:.2f})"
        lines.append(f"  {r['key']}: found {r['found']}{shown}")
    for case in _all_cases():
        rs = by_case.get(case.name, [])
        if case.if_nonfinite is not None and rs:
            n = sum((r.get("truth") or {}).get("finite") is False for r in rs)
            must = ", ".join(sorted(case.if_nonfinite))
            lines.append(
                f"  {case.name}: {n} of {len(rs)} runs ended with non-finite weights (judged on "
                f"{must})"
            )
        if "recurrent_explosion" in case.expect and rs:
            radii = [(r.get("truth") or {}).get("radius") for r in rs]
            edge = corpus.RADIUS_TRUTH + corpus.RADIUS_BAND
            low = sum(x is not None and x <= edge for x in radii)
            lines.append(
                f"  {case.name}: {low} of {len(rs)} runs measured a recurrent radius <= "
                f"{edge:g} (recurrent_explosion not expected of them)"
            )
    lines.append(
        f"targets: precision >= {PRECISION_TARGET}, recall >= {RECALL_TARGET} per cause: "
        + ("PASS" if ok else "FAIL")
    )
    return "\n".join(lines), ok


def _all_cases() -> list[Any]:
    from tests.diagnose import corpus

    return [*corpus.CASES, *corpus.ACROSS]


def _wrong(r: dict[str, Any]) -> bool:
    from tests.diagnose import corpus

    j = corpus.judge(corpus.BY_NAME[r["case"]], set(r["found"]), r.get("truth"))
    return bool(j["missed"] or j["false"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cases", nargs="*", default=None, help="case name prefixes (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="folder for runs.jsonl (resumable)")
    ap.add_argument("--fresh", action="store_true", help="recompute stored runs")
    ap.add_argument("--table", action="store_true", help="only print the table from --out")
    ap.add_argument(
        "--off-grid",
        action="store_true",
        help="the cases at their other strengths (corpus.OFF_GRID) instead of their own",
    )
    ap.add_argument(
        "--across",
        action="store_true",
        help="the causes on other models and optimizers (corpus.ACROSS) instead of the corpus",
    )
    args = ap.parse_args(argv)
    from tests.diagnose import corpus

    if args.across and args.off_grid:
        ap.error("--across cases have one set of strengths: give --across or --off-grid")

    def strengths(case: Any) -> tuple[Any, ...]:
        return corpus.OFF_GRID[case.name] if args.off_grid else case.strengths

    out = args.out or Path(tempfile.mkdtemp(prefix="gradguard-diagnosis-"))
    out.mkdir(parents=True, exist_ok=True)
    store = out / "runs.jsonl"
    done = {} if args.fresh else _load(store)
    among = corpus.ACROSS if args.across else corpus.CASES
    cases = [c for c in among if not args.cases or any(c.name.startswith(p) for p in args.cases)]
    todo = [
        (c.name, s, seed)
        for c in cases
        for s in strengths(c)
        for seed in range(args.seeds)
        if _key(c.name, s, seed) not in done
    ]
    if not cases:
        ap.error(
            f"no case starts with {' or '.join(args.cases)}; cases: {', '.join(corpus.BY_NAME)}"
        )
    if args.seeds < 1 or args.workers < 1:
        ap.error("--seeds and --workers must be at least 1")
    t0 = time.perf_counter()
    if todo and not args.table:
        if args.fresh and store.exists():
            store.unlink()
        with open(store, "a") as f, ProcessPoolExecutor(args.workers) as pool:
            futures = [pool.submit(run_one, *t) for t in todo]
            for i, fut in enumerate(futures, 1):
                row = fut.result()
                done[row["key"]] = row
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"[{i}/{len(todo)}] {row['key']}: {row['found']}", file=sys.stderr)
    names = {c.name for c in cases}
    rows = [r for r in done.values() if r["case"] in names and r["seed"] < args.seeds]
    rows = [r for r in rows if r["strength"] in strengths(corpus.BY_NAME[r["case"]])]
    text, ok = report(rows)
    print(text)
    print(f"\n{len(todo)} runs trained in {time.perf_counter() - t0:.0f} s; stored in {store}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
