"""rollback's finite-runaway recovery (issue 14, item 3): when the loss runs away while the weights
stay finite, go back to a state from before the runaway, record the undone steps as skipped data,
back the LR off and restore it, with bounded retries; another policy can ask for the same."""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import shutil
import sys

import pytest
import torch

import gradguard
from gradguard import TrainingHalted
from gradguard.policies import Policy, StepContext

from tests.helpers import TinyNet, assert_same, set_grads, slow_except, snapshot

rb = sys.modules["gradguard.policies.rollback"]
#: High losses in a row that make a runaway (the default patience).
P = gradguard.rollback().patience
HIGH = [20.0] * P


class Run:
    """A Guard driven with given losses: every step gets a fixed random gradient (seeded by the
    step), and the weights and optimizer state before each step are kept (``before[t]``)."""

    def __init__(self, spec: str | list, *, lr: float = 0.01, momentum: float = 0.9):
        torch.manual_seed(0)
        self.model = TinyNet()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        self.guard = gradguard.Guard(self.model, self.opt, spec)
        self.pol = next(p for p in self.guard.policies if p.name == "rollback")
        self.before: list[dict] = []
        self.reports = []

    def step(self, loss: float | None, grads_seed: int | None = None):
        t = len(self.before)
        self.before.append(snapshot(self.model, self.opt))
        set_grads(self.model, t if grads_seed is None else grads_seed)
        r = self.guard.step(loss=None if loss is None else torch.tensor(loss))
        self.reports.append(r)
        return r

    def feed(self, losses):
        return [self.step(v) for v in losses]


def calm(n: int, seed: int = 0, level: float = 1.0) -> list[float]:
    """A level loss with +-5% noise."""
    gen = torch.Generator().manual_seed(seed)
    return (level * (1 + 0.05 * torch.randn(n, generator=gen))).tolist()


# ----- the trigger and what it restores --------------------------------------------------------------
@pytest.mark.parametrize(("start", "restored"), [(65, 60), (60, 50)])
def test_a_runaway_loss_with_finite_weights_rolls_back_to_a_state_from_before_it(start, restored):
    """Snapshots every 10 steps: the last two kept begin at steps 50 and 60. A runaway whose first
    high loss is step 65 goes back to 60; one whose first high loss is step 60 (the snapshot
    taken right after step 59 holds the update that made it) goes back to 50."""
    run = Run("rollback:every=10")
    reports = run.feed(calm(start) + HIGH)
    trigger = start + P - 1
    assert not any(r.skipped for r in reports[:trigger])  # the high steps were applied
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    r = reports[trigger]
    assert r.rolled_back and r.skipped and r.skip_reason == "runaway"
    assert_same(run.before[restored], snapshot(run.model, run.opt))
    assert r.metrics["rollback.skipped_from"] == restored
    assert r.metrics["rollback.skipped_to"] == trigger
    assert r.metrics["rollback.runaway_since"] == start
    assert run.pol.skipped_steps == [(restored, trigger)]
    assert run.pol.state["runaways"] == 1 and run.guard.counters["rolled_back"] == 1
    # Training goes on from there, on the next batches, with calm losses: no further rollback.
    assert not any(r.skipped for r in run.feed(calm(30, seed=1)))


def test_isolated_spikes_and_short_bursts_are_left_alone():
    run = Run("rollback:every=10")
    losses = calm(200)
    for t in (60, 90, 91, 130, 131, 150):  # one or two high losses: not `patience` in a row
        losses[t] = 50.0
    assert not any(r.rolled_back for r in run.feed(losses))
    assert run.pol.skipped_steps == []


