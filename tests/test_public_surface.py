"""The top level exports what users call; subpackages load on first use; internals stay in their
modules."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import gradguard


def test_subpackages_are_reachable_after_import_gradguard():
    assert gradguard.faults.parse("spike:1e+27,at=3").spec() == "spike:scale=1e+27,at=3"
    assert "lr_too_high" in gradguard.diagnose.list_rules()
    assert gradguard.bench.__name__ == "gradguard.bench"
    assert gradguard.integrations.__name__ == "gradguard.integrations"
    assert gradguard.advice.__name__ == "gradguard.advice"


def test_importing_gradguard_loads_no_subpackage_it_does_not_need():
    code = (
        "import sys, gradguard; "
        "print(sorted(m for m in sys.modules if m.split('.')[1:2] and m.startswith('gradguard.') "
        "and m.split('.')[1] in ('bench', 'diagnose', 'faults', 'integrations', 'keras')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_advise_is_a_plain_function_and_its_package_is_advice():
    """``gradguard.advise`` is a function, not a callable module; its package is
    ``gradguard.advice``, whose modules loading must not rebind the name."""
    code = (
        "import inspect, json, sys, gradguard; "
        "seen = lambda: ("
        "inspect.isfunction(gradguard.advise), 'torch' in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith('gradguard.advice.'))); "
        "before = seen(); import gradguard.advice.result; "
        "print(json.dumps([before, seen()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = json.loads(out.stdout)
    assert before == [True, False, []]  # import gradguard: no torch, none of advice's modules
    assert after[0] is True and "gradguard.advice.result" in after[2]

    import gradguard.advice.result

    assert inspect.isfunction(gradguard.advise) and gradguard.advise.__name__ == "advise"
    assert gradguard.advise is gradguard.advice.advise
    assert "budget" in inspect.signature(gradguard.advise).parameters
    assert gradguard.advice.Advice is gradguard.advice.result.Advice


def test_internals_are_not_top_level():
    for name in ("StepContext", "ParamLayout", "GradStats", "compute_grad_stats"):
        assert name not in gradguard.__all__ and not hasattr(gradguard, name)
    for name in ("Guard", "GuardedOptimizer", "StepReport", "advise", "available_policies"):
        assert name in gradguard.__all__
