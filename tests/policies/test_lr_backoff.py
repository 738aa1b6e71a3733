"""lr_backoff's incidents, and its optional loss test (``loss_z > 0``): a clipped spike counts
only where the step's loss is out of line too.

By default every spike counts (on a run whose LR is too high the gradient spikes come first:
docs/policies.md#the-default); with ``loss_z`` a spike whose loss is calm or falling (a network
whose gradient norm rises as it starts to learn, one hard batch) does not, while a skip, a
rollback and a loss-tested instability always do. Checked against a readable twin of the loss
test (median and median absolute deviation of the recent losses) and end to end on a Guard.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from torch import nn

import gradguard
from gradguard.errors import ConfigError, SpecError
from gradguard.policies import lr_backoff
from gradguard.policies.base import HostView, StepContext

from tests.helpers import TinyNet, data, train_step


def trend(past: list[float]) -> tuple[float, float]:
    """numpy's least-squares line through ``past`` (oldest first) at the next step, and the
    median absolute deviation of ``past`` about the line."""
    x = np.arange(len(past))
    slope, intercept = np.polyfit(x, past, 1)
    res = np.asarray(past) - (intercept + slope * x)
    return float(intercept + slope * len(past)), float(np.median(np.abs(res - np.median(res))))


def out_of_line(past: list[float], loss: float, z: float) -> bool:
    """The twin: above the trend of ``past`` by more than z robust standard deviations."""
    if z == 0 or len(past) < 8 or not math.isfinite(loss):
        return True
    pred, mad = trend(past)
    return loss > pred + z * 1.4826 * mad


def with_losses(p: lr_backoff, past: list[float]) -> lr_backoff:
    """``p`` with ``past`` as its recent losses (loaded as a saved state would be)."""
    p.load_state_dict({**p.state_dict(), "losses": list(past)})
    return p


def ctx_at(step: int, loss: float | None, **flags) -> StepContext:
    host = HostView(norm=1.0, finite=True, loss=loss)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    ctx = StepContext(step=step, stats=None, optimizer=opt, host=host)  # type: ignore[arg-type]
    for k, v in flags.items():
        setattr(ctx, k, v)
    return ctx


def test_the_loss_test_matches_its_twin():
    """Random windows, flat and falling, held in a ring that has wrapped or not."""
    rng = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(0, 40, (1,), generator=rng))
        slope = [0.0, -0.05, 0.02][trial % 3]
        past = (2.0 + slope * torch.arange(n) + 0.3 * torch.randn(n, generator=rng)).tolist()
        loss = float(2.0 + slope * n + 1.5 * torch.randn(1, generator=rng))
        z = [0.0, 1.0, 2.0, 3.5][trial % 4]
        window = [64, 16][trial % 2]
        p = lr_backoff(loss_z=z, loss_window=window)
        for step, v in enumerate(past):  # written one by one: a ring that wraps past 16
            p.apply(ctx_at(step, v))
        assert p.loss_out_of_line(loss) == out_of_line(past[-window:], loss, z), (past, loss, z)


def test_a_loss_jump_on_a_falling_curve_is_out_of_line_and_the_curve_itself_is_not():
    """Early in training the loss falls fast: a jump that is still below the window's median
    is out of line with its trend, and the next point of the curve is not."""
    falling = [3.0 - 0.06 * i + 0.01 * (-1) ** i for i in range(32)]
    p = with_losses(lr_backoff(loss_z=3), falling)
    median = statistics.median(falling)
    jump = falling[-1] + 0.3
    assert jump < median and p.loss_out_of_line(jump)
    assert not p.loss_out_of_line(falling[-1] - 0.06)
    p = with_losses(lr_backoff(loss_z=2), [1.0] * 10)
    assert p.loss_out_of_line(None)  # no loss given: it cannot be told, so it counts
    assert p.loss_out_of_line(float("nan"))


@pytest.mark.parametrize(
    "flags, loss, counts",
    [
        ({"anomaly": True}, 1.0, False),  # a spike with a calm loss
        ({"anomaly": True}, 5.0, True),  # a spike with the loss out of line
        ({"anomaly": True}, None, True),  # no loss: every spike counts
        ({"skip": True, "skip_reason": "nonfinite"}, 1.0, True),
        ({"skip": True, "skip_reason": "amp_overflow"}, 1.0, False),  # the scaler's, not ours
        ({"rollback": True}, 1.0, True),
        ({"unstable": True}, 1.0, True),  # tested against the loss by the policy that saw it
        ({}, 5.0, False),  # a high loss alone is no incident (that is rollback's runaway)
    ],
)
def test_what_counts(flags, loss, counts):
    p = with_losses(lr_backoff(loss_z=2), [1.0 + 0.01 * (i % 3) for i in range(32)])
    assert p.counts(ctx_at(40, loss, **flags)) is counts


def test_by_default_every_spike_counts_and_too_few_losses_count_too():
    for p in (lr_backoff(), lr_backoff(loss_z=0)):
        assert p.loss_z == 0
        with_losses(p, [1.0] * 32)
        assert p.counts(ctx_at(40, 0.5, anomaly=True))
    p = with_losses(lr_backoff(loss_z=2), [1.0] * 7)
    assert p.counts(ctx_at(40, 0.5, anomaly=True))


def test_losses_are_kept_to_the_window_finite_only():
    p = lr_backoff(loss_window=5)
    for step, loss in enumerate([1.0, float("inf"), 2.0, 3.0, float("nan"), 4.0, 5.0, 6.0]):
        p.apply(ctx_at(step, loss))
    assert p.state_dict()["losses"] == [2.0, 3.0, 4.0, 5.0, 6.0]


class Spiky(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(x)


def _run(losses: list[float], spikes: set[int], spec: str) -> list[float]:
    """A Guard with adaptive_clip+lr_backoff over steps whose gradient is multiplied by 1e3 at
    ``spikes`` (each one a clipped spike, an anomaly), with ``losses`` given as the step's loss."""
    torch.manual_seed(0)
    model = Spiky()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gradguard.Guard(model, opt, spec)
    x = torch.randn(16, 4)
    scales = []
    for step, loss in enumerate(losses):
        opt.zero_grad()
        (model(x) ** 2).mean().backward()
        if step in spikes:
            for p in model.parameters():
                p.grad.mul_(1e3)
        r = guard.step(loss=torch.tensor(loss))
        assert (r.metrics.get("adaptive_clip.spike") == 1.0) == (step in spikes)
        scales.append(r.lr_scale)
    return scales


