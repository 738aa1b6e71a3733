"""``Guard(sync_free=True)``: the skip decided on the device and handed to the fused optimizer's
step as its ``found_inf`` flag. On CPU: the same weights, optimizer state, reports and counters
as the host-decided Guard and as torch's own loop, bit for bit, and no host read inside a step
(the CUDA sync count is tests/test_cuda.py's)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradguard
from gradguard import ConfigError, GradGuardError, StallError

from tests.helpers import TinyNet, data

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
    "sgd_nesterov": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, fused=True
    ),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05, fused=True),
}
#: Steps whose gradient (or loss) is made non-finite: the first step too, which a sync_free
#: Guard decides on the host (the optimizer has no state yet), then steps in a row.
BAD_GRAD, BAD_LOSS = {0, 5, 6, 13}, {9}
SPEC = "skip_nonfinite+clip_norm:0.5"


def held(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The weights and every optimizer state tensor, cloned, in a fixed order."""
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        for _k, v in sorted(opt.state.get(p, {}).items()):
            out.append(torch.as_tensor(v).detach().clone())
    return out


def batch_step(model: nn.Module, step: int) -> torch.Tensor:
    """One forward/backward on a fixed batch; the step's faults injected."""
    model.zero_grad(set_to_none=True)
    x, y = data(seed=step)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    if step in BAD_GRAD:
        model.fc2.weight.grad[0, 0] = float("nan")
    if step in BAD_LOSS:
        loss = loss.detach() * float("inf")
    return loss


def train(name: str, steps: int = 20, **guard_kw):
    torch.manual_seed(0)
    model = TinyNet()
    opt = OPTIMIZERS[name](model.parameters())
    guard = gradguard.Guard(model, opt, guard_kw.pop("spec", SPEC), **guard_kw)
    reports, states = [], []
    for step in range(steps):
        loss = batch_step(model, step)
        reports.append(guard.step(loss=loss))
        states.append(held(model, opt))
    return guard, reports, states


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sync_free_takes_the_host_decided_guards_steps_bit_for_bit(name):
    ref_guard, ref_reports, ref_states = train(name)
    guard, reports, states = train(name, sync_free=True)
    for step, (a, b) in enumerate(zip(ref_states, states, strict=True)):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (
            f"step {step}"
        )
    for a, b in zip(ref_reports, reports, strict=True):
        assert (a.skipped, a.skip_reason, a.clipped, a.grad_norm_after) == (
            b.skipped,
            b.skip_reason,
            b.clipped,
            b.grad_norm_after,
        )
    assert [r.skipped for r in reports] == [s in BAD_GRAD | BAD_LOSS for s in range(20)]
    assert guard.counters == ref_guard.counters


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum"])
def test_a_taken_step_is_torchs_own_and_a_skipped_one_changes_nothing(name):
    """Against the plain loop: ``clip_grad_norm_`` then the fused step, or no step at all."""
    torch.manual_seed(0)
    model = TinyNet()
    ref = copy.deepcopy(model)
    opt, opt_ref = OPTIMIZERS[name](model.parameters()), OPTIMIZERS[name](ref.parameters())
    guard = gradguard.Guard(model, opt, SPEC, sync_free=True)
    for step in range(20):
        loss = batch_step(model, step)
        batch_step(ref, step)
        before = held(model, opt)
        report = guard.step(loss=loss)
        if step in BAD_GRAD | BAD_LOSS:
            assert report.skipped
            after = held(model, opt)
            assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
            # The optimizer keeps state for a parameter it never stepped: as at its start.
            continue
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt_ref.step()
        for a, b in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.equal(a, b), f"step {step}"


