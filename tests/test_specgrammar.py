"""The one spec grammar (:mod:`gradguard.specgrammar`): a chain splits at ``+`` but never inside a
number's exponent, values read as their annotated types, and numbers are written exactly, so that
every registered policy's ``spec()`` parses back to the same policy, whatever the magnitude of its
numbers (``1e+27``, ``1e-300``, ints past 2**53). The property tests are derandomized (the same
examples on every run) and pin the exponent cases with explicit examples."""

from __future__ import annotations

import ast
import sys
import typing
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gradguard.specgrammar as grammar
from gradguard import available_policies, parse_spec
from gradguard.errors import SpecError
from gradguard.policies.registry import _parameters, policy_class
from gradguard.specgrammar import Where, coerce, format_number, format_value, split_chain

from tests.helpers import slow_except

DETERMINISTIC = settings(derandomize=True, deadline=None, max_examples=60)

#: Floats of every magnitude: the whole float range, and mantissa x 10**exponent over all of it
#: (so exponents with '+' and with '-' come up on every run, not only when the draw is lucky).
FLOATS = st.floats(allow_nan=False, allow_infinity=False) | st.builds(
    lambda m, e: float(f"{m}e{e}"), st.integers(-9999, 9999), st.integers(-323, 308)
)
#: Ints of every size: past 2**53 (not exact as floats) and past 2**63.
INTS = st.integers() | st.integers(-(2**200), 2**200)


def _number_texts(value: float | int) -> list[str]:
    """The ways a user may write a number: the shortest exact form, and explicit exponents."""
    if isinstance(value, int):
        return [str(value), f"{value:e}", f"{value}.0"]
    return [repr(value), f"{value:.17e}", f"{value:.17E}", f"{value:g}"]


NUMBER_TEXT = st.one_of(FLOATS, INTS).flatmap(lambda v: st.sampled_from(_number_texts(v)))


# ----- the number formatter ------------------------------------------------------------------------
@DETERMINISTIC
@given(FLOATS)
@example(1e27)
@example(-1e27)
@example(1e-300)
@example(1e308)
@example(1.7976931348623157e308)
@example(5e-324)
@example(0.1)
@example(-0.0)
@example(1e16)
def test_every_float_is_written_exactly_and_survives_a_chain(x):
    text = format_number(x)
    assert float(text) == x and text == repr(x)
    assert split_chain(f"a:v={text}+b:w={text},u={text}|{text}") == [
        f"a:v={text}",
        f"b:w={text},u={text}|{text}",
    ]


@DETERMINISTIC
@given(INTS)
@example(2**53 + 1)
@example(-(2**63) - 1)
@example(10**40)
def test_every_int_is_written_exactly(n):
    assert int(format_number(n)) == n
    assert coerce(format_number(n), int, Where("p", "n", max_int=None)) == n


def test_the_formatter_writes_every_value_a_spec_holds():
    assert (
        format_number(1e27) == "1e+27" and format_number(3) == "3" and format_number(3.0) == "3.0"
    )
    assert format_value((1e-300, 2, "fc*")) == "1e-300|2|fc*"
    assert format_value(True) == "True" and format_value(None) == "None" and format_value(()) == ""
    with pytest.raises(TypeError):
        format_number(True)


# ----- splitting -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("a+b", ["a", "b"]),
        ("clip_norm:1e+20+zclip", ["clip_norm:1e+20", "zclip"]),
        ("clip_norm:2.5E+3+zclip", ["clip_norm:2.5E+3", "zclip"]),
        ("a:x=-1.e+5|.5e+2,y=1_0e+1+b", ["a:x=-1.e+5|.5e+2,y=1_0e+1", "b"]),
        ("a: 1e+5 +b", ["a: 1e+5 ", "b"]),
        ("a++b", ["a", "", "b"]),
        ("a+", ["a", ""]),
        ("clip_norm:1e+", ["clip_norm:1e", ""]),  # no digit after the '+': not an exponent
        ("a:x=fc1e+3", ["a:x=fc1e", "3"]),  # 'fc1e' is not a number
        ("a:x=1e5e+3", ["a:x=1e5e", "3"]),
        ("", [""]),
    ],
)
def test_a_chain_splits_at_plus_but_not_in_an_exponent(text, parts):
    assert split_chain(text) == parts


def test_a_term_splits_into_name_and_items():
    term = grammar.split_term(" zclip : 2.0, max_norm = 1e+5,=3 ")
    assert (term.name, term.colon) == ("zclip", True)
    assert [(i.key, i.value) for i in term.items] == [
        (None, " 2.0"),
        ("max_norm", " 1e+5"),
        ("", "3"),
    ]
    assert grammar.split_term("zclip").items == () and not grammar.split_term("zclip").colon
    assert grammar.split_term("zclip: ").items == ()


# ----- typed values --------------------------------------------------------------------------------
W = Where("zclip", "v")