def test_spikes_with_a_falling_loss_leave_the_lr_alone_and_with_a_loss_spike_cut_it():
    spikes = {20, 30}
    falling = [2.0 * 0.98**i for i in range(40)]
    spec = "adaptive_clip+lr_backoff:loss_z=3"
    assert _run(falling, spikes, spec) == [1.0] * 40
    jumping = [v * (4.0 if i in spikes else 1.0) for i, v in enumerate(falling)]
    scales = _run(jumping, spikes, spec)
    assert scales[:30] == [1.0] * 30 and scales[30] == 0.5  # the second incident cuts
    # By default the loss is not asked: the second spike cuts whatever the loss does.
    scales = _run(falling, spikes, "adaptive_clip+lr_backoff")
    assert scales[:30] == [1.0] * 30 and scales[30] == 0.5


def test_confirm_spares_spikes_the_loss_kept_falling_after_and_counts_the_rest():
    """``confirm=3``: each spike is judged on the 3 losses after it. Falling losses: no cut.
    Losses that stay up after each spike: the second spike's verdict, 3 steps after it, cuts."""
    spikes = {20, 30}
    falling = [2.0 * 0.98**i for i in range(40)]
    spec = "adaptive_clip+lr_backoff:confirm=3"
    assert _run(falling, spikes, spec) == [1.0] * 40
    up = [v * (4.0 if any(0 <= i - s < 5 for s in spikes) else 1.0) for i, v in enumerate(falling)]
    scales = _run(up, spikes, spec)
    assert scales[:33] == [1.0] * 33 and scales[33] == 0.5
    # Two spikes judged together (the second joined the first): both count at the verdict.
    close = {20, 21}
    up = [v * (4.0 if 20 <= i < 26 else 1.0) for i, v in enumerate(falling)]
    scales = _run(up, close, spec)
    assert scales[:23] == [1.0] * 23 and scales[23] == 0.5
    # Too few losses before the spike to tell its level: it counts at once, as without confirm.
    scales = _run(falling[:12], {3, 5}, spec)
    assert scales[:5] == [1.0] * 5 and scales[5] == 0.5


