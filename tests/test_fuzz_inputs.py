"""Bad input always gets the project's own clear error, never an unhandled exception.

Property tests over the three ways input comes in: policy specs (arbitrary text, and near misses
generated from the grammar with the registry's real parameter names), TOML grid files (arbitrary
bytes, and well-formed TOML with wrong types, unknown names and values out of range; every config
resolved, as the bench does before any run) and the CLI's arguments (each bad one exits 2 with one
line on stderr, and ``bench --grid`` refuses a bad grid before any run starts).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradguard import available_policies, parse_spec
from gradguard.bench import parallel, runner, train
from gradguard.bench.config import MAX_GRID_RUNS, load_toml_grid, resolve
from gradguard.cli import main
from gradguard.errors import ConfigError, GradGuardError, SpecError
from gradguard.policies.registry import _parameters, policy_class

POLICIES = available_policies()
#: Each policy's parameters: (name, annotation, default), from the registry (so new ones are fuzzed).
PARAMS = {
    name: [
        (p.name, typing.get_type_hints(policy_class(name).__init__).get(p.name, str), p.default)
        for p in _parameters(policy_class(name))
    ]
    for name in POLICIES
}
# Numbers a user might type, and the ones that break parsers: NaN, infinities, huge, past 2**63.
ODD_NUMBERS = ["nan", "inf", "-inf", "1e400", "-0", "-1", "0", "1" * 40, "9" * 400, "1e30"]
ODD_NUMBERS += ["9223372036854775808", "0x10", "1_000", "١٢", "½", "", " ", "none", "abc", "é"]


# ----- policy specs -------------------------------------------------------------------------------
def _valid_value(hint, default) -> st.SearchStrategy[str]:
    """Values of the parameter's type, near its default (mostly valid)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(hint))
    if hint is bool:
        return st.sampled_from(["true", "false", "yes", "off", "1", "0"])
    if origin is tuple:
        word = st.text(alphabet="abc_*?.0123456789", min_size=1, max_size=5)
        return st.lists(word, max_size=3).map("|".join)
    if hint in (str, str | None):
        return st.just("none") if default is None else st.just(str(default))
    if int in typing.get_args(hint) or hint is int:
        base = default if isinstance(default, int) else 100
        return st.integers(base, base * 4 + 4).map(str)
    # floats: the default scaled; x 1e17 and up prints as 1e+17, the chain's '+' inside a number
    base = default if isinstance(default, (int, float)) else 1.0
    scale = st.sampled_from([0.5, 0.9, 1.0, 1.5, 1e17, 1e20, 3.5e300])
    big = st.sampled_from(["1" + "0" * 17, "25" + "0" * 20])  # parse as 1e17, print as 1e+17
    return st.one_of(st.just(repr(float(base))), scale.map(lambda s: repr(base * s)), big)


def _any_value(hint, default) -> st.SearchStrategy[str]:
    return st.one_of(
        _valid_value(hint, default),
        st.sampled_from(ODD_NUMBERS),
        st.integers(-(10**30), 10**30).map(str),
        st.floats().map(repr),
        st.text(alphabet=st.characters(blacklist_characters="+,"), max_size=6),
    )


@st.composite
def policy_parts(draw, value=_valid_value) -> str:
    """``name`` or ``name:v,key=v,...`` with the policy's real parameters, in any order."""
    name = draw(st.sampled_from(POLICIES))
    params = PARAMS[name]
    if not params:
        return name
    chosen = draw(st.lists(st.sampled_from(params), max_size=len(params), unique_by=lambda p: p[0]))
    items = [f"{k}={draw(value(hint, default))}" for k, hint, default in chosen]
    if chosen and chosen[0][0] == params[0][0] and draw(st.booleans()):
        items[0] = items[0].partition("=")[2]  # the first parameter, given without its key
    return name + (":" + ",".join(items) if items else "")