@pytest.mark.parametrize(
    ("raw", "hint", "value"),
    [
        ("1e3", int, 1000),
        ("100.0", int, 100),
        ("9007199254740993", int, 9007199254740993),
        ("1_000", int, 1000),
        (" yes ", bool, True),
        ("OFF", bool, False),
        ("1e+27", float, 1e27),
        ("mean", Literal["adaptive_scaling", "mean"], "mean"),
        ("none", float | None, None),
        ("", int | None, None),
        ("2", float | None, 2.0),
        ("a| b|", tuple[str, ...], ("a", "b")),
        ("", tuple[str, ...], ()),
        ("3|1e+20", tuple[float, ...], (3.0, 1e20)),
    ],
)
def test_values_read_as_their_types(raw, hint, value):
    got = coerce(raw, hint, Where("zclip", "v", drop_empty_items=True))
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    ("raw", "hint", "message"),
    [
        ("abc", float, "zclip: v='abc' is not a number"),
        ("abc", int, "zclip: v='abc' is not an integer"),
        ("2.5", int, "zclip: v='2.5' is not an integer (2.5 is not a whole number)"),
        ("inf", int, "zclip: v='inf' is not an integer"),
        ("1e30", int, f"zclip: v='1e30' is too large (at most {sys.maxsize})"),
        ("maybe", bool, "zclip: v='maybe' is not a boolean (use true or false)"),
        ("median", Literal["adaptive_scaling", "mean"], "is not one of adaptive_scaling, mean"),
        ("x", float | None, "zclip: v='x' is not a number"),
        ("3||4", tuple[int, ...], "v='3||4' has an empty item; join values with single '|'"),
        ("x", dict, "zclip: parameter v cannot be set from a spec string"),
    ],
)
def test_bad_values_name_the_value_and_the_type(raw, hint, message):
    with pytest.raises(SpecError) as err:
        coerce(raw, hint, W)
    assert message in str(err.value)


def test_the_callers_error_type_and_note():
    class Mine(SpecError):
        pass

    with pytest.raises(Mine, match=r"^fault 'nan': p='x' is not a number; p is a probability$"):
        coerce("x", float, Where("fault 'nan'", "p", Mine, "; p is a probability"))


def test_the_grammar_is_a_leaf():
    """It imports nothing of gradguard but the errors (no torch, faults, keras, bench, ...)."""
    tree = ast.parse(Path(grammar.__file__).read_text())
    imported = {
        (node.level, node.module)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
    } | {(0, a.name) for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    gradguard_imports = {m for level, m in imported if level > 0 or m.startswith("gradguard")}
    assert gradguard_imports == {"errors"}
    assert not {m for _, m in imported if m.split(".")[0] in ("torch", "numpy", "keras")}


# ----- every policy's spec() round-trips, numbers of any magnitude ---------------------------------
def _numeric_params() -> list[tuple[str, str]]:
    out = []
    for name in available_policies():
        hints = typing.get_type_hints(policy_class(name).__init__)
        for p in _parameters(policy_class(name)):
            kinds = set(typing.get_args(hints.get(p.name))) | {hints.get(p.name)}
            if kinds & {int, float}:
                out.append((name, p.name))
    return out


NUMERIC_PARAMS = _numeric_params()
#: What a policy needs to be valid at all (clip_layerwise: a max_norm or a factor).
REQUIRED = {"clip_layerwise": {"factor": "3.0"}}


def test_every_numeric_policy_parameter_is_covered():
    assert {n for n, _ in NUMERIC_PARAMS} == set(available_policies()) - {"skip_nonfinite"}
    assert ("clip_norm", "max_norm") in NUMERIC_PARAMS and (
        "skip_spike",
        "window",
    ) in NUMERIC_PARAMS


# Fast: a float and an int parameter, both without a bound below sys.maxsize (skip_spike's window
# stops at 1e6: its large numbers are only refused); slow: the other policies' (the same grammar,
# each policy's own spec()).
@pytest.mark.parametrize(
    ("policy", "param"),
    slow_except(NUMERIC_PARAMS, ("clip_norm", "max_norm"), ("lr_backoff", "recover")),
)
@DETERMINISTIC
@given(NUMBER_TEXT)
@example("1e+27")
@example("1E+27")
@example("1e-300")
@example("-1e+308")
@example("1.7976931348623157e+308")
@example("5e-324")
@example("0.1")
@example(str(2**53 + 1))
@example(str(2**63 + 1))
@example("1e+3")
@example("2.5e+1")
def test_every_policy_spec_round_trips_numbers_of_any_magnitude(policy, param, text):
    values = {**REQUIRED.get(policy, {}), param: text}
    spec = f"{policy}:" + ",".join(f"{k}={v}" for k, v in values.items())
    # The same number without the exponent's '+' (1e+27 -> 1e27): no '+' to mistake for a join.
    reference = _parse_or_none(spec.replace("e+", "e").replace("E+", "E"))
    p = _parse_or_none(spec)
    if reference is None:  # out of the parameter's range: refused with the project's error
        assert p is None
        return
    assert p is not None and p.spec() == reference.spec() and p.params() == reference.params()
    (q,) = parse_spec(p.spec())
    assert q.spec() == p.spec() and q.params() == p.params()
    # ... and inside a chain, where a '+' joins policies
    chain = parse_spec(f"skip_nonfinite+{p.spec()}+skip_nonfinite")
    assert [c.name for c in chain] == ["skip_nonfinite", policy, "skip_nonfinite"]
    assert chain[1].spec() == p.spec()


def _parse_or_none(spec: str):
    try:
        (p,) = parse_spec(spec)
    except SpecError:
        return None
    return p


@pytest.mark.parametrize(
    ("spec", "attr", "value"),
    [
        ("clip_norm:1e+27", "max_norm", 1e27),
        ("clip_value:limit=1e-300", "limit", 1e-300),
        ("zclip:eps=1e-300,max_norm=1e+300", "max_norm", 1e300),
        ("lr_backoff:recover=9007199254740993", "recover", 9007199254740993),
        ("lr_backoff:min_scale=1e-300", "min_scale", 1e-300),
    ],
)
def test_large_and_small_policy_numbers_are_written_exactly(spec, attr, value):
    (p,) = parse_spec(spec)
    assert getattr(p, attr) == value
    assert format_value(value) in p.spec()
    (q,) = parse_spec(p.spec())
    assert getattr(q, attr) == value and q.spec() == p.spec()