def test_a_judged_spike_survives_a_checkpoint():
    p = lr_backoff(confirm=4)
    for step in range(10):
        p.apply(ctx_at(step, 1.0))
    p.apply(ctx_at(10, 1.0, anomaly=True))
    p.apply(ctx_at(11, 2.0))
    sd = p.state_dict()
    assert sd["pending"] == {"step": 10, "level": 1.0, "count": 1, "after": [2.0]}
    q = lr_backoff(confirm=4)
    q.check_state(sd)
    q.load_state_dict(sd)
    assert q.state_dict() == sd
    for step in (12, 13, 14):
        q.apply(ctx_at(step, 2.0))
    assert q.state_dict()["recent"] == [14] and q.state_dict()["pending"] is None
    assert "pending" not in lr_backoff().state_dict()  # nothing held without confirm


@pytest.mark.parametrize(
    "pending, words",
    [
        ({"step": 1, "level": 1.0}, "pending"),
        ({"step": -1, "level": 1.0, "count": 1, "after": []}, "pending.step"),
        ({"step": 1, "level": float("nan"), "count": 1, "after": []}, "pending.level"),
        ({"step": 1, "level": 1.0, "count": 1, "after": [1.0] * 5}, "pending.after"),
        ("soon", "pending"),
    ],
)
def test_a_bad_saved_pending_spike_is_refused(pending, words):
    p = lr_backoff(confirm=4)
    with pytest.raises(ConfigError, match=words):
        p.check_state({**p.state_dict(), "pending": pending})


def test_state_round_trips_and_an_older_state_without_losses_loads():
    p = lr_backoff()
    for step in range(12):
        p.apply(ctx_at(step, 1.0 + step))
    sd = p.state_dict()
    q = lr_backoff()
    q.check_state(sd)
    q.load_state_dict(sd)
    assert q.state_dict() == sd and sd["losses"] == [1.0 + s for s in range(12)]
    old = {k: v for k, v in sd.items() if k != "losses"}
    q = lr_backoff()
    q.check_state(old)
    q.load_state_dict(old)
    assert q.state_dict()["losses"] == []


@pytest.mark.parametrize(
    "losses, words", [([float("nan")], "losses"), ([1.0] * 33, "loss_window=32"), ("1", "losses")]
)
def test_bad_saved_losses_are_refused(losses, words):
    p = lr_backoff()
    sd = {**p.state_dict(), "losses": losses}
    with pytest.raises(ConfigError, match=words):
        p.check_state(sd)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("lr_backoff:loss_z=-1", "loss_z"),
        ("lr_backoff:loss_z=inf", "loss_z"),
        ("lr_backoff:loss_z=true", "loss_z"),
        ("lr_backoff:loss_window=0", "loss_window"),
        ("lr_backoff:confirm=-1", "confirm"),
        ("lr_backoff:confirm=2.5", "confirm"),
    ],
)
def test_bad_parameters_are_refused(spec, words):
    with pytest.raises(SpecError, match=words):
        gradguard.Guard(Spiky(), torch.optim.SGD(Spiky().parameters(), lr=0.1), spec)