@st.composite
def near_miss_specs(draw) -> str:
    """A spec from the grammar, then up to three edits: a separator dropped or doubled, an unknown
    option, an empty part, unicode, a NUL, a very long number."""
    spec = "+".join(draw(st.lists(policy_parts(value=_any_value), min_size=1, max_size=3)))
    for _ in range(draw(st.integers(0, 3))):
        seps = [i for i, c in enumerate(spec) if c in "+:,=|"]
        edit = draw(st.sampled_from(["drop", "double", "insert"]))
        if edit != "insert" and seps:
            i = draw(st.sampled_from(seps))
            spec = spec[:i] + (spec[i] * 2 if edit == "double" else "") + spec[i + 1 :]
        else:
            i = draw(st.integers(0, len(spec)))
            junk = [",nope=1", ",=1", "+", "++", ":", "=", ",", "+default", "+none", "+clipnorm"]
            junk += ["é", "\u202e", "\x00", " ", "9" * 80, "1e+400", "|"]
            spec = spec[:i] + draw(st.sampled_from(junk)) + spec[i:]
    return spec


def _parse_or_spec_error(spec) -> list | None:
    """The chain, or None after checking the error is the project's, with a message."""
    try:
        return parse_spec(spec)
    except GradGuardError as e:
        assert str(e).strip(), f"empty message for {spec!r}"
        return None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), near_miss_specs()))
def test_policy_specs_parse_or_raise_the_projects_error(spec):
    """Any text, and every near miss, gives a chain or a SpecError with a message: nothing else."""
    _parse_or_spec_error(spec)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none(), st.floats()), max_size=3))
def test_policy_lists_of_anything_raise_the_projects_error(items):
    _parse_or_spec_error(items)


@settings(max_examples=200, deadline=None)
@given(st.lists(policy_parts(), min_size=1, max_size=3).map("+".join))
def test_valid_specs_round_trip(spec):
    """What parses, re-parses from its policies' own spec() strings to the same chain."""
    chain = _parse_or_spec_error(spec)
    if chain is None:  # a value near the default can still break a constraint between two
        return
    specs = [p.spec() for p in chain]
    assert [p.spec() for p in parse_spec("+".join(specs))] == specs
    assert [p.spec() for p in parse_spec(specs)] == specs


