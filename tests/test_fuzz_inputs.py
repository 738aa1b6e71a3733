"""Bad input always gets the project's own clear error: property tests over the policy-spec parser
and the TOML grid loader (with every config resolved, as the bench does before any run), and the
CLI exits 2 with one readable line and no traceback on bad arguments and files."""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard import available_policies, parse_spec
from gradguard.bench.config import load_toml_grid, resolve
from gradguard.cli import main
from gradguard.errors import GradGuardError

POLICIES = list(available_policies())
KEYS = [
    "max_norm",
    "alpha",
    "z_thresh",
    "warmup",
    "percentile",
    "history",
    "window",
    "every",
    "to",
    "factor",
    "clipping",
    "events",
    "x",
    "",
]
VALUES = [
    "1",
    "0",
    "-1",
    "2.5",
    "1e400",
    "nan",
    "inf",
    "abc",
    "",
    "True",
    "memory",
    "disk",
    "0.97",
    "99",
    "1" * 40,
    "é",
]


@st.composite
def near_miss_specs(draw) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([*POLICIES, "default", "none", "clipnorm", ""]))
        opts = draw(st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)), max_size=3))
        body = ",".join(
            draw(st.sampled_from(["{}={}", "{}", "{}=={}", "{}:{}"])).format(k, v) for k, v in opts
        )
        parts.append(name + (":" + body if body or draw(st.booleans()) else ""))
    return draw(st.sampled_from(["+", "++", " + ", ","])).join(parts)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), near_miss_specs()))
def test_policy_specs_parse_or_raise_the_projects_error(spec):
    try:
        chain = parse_spec(spec)
    except GradGuardError as e:
        assert str(e).strip()
    else:
        # What parsed re-parses to the same chain from its own spec strings.
        again = parse_spec("+".join(p.spec() for p in chain)) if chain else []
        assert [p.spec() for p in again] == [p.spec() for p in chain]


TOML_VALUES = st.one_of(
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.booleans(),
    st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=6), st.floats(-1, 1)), max_size=3),
)
FIELDS = [
    "task",
    "model",
    "optimizer",
    "lr",
    "mitigation",
    "seed",
    "steps",
    "batch_size",
    "faults",
    "task_options",
    "model_options",
    "nope",
]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            "nan"
            if v != v
            else ("inf" if v == float("inf") else "-inf" if v == -float("inf") else repr(v))
        )
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


@st.composite
def toml_grids(draw) -> str:
    base = draw(st.dictionaries(st.sampled_from(FIELDS), TOML_VALUES, max_size=3))
    grid = draw(st.dictionaries(st.sampled_from(FIELDS), TOML_VALUES, max_size=3))
    lines = []
    for table, items in (("base", base), ("grid", grid)):
        if items or draw(st.booleans()):
            lines.append(f"[{draw(st.sampled_from([table, table, 'extra']))}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in items.items()]
    return "\n".join(lines)


def _load_and_resolve(content: bytes) -> None:
    fd, path = tempfile.mkstemp(suffix=".toml")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        for cfg in load_toml_grid(path)[:20]:
            resolve(cfg)
    finally:
        os.unlink(path)


@settings(max_examples=300, deadline=None)
@given(st.one_of(toml_grids().map(str.encode), st.text().map(str.encode), st.binary(max_size=64)))
def test_toml_grids_load_or_raise_the_projects_error(content):
    try:
        _load_and_resolve(content)
    except GradGuardError as e:
        assert str(e).strip()


def _cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exit
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        [],
        ["bench", "--nope"],
        ["bench", "--grid", "missing.toml"],
        ["bench", "--grid", "."],
        ["bench", "--lr", "-1"],
        ["bench", "--lr", "abc"],
        ["bench", "--mitigation", "zclip:alpha=2"],
        ["bench", "--suite", "nope"],
        ["bench", "--faults", "nan:p=-1"],
        ["check", "clip_norm:max_norm=abc"],
        ["check", "zclip:nope=1"],
        ["report", "/nonexistent/run"],
        ["train", "--steps", "0"],
        ["train", "--task", "nope"],
        ["train", "--faults", "meteor"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary.toml").write_bytes(b"\x00\xff\xfe")
    code, err = _cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, err)
    assert "Traceback" not in err
    assert len(lines) <= 2 and lines[-1].startswith(("gradguard: error:", "gradguard")), err


def test_cli_binary_grid_file_exits_2(capsys, tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\x00\xff\xfe\x00garbage")
    code, err = _cli(["bench", "--grid", str(path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "Traceback" not in err and "gradguard: error:" in err
    assert not (tmp_path / "o").exists()
