"""The docs' results tables are generated from docs/results/ by scripts/docs_tables.py: a hand edit
of a table, a result stored without regenerating, or a hand-kept test count fails here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "docs_tables.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT
    )


def copy_docs(tmp_path: Path) -> Path:
    for name in ("README.md", "CHANGELOG.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return tmp_path


def test_every_table_matches_its_stored_result():
    r = run("--check")
    assert r.returncode == 0, r.stderr


def test_the_docs_have_generated_tables():
    assert "<!-- table:quick-pivot -->" in (ROOT / "README.md").read_text()
    assert "<!-- table:quick -->" in (ROOT / "docs" / "bench.md").read_text()


def test_a_hand_edit_of_a_table_fails_and_regenerating_fixes_it(tmp_path):
    root = copy_docs(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    start = text.index("<!-- table:quick-pivot -->")
    row = text.index("| `none` |", start)
    edited = text[:row] + "| `none` | 0.999 ± 0 |" + text[text.index("\n", row) :]
    readme.write_text(edited)
    r = run("--root", str(root), "--check")
    assert r.returncode == 1
    assert "README.md: table:quick-pivot" in r.stderr
    assert run("--root", str(root)).returncode == 0
    assert readme.read_text() == text
    assert run("--root", str(root), "--check").returncode == 0


def test_a_hand_kept_test_count_fails(tmp_path):
    root = copy_docs(tmp_path)
    doc = root / "docs" / "reliability.md"
    doc.write_text(doc.read_text() + "\nCI runs 999 tests.\n")
    r = run("--root", str(root), "--check")
    assert r.returncode == 1
    assert "hand-kept test count" in r.stderr


def test_an_unknown_or_unclosed_table_fails(tmp_path):
    root = copy_docs(tmp_path)
    doc = root / "docs" / "bench.md"
    doc.write_text(
        doc.read_text() + "\n<!-- table:nope -->\n<!-- /table:nope -->\n<!-- table:quick -->\n"
    )
    r = run("--root", str(root), "--check")
    assert r.returncode == 1
    assert "unknown table:nope" in r.stderr
    assert "table:quick has no closing marker" in r.stderr


def test_a_broken_link_fails(tmp_path):
    root = copy_docs(tmp_path)
    readme = root / "README.md"
    readme.write_text(
        readme.read_text() + "\n[gone](docs/gone.md) [no anchor](docs/bench.md#gone)\n"
    )
    r = run("--root", str(root), "--check")
    assert r.returncode == 1
    assert "docs/gone.md does not exist" in r.stderr
    assert "no heading #gone in docs/bench.md" in r.stderr


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_tables", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["docs_tables"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


SUMMARY_HEAD = "task,model,optimizer,lr,options,mitigation,runs,diverged,{extra}metric_mean,metric_std,reached_target,steps_to_target,guard_share,clipped_per_run,skipped_per_run"


def summary_csv(tmp_path: Path, with_did_not_learn: bool) -> Path:
    extra = "did_not_learn," if with_did_not_learn else ""
    dnl = "2," if with_did_not_learn else ""
    path = tmp_path / "summary.csv"
    path.write_text(
        SUMMARY_HEAD.format(extra=extra)
        + f"\ndigits,mlp,sgd,0.3,,none,3,1,{dnl}0.1,0.0,0,,0.0,0.0,0.0\n"
    )
    return path


def test_the_tables_count_diverged_and_did_not_learn_apart(tmp_path):
    dt = load_script()
    [r] = dt.read_summary(summary_csv(tmp_path, with_did_not_learn=True))
    assert (r["diverged"], r["did_not_learn"]) == (1, 2)
    long = dt.bench_long([r])
    assert "| diverged | did not learn |" in long and "| 1/3 | 2/3 |" in long
    assert dt.with_divergence(r, "0.100") == "0.100 (div 1/3, no-learn 2/3)"
    assert dt.fault_cell({**r, "nonfinite_weights": 1}) == "0.100 (NaN 1/3, no-learn 2/3)"


def test_a_summary_stored_before_the_split_shows_no_did_not_learn_count(tmp_path):
    """An older summary.csv has no did_not_learn column: "-" (not recorded), never a made-up 0."""
    dt = load_script()
    [r] = dt.read_summary(summary_csv(tmp_path, with_did_not_learn=False))
    assert "did_not_learn" not in r
    assert "| 1/3 | - |" in dt.bench_long([r])
    assert dt.with_divergence(r, "0.100") == "0.100 (div 1/3)"


def test_every_stored_bench_summary_has_the_split():
    """The stored results were summarized with outcomes: diverged and did not learn apart."""
    dt = load_script()
    for name in ("quick", "faults", "keras", "advise-sweep"):
        rows = dt.read_summary(ROOT / "docs" / "results" / f"{name}.csv")
        assert all("did_not_learn" in r for r in rows), name


def test_the_stability_table_applies_the_promise():
    dt = load_script()

    def row(mitigation, score, lr=0.1, faults="none", diverged=0, task="digits"):
        return {
            "task": task, "model": "mlp", "optimizer": "sgd", "lr": lr, "faults": faults,
            "mitigation": mitigation, "runs": 5, "diverged": diverged, "did_not_learn": 0,
            "score_mean": score, "score_se": 0.01,
        }  # fmt: skip

    rows = [
        # unguarded diverges: the default against the best static clip (0.95)
        row("none", 0.1, diverged=5), row("default", 0.948), row("clip_norm:1.0", 0.95),
        row("clip_norm:4.0", 0.5),
        # unguarded trains: the default against it
        row("none", 0.96, lr=0.01), row("default", 0.94, lr=0.01), row("clip_norm:1.0", 0.9, lr=0.01),
        # a fault: against the clean default (0.948 at lr 0.1)
        row("none", 0.1, faults="spike", diverged=5), row("default", 0.94, faults="spike"),
    ]  # fmt: skip
    lines = [ln for ln in dt.stability(rows).splitlines() if ln.startswith("| digits")]
    assert len(lines) == 3
    diverges, trains, fault = lines
    assert "diverges" in diverges and "-0.002 vs best static clip" in diverges
    assert diverges.endswith("| yes |") and "`clip_norm:1.0`" in diverges
    assert "trains" in trains and "-0.020 vs none" in trains and trains.endswith("| **no** |")
    assert "faults" in fault and "-0.008 vs clean `default`" in fault and fault.endswith("| yes |")
    # A default that diverges where unguarded does fails however close its mean.
    rows[1] = row("default", 0.95, diverged=1)
    assert dt.stability(rows).splitlines()[2].endswith("| **no** |")
