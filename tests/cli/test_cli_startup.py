"""The CLI's quick paths (``--help``, ``--version``, every subcommand's ``--help``, ``check``,
``policies``) import neither torch nor numpy, so they answer at once; the time itself is measured
by benchmarks/bench_cli_start.py, not here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gradguard._lazy import LazyModule

_PROBE = """
import json, sys
from gradguard.cli import main
try:
    code = main({argv!r})
except SystemExit as e:  # --help and --version exit through argparse
    code = e.code
print(json.dumps({{"code": code, "loaded": sorted(m for m in ("torch", "numpy") if m in sys.modules)}}))
"""


def _run(argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(argv=argv)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["policies"],
        ["check", "default"],
        ["check", "skip_nonfinite+zclip:z_thresh=2.0+rollback+agc+autoclip+spam_clip+adagc"],
        ["check", "zclip:z_thresh=-1"],  # a refused spec: the error path is quick too
        *([cmd, "--help"] for cmd in ("bench", "train", "report", "advise", "check", "policies")),
    ],
)
def test_quick_paths_import_neither_torch_nor_numpy(argv):
    got = _run(argv)
    assert got["loaded"] == [], f"gradguard {' '.join(argv)} imported {got['loaded']}"
    assert got["code"] in (0, 2, None)


def test_import_gradguard_is_light_and_its_names_load_on_use():
    code = (
        "import sys, json, gradguard; light = 'torch' not in sys.modules; "
        "g = gradguard.Guard; from gradguard import clip_norm, DEFAULT_SPEC; "
        "print(json.dumps([light, g.__module__, clip_norm.__module__, DEFAULT_SPEC, "
        "'torch' in sys.modules, sorted(set(gradguard.__all__) - set(dir(gradguard)))]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    light, guard_mod, clip_mod, default, loaded, missing = json.loads(out.stdout)
    assert light and loaded
    assert (guard_mod, clip_mod) == ("gradguard.guard", "gradguard.policies.clip")
    assert default.startswith("skip_nonfinite+")
    assert missing == []  # every public name is listed by dir()


def test_lazy_module_puts_the_real_module_in_place_and_patches_reach_through(monkeypatch):
    import math
    import types

    probe = types.ModuleType("gradguard._lazy_probe")  # a gradguard module that imported a proxy
    probe.m = LazyModule("math")
    monkeypatch.setitem(sys.modules, probe.__name__, probe)
    held = probe.m  # a reference kept elsewhere stays a proxy
    assert held.sqrt is math.sqrt and held.pi == math.pi
    assert probe.m is math  # the module's own global is now the real module
    monkeypatch.setattr(math, "sqrt", lambda x: -1.0)
    assert held.sqrt(4.0) == -1.0  # nothing cached on the proxy: a patch reaches it
    with pytest.raises(AttributeError):
        _ = held.no_such_name
    with pytest.raises(ModuleNotFoundError):
        _ = LazyModule("gradguard_no_such_module").x
    import copy
    import pickle

    for twin in (copy.deepcopy(held), pickle.loads(pickle.dumps(held))):  # no endless lookup
        assert twin.pi == math.pi


def test_the_core_holds_real_torch_once_it_is_used():
    import importlib

    import torch

    from gradguard import _lazy, stats

    rollback = importlib.import_module("gradguard.policies.rollback")

    assert stats.norm_dtype(torch.float16) is torch.float32  # a read through the core
    assert stats.torch is torch and rollback.torch is torch and _lazy.torch is torch
