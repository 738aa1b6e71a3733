"""Fault specs: every input either parses to a FaultPlan or raises the project's SpecError with a
message that names the problem and the fix, never another exception; a valid plan's spec string
parses back to the same plan, and the spec and Python constructors agree."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard.faults as faults
from gradguard.errors import SpecError
from gradguard.faults import FaultPlan, FaultSpecError, fault_class

from tests.helpers import TinyNet

FAULTS = sorted(faults.available_faults())
LAYERS = ["fc1", "fc2", "head", "fc*", "*", "f?2", "[fh]*"]


# ----- each malformed input names its problem and the fix ----------------------------------------
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty fault spec; write 'none'"),
        ("   ", "empty fault spec"),
        (
            "meteor",
            r"unknown fault 'meteor'; valid faults: fp16_overflow, inf, logit_drift, lr_burst, nan",
        ),
        ("NaN:p=0.1", r"did you mean 'nan'"),
        ("nan:q=1", r"unknown option 'q'; options: p, at, layer"),
        ("spike:sacle=1e4", r"did you mean 'scale'"),
        ("nan:p=0.1,p=0.2", "option 'p' given twice"),
        ("nan:p=abc", r"p='abc' is not a number; p is the strike probability"),
        ("nan:p=1.5", r"p=1.5 is outside \[0, 1\]"),
        ("nan:p=-0.1", r"outside \[0, 1\]"),
        ("nan:p=nan", "must be finite"),
        ("spike:scale=0", "must be > 1"),
        ("spike:scale=-5", "must be > 1"),
        ("poison:scale=0", "scale=0 must be > 0"),
        ("lr_burst:factor=0,at=1", "factor=0 must be > 0"),
        ("lr_burst:steps=0,at=1", "steps=0 must be >= 1"),
        ("lr_burst:steps=2.5,at=1", "is not a whole number"),
        ("lr_burst:factor=10", "needs at=STEP"),
        ("nan:at=-1", "at=-1 must be >= 0"),
        ("nan:at=3||4", "empty item; join values with single '|'"),
        ("nan:p=0.1,at=3", "either p .* or at .*, not both"),
        ("poison:mode=melt", "mode='melt' is not one of scale, shuffle"),
        ("nan:layer=fc 1", "is not a module name or glob"),
        ("nan:", "nothing after ':'; write nan:key=value"),
        ("nan:0.1,0.2", "only the first value may omit its key"),
        ("nan:=3", "missing option name"),
        (":p=0.1", "missing fault name"),
        ("nan++spike", r"join faults with a single '\+'"),
        ("nan+", "empty fault"),
        ("nan+nan:at=3", "fault nan given twice; give each fault once"),
        ("none+nan", "'none' stands alone"),
        ("n@n!", "unknown fault 'n@n!'"),
        ("nan;p=0.1", "unknown fault"),
    ],
)
def test_bad_specs_name_the_problem_and_the_fix(spec, message):
    with pytest.raises(FaultSpecError, match=message) as info:
        faults.parse(spec, seed=0)
    assert isinstance(info.value, SpecError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [None, 3, b"nan", ["nan"]])
def test_a_spec_that_is_not_a_string_is_a_spec_error(bad):
    with pytest.raises(FaultSpecError, match="a fault spec is a string"):
        faults.parse(bad, seed=0)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True, None])
def test_a_bad_seed_is_a_spec_error(seed):
    with pytest.raises(FaultSpecError, match="seed must be an int >= 0"):
        faults.parse("nan", seed=seed)


def test_python_construction_is_validated_like_a_spec():
    with pytest.raises(FaultSpecError, match=r"p=2 is outside \[0, 1\]"):
        faults.NanGrad(p=2)
    with pytest.raises(FaultSpecError, match="unknown option 'scale'; options: p, at, layer"):
        faults.NanGrad(scale=3)
    with pytest.raises(FaultSpecError, match="give each fault once"):
        FaultPlan([faults.NanGrad(at=1), faults.NanGrad(at=2)])
    assert faults.SpikeGrad(scale=1e5, at=[9, 3, 9]) == faults.parse_fault("spike:1e5,at=3|9")


# ----- valid plans, written every way the grammar allows ------------------------------------------
def _number(draw, value: float) -> str:
    """A float as a user might write it; exact (repr) unless it is whole."""
    if float(value).is_integer() and abs(value) < 1e15 and draw(st.booleans()):
        return str(int(value))
    return repr(float(value))


_P = st.floats(0.0, 1.0)
_AT = st.lists(st.integers(0, 10**6), min_size=1, max_size=4)
_RANGES = {
    ("spike", "scale"): st.floats(1.0, 1e12, exclude_min=True),
    ("poison", "scale"): st.floats(0.0, 1e12, exclude_min=True),
    ("poison", "mode"): st.sampled_from(["scale", "shuffle"]),
    ("lr_burst", "factor"): st.floats(0.0, 1e6, exclude_min=True),
    ("lr_burst", "steps"): st.integers(1, 1000),
    ("nan", "layer"): st.sampled_from(LAYERS),
    ("inf", "layer"): st.sampled_from(LAYERS),
    ("spike", "layer"): st.sampled_from(LAYERS),
}


@st.composite
def valid_fault(draw, name: str):
    """(spec text, Python option values) for one valid fault, options in any order and form."""
    values: dict = {}
    opts = {o.name: o for o in fault_class(name).options}
    for key in opts:
        if (name, key) in _RANGES and draw(st.booleans()):
            values[key] = draw(_RANGES[(name, key)])
    when = "at" if name == "lr_burst" else draw(st.sampled_from(["p", "at", None]))
    if when == "p":
        values["p"] = draw(_P)
    elif when == "at":
        values["at"] = draw(_AT)
    items = []
    for key, v in values.items():
        if key == "at":
            text = "|".join(map(str, v))
        elif isinstance(v, str):
            text = v
        else:
            text = _number(draw, v)
        items.append((key, text))
    items = draw(st.permutations(items))
    pad = st.sampled_from(["", " ", "  "])
    parts = []
    for i, (key, text) in enumerate(items):
        positional = i == 0 and key == next(iter(opts)) and draw(st.booleans())
        parts.append(f"{draw(pad)}{text}" if positional else f"{key}{draw(pad)}={draw(pad)}{text}")
    spec = name + (":" + ",".join(parts) if parts else "")
    return f"{draw(pad)}{spec}{draw(pad)}", values


@st.composite
def valid_plan(draw):
    names = draw(st.lists(st.sampled_from(FAULTS), min_size=1, max_size=4, unique=True))
    drawn = [draw(valid_fault(n)) for n in names]
    return "+".join(text for text, _ in drawn), [
        (n, v) for n, (_, v) in zip(names, drawn, strict=True)
    ]


_NET = TinyNet(d_in=3, width=4, d_out=2)
for _p in _NET.parameters():
    _p.grad = torch.zeros_like(_p)


@settings(max_examples=150, deadline=None)
@given(valid_plan(), st.integers(0, 2**40))
def test_a_valid_plan_round_trips_and_matches_python_construction(plan_and_values, seed):
    text, values = plan_and_values
    plan = faults.parse(text, seed=seed)
    assert len(plan) == len(values)
    again = faults.parse(plan.spec(), seed=seed)
    assert again == plan and again.spec() == plan.spec()
    built = FaultPlan(fault_class(n)(seed=seed, **v) for n, v in values)
    assert built == plan
    # ... and it runs: the hooks strike or not, but never fail on a valid plan and a real model.
    opt = torch.optim.SGD(_NET.parameters(), lr=0.1)
    x, y = torch.ones(2, 3), torch.tensor([0, 1])
    for step in (0, 3):
        plan.on_batch(step, x, y)
        plan.on_gradients(step, _NET)
        plan.on_optimizer(step, opt)
        plan.after_step(step, opt)
    assert opt.param_groups[0]["lr"] == 0.1


# ----- near misses and garbage: a plan or a SpecError, nothing else -------------------------------
_SPECIAL = [*":=,+| .-*e_", "nan", "inf", "1e400", "-1", "none", "\x00", "é", "٣"]


@st.composite
def near_miss(draw):
    """A valid spec with a few random edits: a deleted, inserted, replaced or doubled piece."""
    text, _ = draw(valid_plan())
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 4)))
        edit = draw(st.sampled_from(["delete", "insert", "replace", "double"]))
        piece = draw(st.sampled_from(_SPECIAL) | st.text(max_size=2))
        if edit == "delete":
            text = text[:i] + text[j:]
        elif edit == "insert":
            text = text[:i] + piece + text[i:]
        elif edit == "replace":
            text = text[:i] + piece + text[j:]
        else:
            text = text[:j] + text[i:j] + text[j:]
    return text


def parses_or_spec_error(text: str, seed: int = 0) -> FaultPlan | None:
    try:
        plan = faults.parse(text, seed=seed)
    except SpecError as e:
        message = str(e)
        assert message and "\n" not in message
        return None
    assert isinstance(plan, FaultPlan)
    assert faults.parse(plan.spec(), seed=seed) == plan
    return plan


@settings(max_examples=300, deadline=None)
@given(near_miss())
def test_near_miss_specs_parse_or_raise_spec_errors(text):
    parses_or_spec_error(text)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_arbitrary_text_parses_or_raises_a_spec_error(text):
    parses_or_spec_error(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=sorted(set("nanifspkeolr_bu16:=,+|.-*0123456789 atyemdhc")), max_size=40))
def test_grammar_alphabet_soup_parses_or_raises_a_spec_error(text):
    parses_or_spec_error(text)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["nan", "spike:at=3", "none"]), st.integers(-(2**70), 2**70))
def test_any_integer_seed_parses_or_raises_a_spec_error(spec, seed):
    plan = parses_or_spec_error(spec, seed)
    assert (plan is None) == (seed < 0)