# Fast: seeds 0 and 3, the two that catch the slackest triggers tried (no reset of the high
# count on a calm loss: seed 0 alone; patience=2,z=4: seed 3 alone).
@pytest.mark.parametrize("seed", slow_except(list(range(5)), 0, 3))
def test_a_healthy_noisy_loss_never_triggers(seed):
    """A decaying loss with heavy-tailed noise (log-normal, sigma 0.4: a step at 2x its level is
    common), and isolated 5x spikes."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(600, dtype=torch.float64)
    level = 2.0 * torch.exp(-t / 150) + 0.2
    losses = (
        level * torch.exp(0.4 * torch.randn(600, generator=gen, dtype=torch.float64))
    ).tolist()
    for i in torch.randint(50, 600, (6,), generator=gen).tolist():
        losses[i] *= 5
    run = Run("rollback:every=20")
    assert not any(r.rolled_back for r in run.feed(losses))


def test_without_a_loss_or_with_runaway_off_the_trigger_is_inactive():
    for spec, with_loss in (
        ("rollback:every=10", False),
        ("rollback:every=10,runaway=false", True),
    ):
        run = Run(spec)
        losses = calm(60) + HIGH * 5
        reports = [run.step(v if with_loss else None) for v in losses]
        assert not any(r.rolled_back for r in reports), spec
    assert run.pol.keep == 1 and len(run.pol.state["slots"]) == 1  # one snapshot without it


def test_a_nonfinite_loss_during_a_runaway_is_its_end():
    """The loss ran high for two steps, then went NaN: handled as the runaway (the snapshot from
    before it, an LR cut), not as an isolated NaN (the newest snapshot, no cut)."""
    run = Run("rollback:every=10")
    reports = run.feed([*calm(60), 20.0, 20.0, math.nan])
    assert reports[62].rolled_back
    assert_same(run.before[50], snapshot(run.model, run.opt))
    assert run.pol.state["lr_scale"] == 0.5 and run.pol.state["runaways"] == 1
    assert run.pol.skipped_steps == [(50, 62)]
    # An isolated NaN: the newest snapshot, no LR cut.
    run = Run("rollback:every=10")
    reports = run.feed([*calm(65), math.nan])
    assert reports[65].rolled_back and reports[65].skip_reason == "rollback"
    assert_same(run.before[60], snapshot(run.model, run.opt))
    assert run.pol.state["lr_scale"] == 1.0 and run.pol.skipped_steps == [(60, 65)]


# ----- skipped data ------------------------------------------------------------------------------------
def test_skipped_steps_are_recorded_merged_and_written_as_lightning_does(tmp_path):
    run = Run("rollback:every=10")
    first = 64 + P
    run.feed(calm(65) + HIGH)  # rolls back at `first` to the snapshot of step 60
    assert run.reports[first].rolled_back and run.pol.skipped_steps == [(60, first)]
    # The next step on it is calm, the P after it run away: back to it again, undoing those.
    second = first + 1 + P
    run.feed(calm(1, seed=1) + HIGH)
    assert run.reports[second].rolled_back
    assert_same(run.before[60], snapshot(run.model, run.opt))
    assert run.pol.skipped_steps == [(60, second)]  # adjacent ranges merged
    # 30 calm steps (snapshots after 10, 20 and 30 of them), then a runaway: the last snapshot
    # holds the update that made its first high loss, so back to the one before.
    run.feed(calm(30, seed=2) + HIGH)
    third, older = second + 30 + P, second + 21
    assert run.reports[third].rolled_back
    assert_same(run.before[older], snapshot(run.model, run.opt))
    assert run.pol.skipped_steps == [(60, second), (older, third)]
    path = run.pol.write_skip_batches(tmp_path)
    assert path == tmp_path / "skip_batches.json"
    want = [*range(60, second + 1), *range(older, third + 1)]
    assert json.loads(path.read_text()) == want  # a JSON list of batch indices, as Lightning's
    other = rb.write_skip_batches([[3, 4], (1, 1)], tmp_path / "sub" / "mine.json")
    assert json.loads(other.read_text()) == [1, 3, 4]


# ----- the LR -----------------------------------------------------------------------------------------
def test_the_lr_is_backed_off_then_restored_around_the_step_only():
    """Plain SGD with fixed gradients of one: every applied step moves a weight by -lr x scale."""
    run = Run("rollback:every=10,lr_recover=10", lr=0.1, momentum=0.0)

    def ones_step(loss):
        w = run.model.fc1.weight.detach().clone()
        run.before.append(None)
        for p in run.model.parameters():
            p.grad = torch.ones_like(p)
        r = run.guard.step(loss=torch.tensor(loss))
        moved = float((run.model.fc1.weight.detach() - w)[0, 0])
        return r, moved

    for v in calm(65):
        r, moved = ones_step(v)
        assert r.lr_scale == 1.0 and moved == pytest.approx(-0.1, rel=1e-5)
    for _ in range(P):
        r, _ = ones_step(20.0)
    assert r.rolled_back
    scales = []
    for v in calm(12, seed=2):
        r, moved = ones_step(v)
        assert moved == pytest.approx(-0.1 * r.lr_scale, rel=1e-5)
        assert run.opt.param_groups[0]["lr"] == 0.1  # schedulers see their own LR
        scales.append(r.lr_scale)
    assert scales[0] == 0.5  # cut by lr_factor
    assert all(a < b for a, b in itertools.pairwise(scales[:11]))  # grown back...
    assert scales[10] == pytest.approx(1.0) and scales[11] == 1.0  # ...in lr_recover steps


# ----- bounded retries -----------------------------------------------------------------------------
def test_retries_are_bounded_then_the_run_is_halted_clearly():
    run = Run("rollback:every=10,max_consecutive=2")
    reports = run.feed(calm(60) + HIGH * 2)
    assert [t for t, r in enumerate(reports) if r.rolled_back] == [59 + P, 59 + 2 * P]
    assert run.pol.state["lr_scale"] == 0.25
    run.feed(HIGH[1:])
    with pytest.raises(TrainingHalted, match=r"loss ran away .* 3 times in a row") as e:
        run.step(20.0)
    assert e.value.reason == "runaway_exhausted"
    assert "max_consecutive=2" in str(e.value) and "lower the learning rate" in str(e.value)


def test_the_total_number_of_runaways_is_capped():
    run = Run("rollback:every=5,max_runaways=2,max_consecutive=9")
    run.feed(calm(60))
    for k in range(2):  # a runaway, then calm long enough for new snapshots (retries start over)
        reports = run.feed(HIGH + calm(20, seed=k + 1))
        assert reports[P - 1].rolled_back
    run.feed(HIGH[1:])
    with pytest.raises(TrainingHalted, match="max_runaways=2") as e:
        run.step(20.0)
    assert e.value.reason == "runaway_exhausted"


# ----- another policy's request ----------------------------------------------------------------------
class RatioAlarm(Policy):
    """A stand-in for an update-ratio monitor: asks for a rollback at given steps."""

    name = "ratio_alarm"

    def __init__(self, at: set[int], kind: str):
        super().__init__()
        self.at = at
        self.kind = kind  # "skip": before rollback in the chain; "react": after it

    def apply(self, ctx: StepContext) -> None:
        if ctx.step in self.at:
            ctx.request_rollback("update_ratio")


@pytest.mark.parametrize("kind", ["skip", "react"])
def test_another_policy_can_request_the_rollback(kind):
    """Before rollback in the chain, or after it (the Guard then hands the request over before
    the update): the same recovery as a runaway, with the request's reason."""
    alarm = RatioAlarm({65}, kind)
    chain = [alarm, "rollback:every=10"] if kind == "skip" else ["rollback:every=10", alarm]
    run = Run(chain)
    reports = run.feed(calm(65))
    before = snapshot(run.model, run.opt)  # the weights the bad update would have moved
    r = run.step(1.0)
    assert r.rolled_back and r.skipped and r.skip_reason == "update_ratio"
    assert_same(run.before[60], snapshot(run.model, run.opt))
    assert not torch.equal(before["params"][0], run.before[60]["params"][0])
    assert run.pol.skipped_steps == [(60, 65)] and run.pol.state["lr_scale"] == 0.5
    assert not any(r.rolled_back for r in reports + run.feed(calm(10, seed=1)))


