"""AutoClip (Seetharaman et al. 2020) against its reference code, pseeth/autoclip, run through the
Guard's ``autoclip``.

Two sources, re-expressed (not copied):

- ``autoclip.py`` at pseeth/autoclip master, the paper's reference (Algorithm 1): after each
  backward, append the global norm (``sqrt(sum(p.grad.norm(2).item() ** 2))``) to the history,
  take ``numpy.percentile(history, clip_percentile)`` (the current norm included, linear
  interpolation) and ``torch.nn.utils.clip_grad_norm_(params, that)``. ``AutoClipOriginal`` below
  is that rule; the Guard's ``autoclip:percentile`` is claimed to be it (README), ``history=N``
  the same over the last N norms.
- the ``autoclip`` package that pseeth/autoclip's open PR (HesitantlyHuman, commit 8d121a3) adds,
  ``tests/torch/test_quantile.py``: its argument validation (``history_length`` -1, 5.0, 0, -100 and
  ``quantile`` -1.0, 5.0 refused; 0.0 and 1.0 accepted), its smoke runs (Linear(10,10)-ReLU-
  Linear(10,1), MSE to 10 on ``rand(10)``), its optimizer wrapper (``as_optimizer`` around AdamW
  and LBFGS -> ``gradguard.GuardedOptimizer``) and its state_dict save/load/pickle tests. Its
  ``QuantileClip`` computes the threshold from the history *before* the current norm (the first
  step is unclipped) and per parameter by default: a different rule from the paper's, so no
  step-by-step comparison with it is made; ``quantile`` q in [0, 1] is ``percentile`` 100q here.

Where the reference takes a NaN/Inf norm into its history (every later threshold is then NaN and
``clip_grad_norm_`` writes NaN into every gradient), the Guard by design skips the step and keeps
the norm out of its history (checked below).
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradguard

from tests.reference.harness import Recorder

PATHS = {"host": True, "device": False}


# ----- the reference rule ------------------------------------------------------------------------------
class AutoClipOriginal:
    """pseeth/autoclip ``autoclip.py``'s ``autoclip_gradient`` handler, with an optional window."""

    def __init__(self, percentile: float, window: int | None = None):
        self.percentile = percentile
        self.window = window
        self.history: list[float] = []

    def step(self, params) -> float:
        params = [p for p in params if p.grad is not None]
        total = sum(p.grad.detach().norm(2).item() ** 2 for p in params) ** 0.5
        self.history.append(total)
        if self.window is not None:
            self.history = self.history[-self.window :]
        clip_value = float(np.percentile(self.history, self.percentile))
        torch.nn.utils.clip_grad_norm_(params, clip_value)
        return clip_value


# ----- a training run, Guard and reference side by side ---------------------------------------------------
def mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3)
    ).to(dtype)