# ----- TOML grids ---------------------------------------------------------------------------------
def _toml(v) -> str:
    """A Python value as a TOML value (inline tables for dicts)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else {math.inf: "inf", -math.inf: "-inf"}.get(v, repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        esc = v.encode("unicode_escape").decode("ascii").replace('"', '\\"')
        return f'"{esc}"'
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(x)}' for k, x in v.items()) + "}"
    return "[" + ", ".join(_toml(x) for x in v) + "]"


# Names the loader knows and near misses; values of the right type and of every wrong one.
NAMES = {
    "task": ["digits", "adding", "temporal_order", "imagenet", "", "DIGITS"],
    "model": ["mlp", "lstm", "rnn", "cnn", "resnet51", "mlp "],
    "optimizer": ["sgd", "adam", "momentum", "lion"],
    "mitigation": ["none", "zclip", "zclip:alpha=2", "clipnorm:1", "dropout:1.5", "leaky_relu:-1"],
    "faults": ["none", "nan:p=0.01", "meteor", "nan:p=-1", "spike:scale=1e4,p=0.02"],
    "schedule": ["constant", "cosine", "linear"],
}
SCALARS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.booleans(),
    st.text(max_size=6),
    st.sampled_from([0, -1, 1, 0.0, -0.1, 1e-3, 2**64 - 1]),
)
ANY_VALUE = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(["depth", "width", "T", "x"]), SCALARS, max_size=2),
)
OPTIONS = st.dictionaries(
    st.sampled_from(["depth", "width", "hidden", "T", "n_train", "activation", "nope"]),
    st.one_of(st.integers(-2, 8), st.sampled_from(["relu", "x", 1.5, True])),
    max_size=2,
)


def _field_value(field: str) -> st.SearchStrategy:
    if field in NAMES:
        return st.one_of(st.sampled_from(NAMES[field]), ANY_VALUE)
    if field in ("task_options", "model_options"):
        return st.one_of(OPTIONS, ANY_VALUE)
    return st.one_of(st.sampled_from([0.1, 1, 0, -1, 3, 10**20, -(10**20)]), ANY_VALUE)


FIELDS = [*NAMES, "lr", "seed", "steps", "batch_size", "warmup", "eval_every", "momentum"]
FIELDS += ["task_options", "model_options", "nope"]


@st.composite
def toml_grids(draw) -> str:
    """[base] settings and [grid] axes, each field (or an unknown one) with any value, an axis a
    list or a scalar; now and then an axis too long for a grid, or a table that is not base/grid."""
    lines = []
    for table in ("base", "grid"):
        keys = draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True))
        if not keys and draw(st.booleans()):
            continue
        lines.append(f"[{draw(st.sampled_from([table, table, table, 'extra']))}]")
        for k in keys:
            v = draw(_field_value(k))
            if table == "grid" and draw(st.booleans()):
                v = draw(st.lists(_field_value(k), max_size=3))
            lines.append(f"{k} = {_toml(v)}")
    if draw(st.integers(0, 9)) == 0:  # past MAX_GRID_RUNS: refused before the product is built
        lines += [
            "[grid]",
            f"seed = {list(range(400))}",
            f"lr = {[0.01 * i + 0.01 for i in range(400)]}",
        ]
    return "\n".join(lines) + "\n"


def _write(content: bytes) -> str:
    fd, path = tempfile.mkstemp(suffix=".toml")
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    return path


def _load_and_resolve(content: bytes) -> list | None:
    """Every config of the grid, resolved; None after checking the error is the project's."""
    path = _write(content)
    try:
        configs = load_toml_grid(path)
        for cfg in configs:
            resolve(cfg)
        return configs
    except GradGuardError as e:
        assert str(e).strip(), f"empty message for {content!r}"
        return None
    finally:
        os.unlink(path)


@settings(max_examples=250, deadline=None)
@given(
    st.one_of(
        toml_grids().map(str.encode),
        st.text().map(str.encode),
        st.binary(max_size=64),
        toml_grids().map(lambda t: t.encode("utf-16")),  # not UTF-8
        toml_grids().map(lambda t: b"\xff" + t.encode()),
    )
)
def test_toml_grids_load_or_raise_the_projects_error(content):
    """load_toml_grid, then resolve() of each config: all succeed, or a ConfigError with a message."""
    _load_and_resolve(content)


class _Ran(Exception):
    """Raised in place of a training run: the arguments got past every check."""


def _no_runs(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace everything that trains by a recorder that raises _Ran; return its calls."""
    calls = []

    def ran(*args, **kwargs):
        calls.append(args)
        raise _Ran

    monkeypatch.setattr(runner, "run_grid", ran)
    monkeypatch.setattr(train, "train_run", ran)
    monkeypatch.setattr(parallel, "spawn", ran)
    return calls


def _cli(argv) -> tuple[int | str | None, str]:
    """main(argv)'s exit status (argparse's SystemExit included) and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own exit (usage error, --help, --version)
            code = e.code
    return code, err.getvalue()


def _assert_one_error_line(code, err: str, argv) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("gradguard: error: "), (argv, err)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(toml_grids())
def test_bench_grid_is_validated_before_any_run(tmp_path_factory, text):
    """`gradguard bench --grid FILE`: a grid load_toml_grid refuses exits 2 with one line and no
    run started, no results folder made; a grid it accepts reaches the runner whole, every config
    resolving."""
    out = tmp_path_factory.mktemp("bench") / "out"
    path = _write(text.encode())
    try:
        with pytest.MonkeyPatch.context() as mp:
            calls = _no_runs(mp)
            accepted = _load_and_resolve(text.encode())
            try:
                code, err = _cli(["bench", "--grid", path, "--out", str(out), "--no-progress"])
            except _Ran:
                assert accepted is not None
                ((configs, *_),) = calls
                assert configs == accepted
                return
    finally:
        os.unlink(path)
    assert accepted is None and not calls and not out.exists()
    _assert_one_error_line(code, err, text)