class Twin:
    """The backoff as it reads in plain Python: the steps of the recent incidents in a list, and
    (``confirm``) the spike being judged as a dict."""

    def __init__(self, factor, events, window, recover, min_scale, loss_z, loss_window, confirm):
        self.factor, self.events, self.window, self.recover = factor, events, window, recover
        self.min_scale, self.loss_z, self.loss_window = min_scale, loss_z, loss_window
        self.confirm, self.pending, self.outcomes = confirm, None, set()
        self.scale, self.recent, self.last, self.cuts, self.losses = 1.0, [], None, 0, []

    def judged(self, step, spike, loss):
        """(this step's spike counting at once, held spikes counting now)."""
        counted, held = 0, self.pending
        if held is not None:
            if math.isfinite(loss):
                held["after"].append(loss)
            if step - held["step"] >= self.confirm:
                after = held["after"]
                fell = bool(after) and statistics.median(after) < held["level"]
                self.outcomes.add(fell)
                counted, self.pending = (0 if fell else held["count"]), None
            elif spike:
                held["count"] += 1
                return False, 0
        if not spike or self.pending is not None:
            return False, counted
        if len(self.losses) >= 8 and math.isfinite(loss):
            level = statistics.median(self.losses)
            self.pending = {"step": step, "level": level, "count": 1, "after": []}
            return False, counted
        return True, counted

    def step(self, step, hard, anomaly, loss):
        recent = [s for s in self.recent if step - s < self.window]
        spike = anomaly and (loss is None or out_of_line(self.losses, loss, self.loss_z))
        counted = 0
        if self.confirm and loss is not None:
            spike, counted = self.judged(step, spike, loss)
        if loss is not None and math.isfinite(loss):
            self.losses = [*self.losses, loss][-self.loss_window :]
        k = int(hard or spike) + counted
        if k:
            recent += [step] * k
            self.last = step
            if len(recent) >= self.events:
                self.scale = max(self.scale * self.factor, self.min_scale)
                self.cuts += 1
                recent = []
        elif self.scale < 1.0 and (self.last is None or step - self.last >= self.window):
            self.scale = min(self.scale * (1 / self.factor) ** (1 / self.recover), 1.0)
        self.recent = recent
        return self.scale


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"events": 1, "window": 3, "recover": 4},
        {"events": 3, "window": 7, "recover": 5, "factor": 0.3, "min_scale": 0.05},
        {"loss_z": 2.0, "loss_window": 12, "events": 2, "window": 10, "recover": 6},
        {"confirm": 3},
        {"confirm": 1, "events": 3, "window": 12, "recover": 5},
        {"confirm": 5, "loss_z": 1.0, "loss_window": 10, "events": 2, "window": 20},
    ],
)
def test_the_rule_backs_off_as_its_twin(kw):
    """The rule (a ring of incident steps, written once for the host and Keras) against the list
    twin, over long random sequences of skips, spikes and losses: the same LR scale at every step
    and the same saved state."""
    p = lr_backoff(**kw)
    twin = Twin(
        p.factor, p.events, p.window, p.recover, p.min_scale, p.loss_z, p.loss_window, p.confirm
    )
    rng = torch.Generator().manual_seed(len(kw) + p.confirm)
    judged = 0
    for step in range(600):
        u = torch.rand(3, generator=rng).tolist()
        hard, anomaly = u[0] < 0.04, u[1] < 0.08
        loss = None if u[2] < 0.05 else (float("nan") if u[2] > 0.98 else 1.0 + u[2])
        if loss is not None and anomaly and u[2] > 0.6:
            loss = 10.0  # a spike whose loss is out of line
        ctx = ctx_at(step, loss, skip=hard, skip_reason="spike_grad_norm" if hard else None)
        ctx.anomaly = anomaly
        p.apply(ctx)
        assert ctx.lr_scale == pytest.approx(twin.step(step, hard, anomaly, loss), rel=1e-12)
        assert ctx.metrics["lr_scale"] == ctx.lr_scale
        sd = p.state_dict()
        assert sd["recent"] == twin.recent and sd["cuts"] == twin.cuts
        assert sd["last_event"] == twin.last and sd["losses"] == twin.losses
        assert sd.get("pending") == twin.pending
        judged += twin.pending is not None
        if step % 97 == 0:  # the saved state resumes the same rule
            q = lr_backoff(**kw)
            q.check_state(sd)
            q.load_state_dict(sd)
            assert q.state_dict() == sd
            p = q
    assert twin.cuts > 3
    assert bool(judged) == bool(p.confirm)
    assert twin.outcomes == ({True, False} if p.confirm else set())  # both verdicts were reached


def test_lr_backoff_scales_only_the_step():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard = gradguard.Guard(model, opt, "lr_backoff:factor=0.5,events=1,window=3,recover=4")
    for step in range(3):
        train_step(model, opt, *data(step))
        if step == 1:
            model.fc1.weight.grad[0, 0] = float("inf")
        r = guard.step()
    assert r.lr_scale == 0.5  # cut by the skip at step 1, still within the calm window
    # The scale applied to the update, and the group's lr is back to the scheduler's value.
    assert opt.param_groups[0]["lr"] == 0.5
    w = model.fc1.weight.detach().clone()
    train_step(model, opt, *data(5))
    g = model.fc1.weight.grad.clone()
    r = guard.step()
    torch.testing.assert_close(model.fc1.weight, w - 0.5 * r.lr_scale * g)
    # After the calm window the scale grows back: one cut undone over `recover` steps.
    scales = []
    for step in range(6, 14):
        train_step(model, opt, *data(step))
        scales.append(guard.step().lr_scale)
    assert scales == sorted(scales) and scales[-1] == 1.0
