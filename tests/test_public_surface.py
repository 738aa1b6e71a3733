"""The top level exports what users call; subpackages load on first use; internals stay in their
modules."""

from __future__ import annotations

import subprocess
import sys

import gradguard


def test_subpackages_are_reachable_after_import_gradguard():
    assert gradguard.faults.parse("spike:1e+27,at=3").spec() == "spike:scale=1e+27,at=3"
    assert "lr_too_high" in gradguard.diagnose.list_rules()
    assert gradguard.bench.__name__ == "gradguard.bench"
    assert gradguard.integrations.__name__ == "gradguard.integrations"


def test_importing_gradguard_loads_no_subpackage_it_does_not_need():
    code = (
        "import sys, gradguard; "
        "print(sorted(m for m in sys.modules if m.split('.')[1:2] and m.startswith('gradguard.') "
        "and m.split('.')[1] in ('bench', 'diagnose', 'faults', 'integrations', 'keras')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_internals_are_not_top_level():
    for name in ("StepContext", "ParamLayout", "GradStats", "compute_grad_stats"):
        assert name not in gradguard.__all__ and not hasattr(gradguard, name)
    for name in ("Guard", "GuardedOptimizer", "StepReport", "advise", "available_policies"):
        assert name in gradguard.__all__