def test_a_request_works_without_a_loss_and_its_lr_cut_is_undone():
    run = Run(["rollback:every=10,lr_recover=5", RatioAlarm({30}, "react")])
    reports = [run.step(None) for _ in range(40)]
    assert [t for t, r in enumerate(reports) if r.rolled_back] == [30]
    # The snapshot taken after step 29 holds the update the alarm is about: the one before it.
    assert run.pol.skipped_steps == [(20, 30)]
    assert [r.lr_scale for r in reports[31:37]] == pytest.approx(
        [0.5, 0.5 * 2**0.2, 0.5 * 2**0.4, 0.5 * 2**0.6, 0.5 * 2**0.8, 1.0]
    )


def test_a_request_without_rollback_in_the_chain_is_ignored():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gradguard.Guard(model, opt, ["skip_nonfinite", RatioAlarm({3}, "skip")])
    for t in range(5):
        set_grads(model, t)
        assert not guard.step(loss=1.0).skipped


# ----- disk: the older snapshot is in last_good.prev.pt -----------------------------------------------
def test_on_disk_the_older_snapshot_is_restored_and_becomes_the_newest(tmp_path):
    run = Run(f"rollback:every=10,to=disk,path={tmp_path}")
    run.feed(calm(60) + HIGH)
    assert_same(run.before[50], snapshot(run.model, run.opt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_good.pt"]
    assert rb.read_snapshot_meta(tmp_path / "last_good.pt")["begin"] == 50
    run.feed(calm(20, seed=3))  # training goes on; the next snapshots rotate again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_good.prev.pt", "last_good.pt"]


# ----- state -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("to", ["memory", "disk"])
def test_the_state_round_trips_mid_recovery_and_resumes_identically(to, tmp_path):
    """Saved mid-recovery (the LR cut, a range skipped, two snapshots kept), loaded with
    ``weights_only=True`` into a fresh Guard: the same decisions and weights from there."""
    disk = ",to=disk,path={}"
    spec = "rollback:every=10,lr_recover=50"
    run = Run(spec + (disk.format(tmp_path / "a") if to == "disk" else ""))
    run.feed(calm(65) + HIGH + calm(10, seed=1))  # rolled back at `back`, then 10 calm steps
    back = 64 + P
    saved = run.pol.state_dict()
    assert saved["lr_scale"] < 1.0 and saved["skipped"] == [[60, back]]
    assert [s["begin"] for s in saved["slots"]] == [back + 1, back + 11]
    assert len(saved["losses"]) == 60 + 10  # the window of the snapshot restored, then 10 more
    buf = io.BytesIO()
    torch.save(run.guard.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    if to == "disk":  # the resumed run finds the files where the first left them
        shutil.copytree(tmp_path / "a", tmp_path / "b")
    twin = Run(spec + (disk.format(tmp_path / "b") if to == "disk" else ""))
    twin.model.load_state_dict(run.model.state_dict())
    twin.opt.load_state_dict(copy.deepcopy(run.opt.state_dict()))  # else it shares the buffers
    twin.guard.load_state_dict(loaded)
    assert twin.pol.state == run.pol.state
    assert len(twin.pol._snaps) == 2
    # The same losses and gradients from here: the same decisions and weights. The runaway after
    # 5 more calm steps goes back to the newest snapshot.
    for v in calm(5, seed=2) + HIGH + calm(5, seed=4):
        t = len(run.before)
        a, b = run.step(v, grads_seed=t), twin.step(v, grads_seed=t)
        assert (a.rolled_back, a.lr_scale) == (b.rolled_back, b.lr_scale)
    assert_same(snapshot(run.model, run.opt), snapshot(twin.model, twin.opt))
    again = back + 15 + P
    assert run.reports[again].rolled_back
    assert run.pol.skipped_steps == twin.pol.skipped_steps == [(60, back), (back + 11, again)]


# ----- real runs: the bench's training loop --------------------------------------------------------
BURST = "lr_burst:factor=100,steps=10,at={at}"


def bench_run(mitigation: str, faults: str = "none", seed: int = 0, **kw):
    from gradguard.bench.config import RunConfig
    from gradguard.bench.train import train_run

    cfg = {
        "task": "digits",
        "model": "mlp",
        "optimizer": "momentum",
        "lr": 0.03,
        "steps": 150,
        "batch_size": 64,
        "model_options": {"depth": 6, "width": 32},
        "mitigation": mitigation,
        "faults": faults,
        "seed": seed,
    }
    return train_run(RunConfig.from_dict(cfg | kw))[0]


@pytest.mark.parametrize("seed", range(3))
def test_healthy_real_runs_never_roll_back(seed):
    """The bench's loop on real data with the trigger armed: noisy minibatch losses, no runaway.
    (docs/policies.md: 27 longer runs of the MLP, CNN, RNNs and GPT, none fired.)"""
    result = bench_run("skip_nonfinite+zclip+rollback", seed=seed)
    assert result["interventions"]["rolled_back"] == 0 and result["skipped_data"] == []


def test_an_lr_burst_that_ruins_the_run_is_rolled_back_and_the_run_ends_near_clean():
    """A 6-layer MLP on digits, 150 steps, the LR x100 for steps 100..109 (a ZClip chain alone ends
    at chance: test_the_burst_ruins_a_run_without_rollback). With rollback, the runaway is caught,
    the burst's steps are skipped, and the run ends within 0.03 of the same run without the
    fault; that clean run never rolls back."""
    clean = bench_run("skip_nonfinite+zclip+rollback")
    assert clean["interventions"]["rolled_back"] == 0 and clean["skipped_data"] == []
    burst = bench_run("skip_nonfinite+zclip+rollback", BURST.format(at=100))
    assert burst["interventions"]["rolled_back"] >= 1 and not burst["diverged"]
    (start, end), *more = burst["skipped_data"]
    assert start == 100 and 100 + P - 1 <= end < 100 + 10 + 2 * P and not more
    assert burst["test_metric"] >= clean["test_metric"] - 0.03


@pytest.mark.slow
def test_the_burst_ruins_a_run_without_rollback():
    ruined = bench_run("skip_nonfinite+zclip", BURST.format(at=100))
    assert ruined["diverged"] and ruined["test_metric"] < 0.2


QUICK = {"steps": 300, "model_options": {"depth": 12, "width": 64}}


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_on_the_faults_suite_setting_rollback_holds_the_lr_burst(seed):
    """The faults suite's digits setting (the quick suite's 12-layer MLP, LR 0.03, 300 steps):
    the burst at step 200 leaves the weights finite but the run at chance behind ZClip alone; with
    rollback the run ends near its clean twin, which never rolls back."""
    clean = bench_run("skip_nonfinite+zclip+rollback", seed=seed, **QUICK)
    assert clean["interventions"]["rolled_back"] == 0
    burst = bench_run("skip_nonfinite+zclip+rollback", BURST.format(at=200), seed=seed, **QUICK)
    assert burst["skipped_data"][0][0] == 200 and not burst["diverged"]
    assert burst["test_metric"] >= clean["test_metric"] - 0.03


@pytest.mark.slow
def test_gradguard_train_writes_skip_batches_json(tmp_path, capsys):
    from gradguard.cli import main

    args = ["train", "--optimizer", "momentum", "--lr", "0.03", "--steps", "150"]
    args += ["--mitigation", "skip_nonfinite+zclip+rollback", "--faults", BURST.format(at=100)]
    assert main([*args, "--out", str(tmp_path)]) == 0
    skipped = json.loads((tmp_path / "skip_batches.json").read_text())
    assert skipped[0] == 100 and skipped == list(range(100, skipped[-1] + 1))
    assert "skip_batches.json" in capsys.readouterr().out


def test_skip_batches_json_is_byte_for_byte_what_lightnings_spike_detection_writes(tmp_path):
    """Against Lightning's own writer (``lightning.fabric.utilities.spike.SpikeDetection``)."""
    spike_mod = pytest.importorskip("lightning.fabric.utilities.spike")
    ranges = [(3, 5), (9, 12)]
    steps = rb.skip_batches(ranges)

    class Fabric:  # the one attribute Lightning's writer reads
        global_rank = 0

    theirs = spike_mod.SpikeDetection(exclude_batches_path=str(tmp_path / "lightning.json"))
    theirs.bad_batches = steps[:-2]  # its writer appends the spike's batch and the one before it
    with pytest.raises(spike_mod.TrainingSpikeException):
        theirs._handle_spike(Fabric(), steps[-1])
    ours = rb.write_skip_batches(ranges, tmp_path / "ours.json")
    assert ours.read_bytes() == (tmp_path / "lightning.json").read_bytes()