class _NoHostRead:
    """Fails the test on any read of a tensor's value to the host (the CPU stand-in for a CUDA
    sync): ``item``, ``tolist``, ``bool``, ``float``, ``int``."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.reads: list[str] = []

    def __enter__(self):
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def spy(t, *a, _real=real, _name=name, **kw):
                self.reads.append(_name)
                return _real(t, *a, **kw)

            self.monkeypatch.setattr(torch.Tensor, name, spy)
        return self

    def __exit__(self, *exc):
        self.monkeypatch.undo()  # every spy at once


@pytest.mark.parametrize("spec", [SPEC, "skip_nonfinite+zclip", "skip_nonfinite+agc:0.05"])
def test_a_sync_free_step_reads_nothing_to_the_host(spec, monkeypatch):
    torch.manual_seed(0)
    model = TinyNet()
    opt = OPTIMIZERS["adamw"](model.parameters())
    guard = gradguard.Guard(model, opt, spec, sync_free=True, max_consecutive_skips=None)
    for step in range(30):
        loss = batch_step(model, step)
        if step < 15:
            guard.step(loss=loss)
            continue
        with _NoHostRead(monkeypatch) as spy:
            report = guard.step(loss=loss)
        assert spy.reads == [], f"step {step}: {spy.reads}"
        assert report.skipped == (step in BAD_GRAD | BAD_LOSS)  # read after: here it syncs
    # The host-decided Guard does read: the spy sees it.
    guard = gradguard.Guard(model, opt, spec)
    loss = batch_step(model, 30)
    with _NoHostRead(monkeypatch) as spy:
        guard.step(loss=loss)
    assert spy.reads


def test_a_stall_is_caught_within_two_of_its_periods():
    torch.manual_seed(0)
    model = TinyNet()
    opt = OPTIMIZERS["adam"](model.parameters())
    guard = gradguard.Guard(model, opt, SPEC, sync_free=True, max_consecutive_skips=5)
    x, y = data()
    with pytest.raises(StallError, match="skipped"):
        for step in range(40):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if step >= 3:
                model.fc1.weight.grad.fill_(float("nan"))
            guard.step()
    assert 3 + 5 <= step + 1 <= 3 + 2 * 5


@pytest.mark.parametrize(
    ("make", "spec", "kw", "match"),
    [
        (lambda ps: torch.optim.AdamW(ps, lr=1e-3), SPEC, {}, r"fused=True"),
        (lambda ps: torch.optim.RMSprop(ps, lr=1e-3), SPEC, {}, r"RMSprop does not take one"),
        (OPTIMIZERS["adamw"], "default", {}, r"update_clip, lr_backoff decide"),
        (OPTIMIZERS["adamw"], "skip_spike", {}, r"skip_spike decide"),
        (OPTIMIZERS["adamw"], SPEC, {"check_weights": True}, r"check_weights reads"),
        (
            OPTIMIZERS["adamw"],
            SPEC,
            {"scaler": torch.amp.GradScaler("cpu")},
            r"GradScaler",
        ),
    ],
)
def test_what_cannot_be_sync_free_is_refused_at_construction(make, spec, kw, match):
    model = TinyNet()
    with pytest.raises(ConfigError, match=match):
        gradguard.Guard(model, make(model.parameters()), spec, sync_free=True, **kw)


def test_replay_and_the_two_halves_are_refused_with_the_way_out():
    model = TinyNet()
    guard = gradguard.Guard(model, OPTIMIZERS["adamw"](model.parameters()), SPEC, sync_free=True)
    batch_step(model, 1)
    with pytest.raises(ConfigError, match="drop replay"):
        guard.step(replay=lambda: torch.tensor(0.0))
    with pytest.raises(GradGuardError, match=r"call guard.step\(\)"):
        guard.before_step()


def test_telemetry_records_a_sync_free_skip(tmp_path):
    from gradguard.diagnose import load_run

    torch.manual_seed(0)
    model = TinyNet()
    guard = gradguard.Guard(
        model, OPTIMIZERS["adamw"](model.parameters()), SPEC, sync_free=True, log_dir=tmp_path
    )
    for step in range(12):
        guard.step(loss=batch_step(model, step))
    guard.close()
    run = load_run(tmp_path)
    skipped = {s["step"]: s["skip_reason"] for s in run.steps if s["skipped"]}
    assert skipped == {
        0: "nonfinite_grad",
        5: "nonfinite_grad",
        6: "nonfinite_grad",
        9: "nonfinite_loss",
    }
    assert run.end["counters"]["skipped"] == 4
