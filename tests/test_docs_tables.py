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
