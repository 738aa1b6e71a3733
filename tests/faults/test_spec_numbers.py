"""Fault specs round-trip numbers of any magnitude: ``plan.spec()`` writes ``factor=1e+27`` (the
``repr`` of the float), and the parser must not split it at the exponent's ``+`` (it did: the
hypothesis test in test_spec_fuzz.py found it now and then). Derandomized property tests over every
registered fault's numeric options, with the exponent cases pinned as explicit examples."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gradguard.faults as faults
from gradguard.errors import SpecError
from gradguard.faults import FaultPlan, FaultSpecError, LrBurst, SpikeGrad

from tests.helpers import slow_except

DETERMINISTIC = settings(derandomize=True, deadline=None, max_examples=60)

FLOATS = st.floats(allow_nan=False, allow_infinity=False) | st.builds(
    lambda m, e: float(f"{m}e{e}"), st.integers(-9999, 9999), st.integers(-323, 308)
)
INTS = st.integers() | st.integers(-(2**200), 2**200)


def _texts(value: float | int) -> list[str]:
    if isinstance(value, int):
        return [str(value), f"{value:e}"]
    return [repr(value), f"{value:.17e}", f"{value:.17E}", f"{value:g}"]


NUMBER_TEXT = st.one_of(FLOATS, INTS).flatmap(lambda v: st.sampled_from(_texts(v)))
AT_TEXT = st.lists(NUMBER_TEXT, min_size=1, max_size=3).map("|".join)

#: (fault, option) for every numeric option of every registered fault.
NUMERIC_OPTIONS = [
    (name, o.name)
    for name, info in faults.available_faults().items()
    for o in info.options
    if o.type in (int, float)
]
#: Faults to put around the one under test in a chain (a plan holds each fault once).
_OTHERS = ["nan:at=5", "inf:p=0.5", "fp16_overflow:at=2|4"]


def test_every_fault_with_a_number_is_covered():
    assert {n for n, _ in NUMERIC_OPTIONS} == set(faults.available_faults())
    assert ("lr_burst", "factor") in NUMERIC_OPTIONS and ("nan", "at") in NUMERIC_OPTIONS


# Fast: a float option and an int list option; slow: the others (the same grammar).
@pytest.mark.parametrize(
    ("fault", "option"), slow_except(NUMERIC_OPTIONS, ("lr_burst", "factor"), ("nan", "at"))
)
@DETERMINISTIC
@given(NUMBER_TEXT | AT_TEXT)
@example("1e+27")
@example("1E+27")
@example("1e-300")
@example("-1e+308")
@example("1.7976931348623157e+308")
@example("5e-324")
@example("0.1")
@example("1e+2")
@example(str(2**53 + 1))
@example(f"3|{2**70}|1e+3")
def test_every_fault_spec_round_trips_numbers_of_any_magnitude(fault, option, text):
    values = {option: text}
    if fault == "lr_burst" and option != "at":
        values["at"] = "1"
    spec = f"{fault}:" + ",".join(f"{k}={v}" for k, v in values.items())
    # The same numbers without the exponent's '+' (1e+27 -> 1e27): no '+' to mistake for a join.
    reference = _parse_or_none(spec.replace("e+", "e").replace("E+", "E"))
    plan = _parse_or_none(spec)
    if reference is None:  # out of the option's range: refused with the fault parser's own error
        assert plan is None
        return
    assert plan == reference and plan.spec() == reference.spec()
    again = faults.parse(plan.spec(), seed=7)
    assert again == plan and again.spec() == plan.spec()
    # ... and inside a chain, where a '+' joins faults
    others = [o for o in _OTHERS if not o.startswith(f"{fault}:")][:2]
    chain = faults.parse(f"{others[0]}+{plan.spec()}+{others[1]}", seed=7)
    assert [f.name for f in chain.faults][1] == fault
    assert chain.faults[1] == plan.faults[0]
    assert faults.parse(chain.spec(), seed=7) == chain


def _parse_or_none(spec: str) -> FaultPlan | None:
    try:
        return faults.parse(spec, seed=7)
    except FaultSpecError:
        return None


# ----- the regression: factor=1e+27 ----------------------------------------------------------------
def test_factor_1e27_parses_and_round_trips():
    plan = faults.parse("lr_burst:factor=1e+27,at=1")
    assert plan.faults[0].values["factor"] == 1e27
    assert plan.spec() == "lr_burst:factor=1e+27,at=1"
    assert faults.parse(plan.spec()) == plan


def test_a_plan_built_in_python_with_huge_numbers_round_trips():
    plan = FaultPlan([LrBurst(factor=1e27, at=[1]), SpikeGrad(scale=1e300, at=[2**60, 3])])
    assert plan.spec() == "lr_burst:factor=1e+27,at=1+spike:scale=1e+300,at=3|1152921504606846976"
    assert faults.parse(plan.spec()) == plan


@pytest.mark.parametrize(
    "spec",
    [
        "lr_burst:factor=1e+27,at=1+nan:p=0.5",
        "nan:p=0.5+lr_burst:factor=1E+27,at=1",
        "spike:1e+5,at=100+poison:scale=2.5e+3,p=1e-300",
        "lr_burst:factor=1e-300,steps=1e+2,at=1e+1",
    ],
)
def test_exponents_with_plus_are_not_fault_separators(spec):
    plan = faults.parse(spec)
    assert len(plan) == 2 or spec.startswith("lr_burst:factor=1e-300")
    assert faults.parse(plan.spec()) == plan


def test_a_bad_exponent_is_still_a_fault_spec_error():
    with pytest.raises(FaultSpecError, match="factor='1e' is not a number"):
        faults.parse("lr_burst:factor=1e+,at=1")
    with pytest.raises(SpecError, match="empty fault"):
        faults.parse("nan+ +spike")
