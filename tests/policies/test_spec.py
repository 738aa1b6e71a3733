"""The spec language: the documented examples parse; bad specs give clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard
from gradguard import SpecError, parse_spec


@pytest.mark.parametrize(
    ("spec", "names", "attrs"),
    [
        ("clip_norm:1.0", ["clip_norm"], {"max_norm": 1.0}),
        ("clip_value:0.5", ["clip_value"], {"limit": 0.5}),
        ("agc:0.01", ["agc"], {"clipping": 0.01}),
        ("autoclip:10", ["autoclip"], {"percentile": 10.0}),
        ("zclip", ["zclip"], {"z_thresh": 2.5, "alpha": 0.97, "warmup": 25, "max_norm": None}),
        ("zclip:z_thresh=2.0,max_norm=5", ["zclip"], {"z_thresh": 2.0, "max_norm": 5.0}),
        ("skip_nonfinite+zclip", ["skip_nonfinite", "zclip"], {}),
        ("default", ["skip_nonfinite", "adaptive_clip", "update_clip", "lr_backoff"], {}),
        ("default_v1", ["skip_nonfinite", "zclip", "clip_norm"], {}),
        ("agc:clipping=0.02,exclude=fc1*|head", ["agc"], {"exclude": ("fc1*", "head")}),
        ("rollback:every=10,to=disk", ["rollback"], {"every": 10, "to": "disk"}),
        (" skip_nonfinite + clip_norm : 2 ", ["skip_nonfinite", "clip_norm"], {}),
        ("none", [], {}),
    ],
)
def test_documented_specs_parse(spec, names, attrs):
    chain = parse_spec(spec)
    assert [p.name for p in chain] == names
    for k, v in attrs.items():
        assert getattr(chain[-1], k) == v


def test_objects_and_lists():
    z = gradguard.zclip(z_thresh=3.0)
    chain = parse_spec(["skip_nonfinite", z, "clip_norm:2"])
    assert [p.name for p in chain] == ["skip_nonfinite", "zclip", "clip_norm"]
    assert chain[1] is z


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (
            "clipnorm:1.0",
            "unknown policy 'clipnorm'; valid policies: adagc, adaptive_clip, agc, autoclip",
        ),
        ("clip_norm:max=1", "unknown parameter 'max'; valid parameters: max_norm, norm_type"),
        ("clip_norm:abc", "max_norm='abc' is not a number"),
        ("clip_norm:-1", "max_norm must be a finite number > 0"),
        ("clip_norm:nan", "max_norm must be a finite number > 0"),
        ("zclip:warmup=2.5", "warmup='2.5' is not an integer"),
        ("zclip:clip_option=median", "is not one of adaptive_scaling, mean"),
        ("agc:exclude_head=maybe", "is not a boolean"),
        ("clip_norm:1,2", "only the first parameter can be given without a key"),
        ("clip_norm:", "nothing after ':'"),
        ("skip_nonfinite++zclip", "empty policy in spec"),
        ("", "empty policy spec"),
        ("clip_layerwise", "give max_norm"),
        ("autoclip:percentile=120", "percentile must be in [0, 100]"),
        ("skip_nonfinite:3", "takes no parameters"),
        ("zclip:alpha=0.9,alpha=0.8", "given twice"),
        ("rollback:to=cloud", "is not one of memory, disk"),
        # a count past a C size was an OverflowError from collections.deque
        ("skip_spike:window=1e30", "window='1e30' is too large (at most 9223372036854775807)"),
        ("clip_norm:1e+", "max_norm='1e' is not a number"),
    ],
)
def test_bad_specs_name_the_problem(spec, fragment):
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert fragment in str(err.value)


def test_bad_policy_argument_types():
    with pytest.raises(SpecError, match="not int"):
        parse_spec(3)
    with pytest.raises(SpecError, match="spec strings or Policy objects"):
        parse_spec(["zclip", 3.0])


def test_duplicate_policy_in_chain_is_refused():
    m = torch.nn.Linear(2, 2)
    with pytest.raises(gradguard.ConfigError, match="appears twice"):
        gradguard.Guard(m, torch.optim.SGD(m.parameters(), lr=0.1), "zclip+clip_norm+zclip")


@pytest.mark.parametrize("name", gradguard.available_policies())
def test_spec_round_trips(name):
    """spec() of any policy rebuilds an equal policy (registry-driven)."""
    kwargs = {"clip_layerwise": {"factor": 3.0}}.get(name, {})
    p = gradguard.policies.policy_class(name)(**kwargs)
    (q,) = parse_spec(p.spec())
    assert type(q) is type(p) and q.params() == p.params()


def test_exponents_are_not_chain_separators():
    """str(1e20) is '1e+20': spec() of a large value parsed back as two policies ('1e', '20')."""
    (p,) = parse_spec("clip_norm:100000000000000000000")
    assert p.spec() == "clip_norm:max_norm=1e+20,norm_type=2.0"
    assert [q.spec() for q in parse_spec(p.spec())] == [p.spec()]
    chain = parse_spec("clip_norm:2.5E+3+zclip+skip_nonfinite+clip_value:1e-3")
    assert [q.name for q in chain] == ["clip_norm", "zclip", "skip_nonfinite", "clip_value"]
    assert chain[0].max_norm == 2500.0 and chain[3].limit == 0.001


def test_integers_are_exact_past_float_precision():
    (p,) = parse_spec("lr_backoff:recover=9007199254740993")
    assert p.recover == 9007199254740993


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyz_:=,+.|-0123456789 ")), max_size=40
    )
)
def test_any_text_parses_or_raises_spec_error(text):
    """Fuzz: every input either parses or raises the project's SpecError, never anything else."""
    try:
        parse_spec(text)
    except SpecError as e:
        assert str(e)


def test_python_api_raises_the_same_error_type():
    with pytest.raises(SpecError, match=r"alpha must be in \(0, 1\)"):
        gradguard.zclip(alpha=2.0)
    with pytest.raises(SpecError, match="max_norm must be a finite number > 0"):
        gradguard.clip_norm(max_norm=0)