# ----- the CLI ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        [],
        ["bench", "--nope"],
        ["bench", "--grid"],
        ["bench", "--grid", "missing.toml"],
        ["bench", "--grid", "."],
        ["bench", "--grid", "binary.toml"],
        ["bench", "--grid", "utf16.toml"],
        ["bench", "--grid", "bad_options.toml"],
        ["bench", "--grid", "a\x00b.toml"],
        ["bench", "--grid", "empty_axis.toml", "--lr", "0.1"],
        ["bench", "--lr", "-1"],
        ["bench", "--lr", "abc"],
        ["bench", "--lr", "nan"],
        ["bench", "--mitigation", "zclip:alpha=2"],
        ["bench", "--mitigation", "skip_spike:window=1e30"],
        ["bench", "--suite", "nope"],
        ["bench", "--suite", "quick", "--grid", "empty_axis.toml"],
        ["bench", "--faults", "nan:p=-1"],
        ["bench", "--seed", "-1"],
        ["bench", "--seeds", "0"],
        ["bench", "--seeds", str(10**12)],
        ["bench", "--seed", *map(str, range(1000)), "--lr", *map(str, range(1, 200))],
        ["bench", "--out", "file.txt"],
        ["bench", "--out", "file.txt/sub"],
        ["bench", "--out", "a\x00b"],
        ["bench", "--executor", "nope"],
        ["check"],
        ["check", ""],
        ["check", "clip_norm:max_norm=abc"],
        ["check", "zclip:nope=1"],
        ["check", "skip_spike:window=1e30"],
        ["check", "clip_norm:1e+"],
        ["policies", "extra"],
        ["report"],
        ["report", "/nonexistent/run"],
        ["report", "file.txt"],
        ["report", "run_with_folder"],
        ["report", "run_with_folder", "--out", "file.txt"],
        ["train", "--steps", "0"],
        ["train", "--steps", "x"],
        ["train", "--task", "nope"],
        ["train", "--seed", "-1"],
        ["train", "--lr", "inf"],
        ["train", "--nproc", "0"],
        ["train", "--faults", "meteor"],
        ["train", "--out", "file.txt/sub"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = _no_runs(monkeypatch)
    (tmp_path / "binary.toml").write_bytes(b"\x00\xff\xfe\x00garbage")
    (tmp_path / "utf16.toml").write_bytes("[grid]\nlr = [0.1]\n".encode("utf-16"))
    (tmp_path / "bad_options.toml").write_text("[base.model_options]\ndepth = 'x'\n")
    (tmp_path / "empty_axis.toml").write_text("[grid]\nseed = []\n")
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "run_with_folder" / "telemetry.jsonl").mkdir(parents=True)
    code, err = _cli(argv)
    _assert_one_error_line(code, err, argv)
    assert not calls


# Real flags and values of every subcommand, and garbage, for random command lines.
COMMANDS = ["check", "policies", "report", "bench", "train", "frobnicate", "--help", "--version"]
ARGV_WORDS = [*COMMANDS, "--suite", "quick", "full", "nope", "--grid", "missing.toml", ".", "--out"]
ARGV_WORDS += ["--lr", "0.1", "-1", "nan", "1e400", "--mitigation", "--policy", "zclip"]
ARGV_WORDS += ["zclip:alpha=2", "clip_norm:1e+20", "default", "none", "--faults", "nan:p=0.01"]
ARGV_WORDS += ["meteor", "--seed", "--seeds", "0", "3", "--steps", "--batch-size", "--task"]
ARGV_WORDS += ["digits", "adding", "--model", "mlp", "lstm", "--optimizer", "adam", "lion"]
ARGV_WORDS += ["--nproc", "2", "--workers", "--executor", "ray", "--telemetry", "--no-progress"]
ARGV_WORDS += ["-", "--", "", "é", "\x00", "/nonexistent"]


