"""Rerun attribution (``guard.step(replay=...)``): a failing step is rerun once and classified as
Megatron-LM's rerun state machine does, reproducible (the data or the model) or transient
(hardware, nondeterminism); the chain acts on it (``rollback:on=reproducible``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradguard
from gradguard.diagnose import html as report
from gradguard.diagnose.localize import RERUN_RTOL, Localization, attribute
from gradguard.diagnose.records import load_run
from gradguard.diagnose.rerun import rerun_sentence
from gradguard.errors import GradGuardError
from gradguard.policies.rollback import rollback

F = nn.functional


class Counted:
    """A replay closure that counts its calls."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y, self.calls = model, x, y, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return F.mse_loss(self.model(self.x), self.y)


def setup(policy: str = "default", seed: int = 0, dropout: float = 0.0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, opt, gradguard.Guard(model, opt, policy=policy, **kw)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


def step(model, opt, guard, x, y, *, replay=True, poison_grad=False, scale_grad=None):
    """One training step; ``poison_grad``: a NaN planted in one gradient after backward (a
    transient fault the rerun does not see); ``scale_grad``: the gradients multiplied after
    backward (a transient spike)."""
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    if poison_grad:
        model[0].weight.grad[0, 0] = math.nan
    if scale_grad is not None:
        for p in model.parameters():
            p.grad.mul_(scale_grad)
    closure = Counted(model, x, y) if replay else None
    return guard.step(loss=loss, replay=closure), closure


def warm(model, opt, guard, n: int = 12) -> None:
    for i in range(n):
        step(model, opt, guard, *batch(100 + i))


# ----- classification ---------------------------------------------------------------------------


def test_a_nan_in_the_batch_is_reproducible_and_its_origin_found():
    model, opt, guard = setup()
    warm(model, opt, guard, 2)
    x, y = batch(1)
    x[3, 1] = math.nan
    r, closure = step(model, opt, guard, x, y)
    assert r.rerun == "reproducible" and r.skipped
    assert r.rerun_detail["trigger"] == "nonfinite"
    assert r.localization is not None and r.localization["origin"] == "(input)"
    assert closure.calls == 1  # one rerun gives both the origin and the attribution


def test_a_weight_dependent_overflow_is_reproducible():
    model, opt, guard = setup()
    with torch.no_grad():
        model[3].weight.fill_(3e38)  # finite weights whose output overflows float32
    r, _ = step(model, opt, guard, *batch(1))
    assert r.rerun == "reproducible"
    assert r.localization["origin"] == "3" and r.localization["phase"] == "forward"


def test_a_nan_planted_in_the_gradients_once_is_transient():
    model, opt, guard = setup()
    warm(model, opt, guard, 2)
    r, closure = step(model, opt, guard, *batch(1), poison_grad=True)
    assert r.rerun == "transient" and r.skipped and closure.calls == 1
    assert math.isfinite(r.rerun_detail["grad_norm"]) and math.isfinite(r.rerun_detail["loss"])
    assert r.localization["phase"] == "none"  # the rerun found nothing non-finite


def test_without_replay_there_is_no_rerun():
    model, opt, guard = setup()
    r, _ = step(model, opt, guard, *batch(1), replay=False, poison_grad=True)
    assert r.skipped and r.rerun is None and r.rerun_detail is None and r.localization is None


def test_a_healthy_step_never_calls_the_replay():
    model, opt, guard = setup("default+skip_spike+zclip")
    for i in range(30):
        r, closure = step(model, opt, guard, *batch(i))
        assert closure.calls == 0 and r.rerun is None and not r.skipped


@pytest.mark.parametrize("spec", ["skip_spike:window=16,on=grad_norm", "zclip:warmup=8"])
def test_a_flagged_spike_is_rerun_and_classified(spec):
    # The same batch spiking again (its inputs scaled) is reproducible; gradients scaled after
    # backward (the rerun recomputes them clean) are transient.
    model, opt, guard = setup(spec, check_finite=True)
    warm(model, opt, guard, 16)
    x, y = batch(1)
    r, closure = step(model, opt, guard, x * 300, y * 300)
    assert closure.calls == 1 and r.rerun == "reproducible"
    assert r.rerun_detail["trigger"] == "spike"
    assert r.rerun_detail["grad_norm"] == pytest.approx(r.grad_norm, rel=1e-5)
    assert r.localization is None  # nothing non-finite to localize
    r, closure = step(model, opt, guard, *batch(2), scale_grad=300.0)
    assert closure.calls == 1 and r.rerun == "transient"
    assert r.rerun_detail["grad_norm"] < r.grad_norm / 10


def test_the_rule_compares_within_the_tolerance():
    def loc(norm, loss):
        return Localization("", "none", [], {"grad_norm": norm, "loss": loss})

    assert attribute("spike", 10.0, 1.0, loc(10.0 * (1 + RERUN_RTOL / 2), 1.0)) == "reproducible"
    assert attribute("spike", 10.0, 1.0, loc(10.0 * (1 + 2 * RERUN_RTOL), 1.0)) == "transient"
    assert attribute("spike", 10.0, 1.0, loc(10.0, 1.5)) == "transient"  # the loss differs
    assert attribute("spike", 10.0, None, loc(10.0, 1.5)) == "reproducible"  # no loss to compare
    assert attribute("spike", 10.0, 1.0, loc(math.inf, 1.0)) == "reproducible"
    assert attribute("nonfinite", math.nan, None, loc(None, math.nan)) == "reproducible"
    assert attribute("nonfinite", math.nan, None, loc(3.0, 1.0)) == "transient"
    with pytest.raises(ValueError):
        attribute("other", 1.0, None, loc(1.0, 1.0))


# ----- the rerun leaves the run as it was ---------------------------------------------------------


def test_the_rerun_changes_nothing_in_the_run():
    # Two identical runs with dropout (the replay draws masks), one given replays: a transient
    # NaN and a zclip spike that is clipped and taken are rerun in one. The weights, the RNG state
    # and the gradients left on the last step must be bit-identical.
    runs = []
    for with_replay in (False, True):
        model, opt, guard = setup("default+zclip:warmup=8", dropout=0.3)
        calls = 0
        for i in range(20):
            x, y = batch(i)
            kw = {"poison_grad": i == 12, "scale_grad": 300.0 if i == 15 else None}
            r, closure = step(model, opt, guard, x, y, replay=with_replay, **kw)
            calls += closure.calls if closure else 0
            if with_replay and i in (12, 15):
                assert r.rerun == "transient"
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        if with_replay:
            before = (copy.deepcopy(model.state_dict()), grads, torch.get_rng_state())
            from gradguard.diagnose.localize import replay

            replay(model, Counted(model, x, y), measure=list(model.parameters()))
            after = (
                model.state_dict(),
                [p.grad for p in model.parameters()],
                torch.get_rng_state(),
            )
            for a, b in zip(before[0].values(), after[0].values(), strict=True):
                assert torch.equal(a, b)
            for a, b in zip(before[1], after[1], strict=True):
                assert torch.equal(a, b)
            assert torch.equal(before[2], after[2])
        runs.append((model.state_dict(), grads, torch.get_rng_state(), calls))
    (w0, g0, rng0, _), (w1, g1, rng1, calls) = runs
    assert calls == 2
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    for a, b in zip(g0, g1, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rng0, rng1)


# ----- the chain acts on it: rollback:on=reproducible ----------------------------------------------


def test_rollback_on_reproducible_rolls_back_only_a_reproducible_failure():
    model, opt, guard = setup("rollback:every=2,on=reproducible")
    rb = next(p for p in guard.policies if p.name == "rollback")
    warm(model, opt, guard, 4)
    r, _ = step(model, opt, guard, *batch(1), poison_grad=True)
    assert r.rerun == "transient" and r.skipped and not r.rolled_back
    assert r.skip_reason == "nonfinite_grad" and rb.skipped_steps == []
    x, y = batch(2)
    x[0, 0] = math.nan
    r, _ = step(model, opt, guard, x, y)
    assert r.rerun == "reproducible" and r.rolled_back
    assert rb.skipped_steps and rb.skipped_steps[-1][1] == r.step  # its data recorded as skipped


def test_rollback_on_reproducible_acts_on_a_reproduced_spike():
    model, opt, guard = setup("skip_spike:window=16,on=grad_norm+rollback:every=4,on=reproducible")
    rb = next(p for p in guard.policies if p.name == "rollback")
    warm(model, opt, guard, 16)
    r, _ = step(model, opt, guard, *batch(2), scale_grad=300.0)
    assert r.rerun == "transient" and r.skipped and not r.rolled_back
    x, y = batch(1)
    r, _ = step(model, opt, guard, x * 300, y * 300)
    assert r.rerun == "reproducible" and r.rolled_back
    assert rb.skipped_steps[-1][1] == r.step


def test_rollback_default_rolls_back_either_way_and_without_replay():
    for replay in (True, False):
        model, opt, guard = setup("rollback:every=2")
        warm(model, opt, guard, 4)
        r, _ = step(model, opt, guard, *batch(1), poison_grad=True, replay=replay)
        assert r.rolled_back and r.rerun == ("transient" if replay else None)
    model, opt, guard = setup("rollback:every=2,on=reproducible")
    warm(model, opt, guard, 4)
    r, _ = step(model, opt, guard, *batch(1), poison_grad=True, replay=False)
    assert r.rolled_back  # no attribution: as on=any


def test_rollback_on_is_validated():
    with pytest.raises(GradGuardError, match="on='transient' is not one of any, reproducible"):
        setup("rollback:on=transient")
    with pytest.raises(GradGuardError, match="on must be 'any'"):
        rollback(on="transient")
    assert "on=reproducible" in setup("rollback:on=reproducible")[2].spec


# ----- telemetry and the report ----------------------------------------------------------------------


def test_telemetry_records_the_rerun_and_the_report_says_it(tmp_path):
    model, opt, guard = setup(log_dir=tmp_path)
    warm(model, opt, guard, 3)
    step(model, opt, guard, *batch(1), poison_grad=True)
    x, y = batch(2)
    x[0, 0] = math.nan
    step(model, opt, guard, x, y)
    guard.close()
    run = load_run(tmp_path)
    reruns = {s["step"]: s["rerun"] for s in run.steps if s.get("rerun")}
    assert {k: v["result"] for k, v in reruns.items()} == {3: "transient", 4: "reproducible"}
    assert all(s["rerun"] is None for s in run.steps if s["step"] < 3)
    text = report.terminal_summary(run, [])
    assert (
        "step 3 was rerun: the NaN did not recur (transient: hardware or nondeterminism; "
        "the step was skipped)" in text
    )
    assert "step 4 was rerun: the NaN recurred (reproducible: the data or the model;" in text
    html = report.write_report(tmp_path).read_text()
    assert "step 3 was rerun: the NaN did not recur" in html


def test_old_step_records_without_the_field_read_as_not_rerun():
    assert rerun_sentence({"type": "step", "step": 1, "skipped": True}) is None
    assert rerun_sentence({"type": "step", "step": 1, "rerun": None}) is None


def test_the_sentence_says_what_recurred_and_what_the_guard_did():
    spike = {"step": 7, "skip_reason": "spike_loss", "skipped": True, "rolled_back": True}
    spike["rerun"] = {"result": "reproducible", "trigger": "spike"}
    assert rerun_sentence(spike) == (
        "step 7 was rerun: the loss spike recurred (reproducible: the data or the model; the model "
        "was rolled back and the step's data recorded as skipped)"
    )
    inf = {"step": 2, "grad_norm": math.inf, "loss": 1.0, "skipped": True}
    inf["rerun"] = {"result": "transient", "trigger": "nonfinite"}
    assert rerun_sentence(inf).startswith("step 2 was rerun: the Inf did not recur (transient")
    clipped = {"step": 4, "clipped": True, "rerun": {"result": "transient", "trigger": "spike"}}
    assert rerun_sentence(clipped).endswith("the step was clipped and taken)")


def test_before_step_and_after_step_attribute_too():
    model, opt, guard = setup()
    x, y = batch(1)
    x[0, 0] = math.nan
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    pending = guard.before_step(loss=loss, replay=Counted(model, x, y))
    assert pending.ctx.rerun == "reproducible" and not pending.stepped
    assert guard.after_step(pending).rerun == "reproducible"
