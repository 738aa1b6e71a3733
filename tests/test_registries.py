"""The five registries (policies, faults, models, tasks, diagnosis rules) have one shape: an info
record per entry (``name``, ``summary``, ``options`` with ``name``/``default``/``type``,
``defaults``), ``list_<kind>s()``, ``<kind>_infos()`` and ``<kind>_info(name)``, which refuses an
unknown name naming the valid ones (gradguard/registries.py)."""

from __future__ import annotations

import inspect

import pytest

import gradguard
from gradguard.bench import models, tasks
from gradguard.diagnose import rules
from gradguard.errors import ConfigError, SpecError
from gradguard.policies import registry as policies

REGISTRIES = {
    "policy": (policies.list_policies, policies.policy_infos, policies.policy_info, SpecError),
    "fault": (
        gradguard.faults.list_faults,
        gradguard.faults.fault_infos,
        gradguard.faults.fault_info,
        SpecError,
    ),
    "model": (models.list_models, models.model_infos, models.model_info, ConfigError),
    "task": (tasks.list_tasks, tasks.task_infos, tasks.task_info, ConfigError),
    "rule": (rules.list_rules, rules.rule_infos, rules.rule_info, ConfigError),
}


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_registry_has_the_one_shape(kind):
    list_fn, infos_fn, info_fn, error = REGISTRIES[kind]
    names = list_fn()
    infos = infos_fn()
    assert names and list(infos) == names and len(set(names)) == len(names)
    for name, info in infos.items():
        assert info.name == name and info_fn(name) == info
        assert info.summary and "\n" not in info.summary, f"{kind} {name}: a one-line summary"
        assert isinstance(info.options, tuple)
        for o in info.options:
            assert o.name and hasattr(o, "default") and hasattr(o, "type")
        assert info.defaults == {o.name: o.default for o in info.options}
    with pytest.raises(error, match=names[0]):
        info_fn("no_such_entry")


def test_a_policys_record_is_read_from_its_class():
    """The record is the class's own: its constructor's parameters and their defaults, its
    docstring's first paragraph, its kind."""
    for name, info in policies.policy_infos().items():
        cls = policies.policy_class(name)
        params = [p for p in inspect.signature(cls.__init__).parameters.values()][1:]
        assert [o.name for o in info.options] == [p.name for p in params]
        assert info.defaults == {p.name: p.default for p in params}
        assert info.kind == cls.kind and info.cls is cls
        assert info.summary == " ".join(inspect.cleandoc(cls.__doc__).split("\n\n")[0].split())
    assert policies.policy_info("zclip").defaults["z_thresh"] == 2.5
