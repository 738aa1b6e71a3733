"""Real training runs: a deep plain network on handwritten digits at a high LR goes non-finite
without a guard and trains with one; the CLI runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gradguard.cli import main
from gradguard.demo import load_digits_split, run_demo

pytestmark = pytest.mark.slow


def test_digits_split_is_standardized_and_stratified():
    x_tr, y_tr, x_te, y_te = load_digits_split()
    assert x_tr.shape[1] == 64 and len(x_tr) + len(x_te) == 1797
    assert abs(float(x_tr.mean())) < 1e-5
    for c in range(10):  # every class in both splits, in proportion
        assert abs(float((y_tr == c).float().mean()) - float((y_te == c).float().mean())) < 0.02


@pytest.mark.parametrize("seed", [0, 1])
def test_deep_plain_net_diverges_without_a_guard_and_trains_with_one(seed):
    bare = run_demo("none", lr=0.1, seed=seed)
    assert bare.nonfinite_weights  # the control: this setting really explodes

    default = run_demo("default", lr=0.1, seed=seed)
    assert not default.nonfinite_weights
    assert default.final_loss == default.final_loss  # finite, not NaN

    guarded = run_demo("skip_nonfinite+zclip+agc:0.01", lr=0.1, seed=seed)
    assert not guarded.nonfinite_weights
    assert guarded.test_accuracy > 0.85  # chance is 0.10
    assert guarded.clipped > 0


def test_cli_demo_prints_the_table(capsys):
    assert main(["demo", "--steps", "60", "--policy", "none", "--policy", "clip_norm:1.0"]) == 0
    out = capsys.readouterr().out
    assert "clip_norm:1.0" in out and "test acc" in out


def test_cli_bad_input_exits_2_with_one_line():
    for argv in (
        ["check", "clipnorm:1"],
        ["demo", "--policy", "zclip:alpha=7"],
        ["demo", "--lr", "-1"],
        ["nope"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "gradguard", *argv], capture_output=True, text=True
        )
        assert proc.returncode == 2, argv
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "error" in proc.stderr


def test_cli_lists_every_policy(capsys):
    from gradguard import available_policies

    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    for name in available_policies():
        assert f"{name}(" in out