def batches(n=40, seed=0):
    """Regression batches with a few outliers (x100 inputs) so that the history has spikes."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(16, 8, generator=gen, dtype=torch.float64)
        if i in (7, 19, 31):
            x = x * 100
        out.append((x, torch.randn(16, 3, generator=gen, dtype=torch.float64)))
    return out


def side_by_side(spec, reference, dtype, path, steps=40, lr=0.05):
    ours = mlp(dtype)
    theirs = copy.deepcopy(ours)
    opt = torch.optim.SGD(ours.parameters(), lr=lr)
    ref_opt = torch.optim.SGD(theirs.parameters(), lr=lr)
    seen = []
    opt.register_step_pre_hook(
        lambda o, a, k: seen.append([p.grad.clone() for p in ours.parameters()])
    )
    guard = gradguard.Guard(ours, opt, spec, check_finite=PATHS[path])
    thresholds = []
    for x, y in batches(steps):
        for m, o in ((ours, opt), (theirs, ref_opt)):
            o.zero_grad()
            nn.functional.mse_loss(m(x.to(dtype)), y.to(dtype)).backward()
        report = guard.step()
        ref_thr = reference.step(list(theirs.parameters()))
        thresholds.append((report.metrics["autoclip.threshold"], ref_thr))
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        for got, p in zip(seen[-1], theirs.parameters(), strict=True):
            torch.testing.assert_close(got.double(), p.grad.double(), rtol=tol, atol=tol * 1e-3)
        ref_opt.step()
        # keep the two runs on the same weights (float rounding must not compound)
        with torch.no_grad():
            for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):
                a.copy_(b)
    return guard, thresholds


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("percentile", [0, 10, 25, 50, 90, 100])
def test_matches_the_reference_in_training(percentile, path):
    """The paper's default 10 and its neighbours, plus both ends: the threshold is
    numpy.percentile of every norm so far (the current one included), the clip torch's."""
    guard, thresholds = side_by_side(
        f"autoclip:{percentile}", AutoClipOriginal(percentile), torch.float32, path
    )
    for got, want in thresholds:
        assert got == pytest.approx(want, rel=1e-5)
    clipped = guard.counters["acted.autoclip"]
    # Not vacuous: below the median many steps clip; at 90-100 only the largest norms do.
    assert clipped >= (10 if percentile <= 50 else 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_matches_the_reference_in_other_dtypes(dtype):
    _, thresholds = side_by_side("autoclip:10", AutoClipOriginal(10), dtype, "host")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-6  # the Guard keeps its history in float32
    for got, want in thresholds:
        assert got == pytest.approx(want, rel=tol)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_window_matches_the_reference_over_its_last_norms(window):
    _, thresholds = side_by_side(
        f"autoclip:percentile=25,history={window}",
        AutoClipOriginal(25, window),
        torch.float32,
        "host",
    )
    for got, want in thresholds:
        assert got == pytest.approx(want, rel=1e-5)


def test_first_step_is_clipped_to_its_own_norm():
    """History [n]: the threshold is n and torch's factor n/(n + 1e-6) < 1, so the reference
    'clips' its very first step (by 1e-6 relative); the Guard does the same. (Its history is
    float32 whatever the gradients' dtype, as its docstring says: float64 thresholds agree to
    float32's 6e-8, not to the last bit.)"""
    ours = mlp(torch.float64)
    theirs = copy.deepcopy(ours)
    x, y = batches(1)[0]
    for m in (ours, theirs):
        nn.functional.mse_loss(m(x), y).backward()
    opt = Recorder(ours.parameters())
    report = gradguard.Guard(ours, opt, "autoclip:10").step()
    AutoClipOriginal(10).step(list(theirs.parameters()))
    for got, p in zip(opt.seen[-1], theirs.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-7, atol=0)
    assert report.clipped


def test_nonfinite_norm_skipped_instead_of_poisoning_the_history():
    """The reference appends a NaN norm: numpy.percentile is NaN from then on and clip_grad_norm_
    turns every later gradient into NaN. The Guard skips the step and its threshold stays the
    percentile of the finite norms."""
    model = mlp(torch.float32)
    opt = Recorder(model.parameters())
    guard = gradguard.Guard(model, opt, "autoclip:50")
    finite = []
    for i, (x, y) in enumerate(batches(6)):
        model.zero_grad()
        nn.functional.mse_loss(model(x.float()), y.float()).backward()
        if i == 2:
            next(model.parameters()).grad[0, 0] = math.nan
        report = guard.step()
        if i == 2:
            assert report.skipped and report.skip_reason == "nonfinite_grad"
            continue
        finite.append(report.grad_norm)
        assert report.metrics["autoclip.threshold"] == pytest.approx(
            float(np.percentile(finite, 50)), rel=1e-6
        )
    ref = AutoClipOriginal(50)
    ref.history = [1.0, math.nan]
    assert math.isnan(float(np.percentile(ref.history, 50)))  # what the reference would do


# ----- the autoclip package's tests (tests/torch/test_quantile.py) -------------------------------------
def package_model():
    return nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1))


