"""The entry-point contract: every way a user's setup can be wrong is a ConfigError that names
what is wrong and the fix, raised before any probe run starts."""

from __future__ import annotations

import textwrap

import pytest
import torch

from gradguard.advice import entry as E
from gradguard.errors import ConfigError

GOOD = """
import torch
from torch import nn
from torch.nn import functional as F

def data(n=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]

def build(seed=0):
    model = nn.Linear(3, 2)
    return {
        "model": model,
        "optimizer": lambda m: torch.optim.SGD(m.parameters(), lr=0.5),
        "loss": lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        "data": data(),
    }
"""


@pytest.fixture
def module(tmp_path, monkeypatch):
    """Write ``body`` as an importable module; return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    count = iter(range(1000))

    def write(body: str) -> str:
        name = f"user_setup_{next(count)}_{abs(hash(body)) % 10**8}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
        return name

    return write


def test_a_good_entry_point_is_checked_and_reports_its_lr(module):
    info = E.check_entry(f"{module(GOOD)}:build")
    assert info.lr == 0.5 and not info.has_evaluate and info.higher_is_better


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("no_colon_here", "must be 'package.module:function'"),
        ("a:b:c", "one colon"),
        ("mod:", "must be 'package.module:function'"),
        ("examples/advise_entry.py:build", "give the module's import name, not a file path"),
    ],
)
def test_malformed_entry_points(text, fragment):
    with pytest.raises(ConfigError, match="entry point") as e:
        E.load_entry(text)
    assert fragment in str(e.value)


def test_a_module_that_does_not_exist_names_the_fix():
    with pytest.raises(ConfigError) as e:
        E.load_entry("surely_not_a_module_xyz:build")
    assert "cannot import module 'surely_not_a_module_xyz'" in str(e.value)
    assert "PYTHONPATH" in str(e.value)


def test_a_module_whose_own_import_fails_says_so(module):
    name = module("import surely_not_a_dependency_xyz\n")
    with pytest.raises(ConfigError, match=f"importing '{name}' failed"):
        E.load_entry(f"{name}:build")


def test_a_module_that_raises_on_import(module):
    name = module("raise RuntimeError('boom at import')\n")
    with pytest.raises(ConfigError, match="raised RuntimeError: boom at import"):
        E.load_entry(f"{name}:build")


def test_a_missing_function_lists_what_the_module_defines(module):
    name = module(GOOD)
    with pytest.raises(ConfigError) as e:
        E.load_entry(f"{name}:buidl")
    assert "has no 'buidl'" in str(e.value) and "it defines: build, data" in str(e.value)


def test_an_attribute_that_is_not_a_function(module):
    name = module(GOOD + "\nbuild_it = 3\n")
    with pytest.raises(ConfigError, match="is a int, not a function"):
        E.load_entry(f"{name}:build_it")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("def build(seed=0):\n    return 3\n", "returned int; return a gradguard.advice.Setup"),
        ("def build(seed=0):\n    return (1, 2, 3)\n", "returned a tuple of 3"),
        (
            "def build(seed=0):\n    return {'model': 1}\n",
            "lacks key(s) optimizer, loss, data",
        ),
        (
            GOOD.replace('"data": data(),', '"data": data(), "extra": 1,'),
            "has unknown key(s) extra",
        ),
        (
            GOOD.replace("model = nn.Linear(3, 2)", "model = 'linear'"),
            "model must be a torch.nn.Module",
        ),
        (
            GOOD.replace("lambda m: torch.optim.SGD(m.parameters(), lr=0.5)", '"sgd"'),
            "optimizer must be a function",
        ),
        (
            GOOD.replace(
                '"optimizer": lambda m: torch.optim.SGD(m.parameters(), lr=0.5)',
                '"optimizer": torch.optim.SGD(model.parameters(), lr=0.5)',
            ),
            "optimizer must be a factory",
        ),
        (GOOD.replace('"data": data(),', '"data": 5,'), "data must be an iterable of batches"),
        (
            GOOD.replace("lambda m: torch.optim.SGD(m.parameters(), lr=0.5)", "lambda m: 1"),
            "optimizer(model) must return a torch.optim.Optimizer, got int",
        ),
        (
            GOOD.replace("F.cross_entropy(m(b[0]), b[1])", "m(b[0])"),
            "must return a scalar tensor",
        ),
        (
            GOOD.replace("F.cross_entropy(m(b[0]), b[1])", "torch.tensor(1.0)"),
            "does not require grad",
        ),
        (GOOD.replace('"data": data(),', '"data": [],'), "data yielded no batch"),
        (GOOD.replace("def build(seed=0):", "def build(seed, size):"), "requires argument(s) size"),
        (
            GOOD.replace("model = nn.Linear(3, 2)", "raise ValueError('no GPU here')"),
            "raised ValueError: no GPU here",
        ),
        (
            GOOD.replace('"data": data(),', '"data": data(), "evaluate": lambda m: "good"'),
            "evaluate(model) must return a number",
        ),
        (
            GOOD.replace('"data": data(),', '"data": data(), "evaluate": lambda m: {"acc": 1.0}'),
            "without a 'metric' key",
        ),
    ],
    ids=lambda v: v if len(v) < 60 and "\n" not in v else "",
)
def test_contract_errors_name_what_is_wrong(module, body, fragment):
    """(The test id is the message fragment.)"""
    with pytest.raises(ConfigError) as e:
        E.check_entry(f"{module(body)}:build")
    assert fragment in str(e.value)


def test_the_seed_is_passed_when_taken_and_torch_is_seeded_either_way(module):
    seen = module(
        GOOD.replace("def build(seed=0):", "SEEDS = []\ndef build(seed=0):\n    SEEDS.append(seed)")
    )
    fn = E.load_entry(f"{seen}:build")
    a = E.build_setup(fn, 7, "x")
    b = E.build_setup(fn, 7, "x")
    assert fn.__globals__["SEEDS"] == [7, 7]
    assert torch.equal(a.model.weight, b.model.weight)  # same seed, same init
    no_arg = module(GOOD.replace("def build(seed=0):", "def build():"))
    fn = E.load_entry(f"{no_arg}:build")
    w = [E.build_setup(fn, s, "x").model.weight.clone() for s in (1, 1, 2)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_tuples_and_setups_are_accepted():
    model = torch.nn.Linear(2, 2)
    parts = (model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), lambda m, b: m(b).sum(), [1])
    assert E.as_setup(parts).model is model
    assert E.as_setup((*parts, lambda m: 1.0)).evaluate is not None
    setup = E.Setup(*parts, higher_is_better=False)
    assert E.as_setup(setup) is setup


def test_batches_reiterate_a_reiterable_and_refuse_a_one_shot_iterator_that_ends():
    it = E.batches([1, 2, 3])
    assert [next(it) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    it = E.batches(iter([1, 2]))
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(ConfigError, match="ran out after 2 batch"):
        next(it)


def test_set_lr_keeps_the_ratio_between_param_groups():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    E.set_lr(opt, 0.3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3, 0.03])
