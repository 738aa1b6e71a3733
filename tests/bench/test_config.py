"""Grids, the mitigation axis and named suites: everything is validated before a run starts."""

from __future__ import annotations

import re

import pytest

from gradguard.bench.config import RunConfig, expand_grid, load_toml_grid, resolve, suite
from gradguard.bench.store import run_key
from gradguard.errors import ConfigError


def test_grid_is_the_product_of_its_axes():
    cfgs = expand_grid(
        {"steps": 10},
        {"lr": [0.01, 0.1], "mitigation": ["none", "zclip", "leaky_relu"], "seed": [0, 1]},
    )
    assert len(cfgs) == 12
    assert {(c.lr, c.mitigation, c.seed) for c in cfgs} == {
        (lr, m, s) for lr in (0.01, 0.1) for m in ("none", "zclip", "leaky_relu") for s in (0, 1)
    }
    assert all(c.steps == 10 for c in cfgs)


@pytest.mark.parametrize(
    ("mitigation", "expect"),
    [
        ("none", {"policy": None, "optimizer": "sgd"}),
        ("leaky_relu", {"model_options": {"activation": "leaky_relu", "leak": 0.01}}),
        ("leaky_relu:0.2", {"model_options": {"activation": "leaky_relu", "leak": 0.2}}),
        ("dropout:0.3", {"model_options": {"dropout": 0.3}}),
        ("batchnorm", {"model_options": {"norm": "batch"}}),
        ("momentum", {"optimizer": "momentum", "momentum": 0.9}),
        ("nesterov:0.95", {"optimizer": "nesterov", "momentum": 0.95}),
        ("clip_norm:1.0", {"policy": "clip_norm:1.0", "optimizer": "sgd"}),
        ("skip_nonfinite+zclip", {"policy": "skip_nonfinite+zclip"}),
    ],
)
def test_mitigations_resolve(mitigation, expect):
    res = resolve(RunConfig(mitigation=mitigation))
    for k, v in expect.items():
        got = getattr(res, k)
        if isinstance(v, dict):
            assert {kk: got[kk] for kk in v} == v
        else:
            assert got == v


@pytest.mark.parametrize(
    ("axes", "fragment"),
    [
        ({"lr": [0.1, 0.0]}, "lr must be a finite number > 0"),
        ({"lr": [-1.0]}, "lr must be a finite number > 0"),
        ({"mitigation": ["zclip", "clipnorm:1"]}, "neither a model/optimizer variant"),
        ({"mitigation": ["dropout:1.5"]}, "dropout p must be < 1"),
        ({"optimizer": ["lion"]}, "unknown optimizer 'lion'"),
        ({"seed": []}, "grid axis 'seed' is empty"),
        ({"steps": [0]}, "steps must be an integer >= 1"),
        ({"task": ["imagenet"]}, "unknown task 'imagenet'"),
        ({"model": ["resnet51"]}, "unknown model 'resnet51'"),
        ({"model": ["lstm"], "mitigation": ["leaky_relu"]}, "set by mitigation 'leaky_relu'"),
        # found by tests/test_fuzz_inputs.py: each of these started runs that all failed
        ({"seed": [True]}, "seed must be an integer in [0, 2**63), got True"),
        ({"seed": [-1]}, "seed must be an integer in [0, 2**63), got -1"),
        ({"seed": [2**64]}, "seed must be an integer in [0, 2**63)"),
        ({"warmup": [True]}, "warmup must be an integer >= 0, got True"),
        ({"model_options": [{"depth": "x"}]}, "mlp: depth='x' is not an integer"),
        ({"model_options": [{"activation": "swish"}]}, "activation='swish' is not one of relu"),
        (
            {"task": ["adding"], "model": ["rnn"], "task_options": [{"T": 2.5}]},
            "task adding: T=2.5 is not an integer",
        ),
        ({"seed": list(range(400)), "lr": [0.1] * 400}, "grid of 160000 runs (400 seed x 400 lr)"),
    ],
)
def test_bad_grids_fail_before_any_run(axes, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        expand_grid({}, axes)


def test_unknown_setting_is_named():
    with pytest.raises(ConfigError, match="unknown run setting"):
        expand_grid({"stepz": 3}, {})


def test_toml_grid(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text(
        '[base]\nsteps = 20\n[base.model_options]\ndepth = 3\n[grid]\nlr = [0.01, 0.1]\nmitigation = ["none", "agc:0.01"]\n'
    )
    cfgs = load_toml_grid(p)
    assert len(cfgs) == 4 and all(c.steps == 20 and c.model_options == {"depth": 3} for c in cfgs)
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml_grid(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml_grid(tmp_path / "nope.toml")
    other = tmp_path / "other.toml"
    other.write_text("[runs]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"unknown table\(s\) runs"):
        load_toml_grid(other)


def test_quick_suite_spans_safe_to_divergent_lrs():
    cfgs = suite("quick")
    lrs = sorted({c.lr for c in cfgs})
    mits = {c.mitigation for c in cfgs}
    assert lrs[0] <= 0.01 and lrs[-1] >= 0.3
    assert {
        "none",
        "leaky_relu",
        "nesterov",
        "clip_norm:1.0",
        "zclip",
        "agc:0.01",
        "autoclip:10",
    } <= mits
    with pytest.raises(ConfigError, match="unknown suite"):
        suite("huge")


@pytest.mark.parametrize("name", ["seed", "rnn", "transformer", "full"])
def test_every_suite_expands_and_validates(name):
    cfgs = suite(name)
    assert cfgs and len({run_key(c.as_dict()) for c in cfgs}) == len(cfgs)
    for cfg in cfgs:
        resolve(cfg)


def test_full_is_the_union_of_the_others():
    parts = [c for n in ("quick", "seed", "rnn", "transformer") for c in suite(n)]
    assert suite("full") == parts


def test_the_seed_suite_has_every_mitigation_the_document_names():
    """ResNet-50 on digits with Leaky ReLU, Dropout, Momentum, Nesterov and batch norm on and off,
    beside the Guard's policies: each resolves to a model the registry builds."""
    configs = suite("seed")
    assert {c.model for c in configs} == {"resnet50"}
    on = {c.mitigation for c in configs if c.model_options.get("norm", "batch") == "batch"}
    off = {c.mitigation for c in configs if c.model_options.get("norm") == "none"}
    document = {"leaky_relu", "dropout", "momentum", "nesterov"}
    assert document | {"none", "default", "clip_norm:1.0"} <= on & off
    assert "batchnorm" in off  # batch norm back on, beside the same runs without it
    dropout = next(c for c in configs if c.mitigation == "dropout")
    assert resolve(dropout).model_options == {"dropout": 0.1}