@pytest.mark.parametrize("history", [-1, 5.0, 0, -100])
def test_bad_history_values(history):
    with pytest.raises(gradguard.SpecError, match="history"):
        gradguard.autoclip(history=history)
    if isinstance(history, float):
        # In a spec string numbers are written exactly: "5.0" is the integer five, accepted.
        assert gradguard.parse_spec(f"autoclip:history={history}")[0].history == 5
    else:
        with pytest.raises(gradguard.SpecError, match="history"):
            gradguard.parse_spec(f"autoclip:history={history}")


@pytest.mark.parametrize("quantile", [-1.0, 5.0])
def test_bad_quantile_values(quantile):
    with pytest.raises(gradguard.SpecError, match="percentile"):
        gradguard.autoclip(percentile=100 * quantile)


@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.9, 1.0])
def test_create_clipper(quantile):
    model = package_model()
    pol = gradguard.autoclip(percentile=100 * quantile, history=500)
    gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), pol)


@pytest.mark.parametrize(
    "kw", [{}, {"percentile": 50}, {"history": 500}, {"percentile": 50, "history": 500}]
)
def test_clip_global(kw):
    """run_clipping_test with global_threshold: one backward of the package's model, one step."""
    torch.manual_seed(0)
    model = package_model()
    guard = gradguard.Guard(
        model, torch.optim.SGD(model.parameters(), lr=0.1), gradguard.autoclip(**kw)
    )
    nn.functional.mse_loss(model(torch.rand(10)), torch.tensor([10.0])).backward()
    report = guard.step()
    assert not report.skipped and math.isfinite(report.grad_norm_after)


@pytest.mark.parametrize("kw", [{}, {"percentile": 50}, {"history": 500}])
def test_clip_wrapper_adamw(kw):
    """run_clipping_test_wrapper: as_optimizer(AdamW) -> GuardedOptimizer(AdamW); one step moves
    the weights."""
    torch.manual_seed(0)
    model = package_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = gradguard.GuardedOptimizer(
        torch.optim.AdamW(model.parameters()), model=model, policy=gradguard.autoclip(**kw)
    )
    nn.functional.mse_loss(model(torch.rand(10)), torch.tensor([10.0])).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.last_report is not None and not opt.last_report.skipped


def test_wrapper_around_lbfgs_is_refused_up_front():
    """test_create_optimizer_wrapper also wraps LBFGS. LBFGS re-evaluates the closure (and so the
    gradients) inside its step, where no Guard can see or clip them: refused at construction."""
    model = package_model()
    with pytest.raises(gradguard.ConfigError, match="needs a closure"):
        gradguard.GuardedOptimizer(
            torch.optim.LBFGS(model.parameters()), model=model, policy="autoclip"
        )
    with pytest.raises(gradguard.ConfigError, match="needs a closure"):
        gradguard.Guard(model, torch.optim.LBFGS(model.parameters()))


@pytest.mark.parametrize("path", PATHS)
def test_save_and_load_state_dict_resumes_the_same_history(path):
    """test_save_state_dict / test_load_state_dict / the pickling tests: the Guard's state
    round-trips through torch.save/torch.load(weights_only=True) into a fresh Guard, which then
    computes exactly the thresholds the uninterrupted one does."""
    data = batches(12)

    def run(guard, model, xs):
        out = []
        for x, y in xs:
            model.zero_grad()
            nn.functional.mse_loss(model(x.float()), y.float()).backward()
            out.append(guard.step().metrics["autoclip.threshold"])
        return out

    a = mlp(torch.float32)
    b = copy.deepcopy(a)
    ga = gradguard.Guard(
        a, Recorder(a.parameters()), "autoclip:percentile=30,history=8", check_finite=PATHS[path]
    )
    full = run(ga, a, data)
    gb = gradguard.Guard(
        b, Recorder(b.parameters()), "autoclip:percentile=30,history=8", check_finite=PATHS[path]
    )
    run(gb, b, data[:6])
    buf = io.BytesIO()
    torch.save(gb.state_dict(), buf)
    buf.seek(0)
    gc = gradguard.Guard(
        b, Recorder(b.parameters()), "autoclip:percentile=30,history=8", check_finite=PATHS[path]
    )
    gc.load_state_dict(torch.load(buf, weights_only=True))
    assert run(gc, b, data[6:]) == full[6:]