@settings(max_examples=120, deadline=None)
@given(
    st.builds(
        lambda cmd, rest: [cmd, *rest],
        st.sampled_from(COMMANDS),
        st.lists(st.sampled_from(ARGV_WORDS), max_size=5),
    )
)
def test_random_command_lines_never_raise(tmp_path_factory, argv):
    """Any command line exits 0, 1 or 2 (an error: one line, no traceback), or gets past every
    check to the point where training would start (replaced here by a sentinel)."""
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cli"))
    try:
        with pytest.MonkeyPatch.context() as mp:
            _no_runs(mp)
            code, err = _cli(argv)
    except _Ran:
        return
    finally:
        os.chdir(here)
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err
    if code == 2:
        _assert_one_error_line(code, err, argv)


# ----- regressions the properties found -----------------------------------------------------------
def test_bench_out_that_is_a_file_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    """Was FileExistsError from the runner's mkdir, after the grid was expanded."""
    calls = _no_runs(monkeypatch)
    (tmp_path / "results").write_text("")
    assert main(["bench", "--out", str(tmp_path / "results")]) == 2
    assert capsys.readouterr().err.strip().endswith("is a file, not a folder")
    assert not calls


def test_train_out_under_a_file_is_refused_before_the_progress_bar(tmp_path, capsys, monkeypatch):
    """Was a half-drawn progress bar on stderr above the error line."""
    _no_runs(monkeypatch)
    (tmp_path / "f").write_text("")
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "f" / "run")]) == 2
    assert capsys.readouterr().err == (
        f"gradguard: error: --out {tmp_path / 'f' / 'run'}: {tmp_path / 'f'} is a file, not a folder\n"
    )


def test_report_of_a_folder_named_like_the_telemetry_file(tmp_path, capsys):
    """Was IsADirectoryError from open_run."""
    (tmp_path / "telemetry.jsonl").mkdir()
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("gradguard: error: Is a directory: ")


def test_huge_seeds_flag_is_refused_before_the_list_is_built(capsys):
    """Was list(range(10**12)): memory and time without end, before expand_grid's size check."""
    assert main(["bench", "--seeds", str(10**12)]) == 2
    assert f"--seeds must be in [1, {MAX_GRID_RUNS}]" in capsys.readouterr().err


def test_grid_path_with_a_nul_character(tmp_path):
    """Was ValueError('embedded null byte') from read_text."""
    with pytest.raises(GradGuardError, match="cannot read grid file"):
        load_toml_grid(str(tmp_path) + "/a\x00b.toml")


def test_os_error_from_a_named_path_is_one_line(tmp_path, capsys, monkeypatch):
    """An OSError (permission denied, disk full) is an error line, not a traceback."""

    def refuse(*_a, **_k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(runner, "run_grid", refuse)
    assert main(["bench", "--out", str(tmp_path / "out"), "--seeds", "1"]) == 2
    assert capsys.readouterr().err == f"gradguard: error: Permission denied: {tmp_path / 'out'}\n"


def test_grid_file_with_a_bom_loads(tmp_path):
    """Some Windows editors start UTF-8 files with a byte-order mark; TOML parsers refuse it."""
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbf[grid]\nlr = [0.1, 0.2]\n")
    assert [c.lr for c in load_toml_grid(p)] == [0.1, 0.2]


def test_empty_grid_file_is_refused_not_run_as_defaults(tmp_path):
    p = tmp_path / "empty.toml"
    p.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"is empty; give a \[base\]"):
        load_toml_grid(p)


@pytest.mark.parametrize("spec", ["autoclip:history=1000000000000", "autoclip:max_history=10**9"])
def test_autoclip_history_that_cannot_fit_is_refused_at_parse(spec):
    spec = spec.replace("10**9", str(10**9))
    with pytest.raises(SpecError, match="limit is 10,000,000"):
        parse_spec(spec)
    assert parse_spec("autoclip:history=1000")[0].capacity == 1000
