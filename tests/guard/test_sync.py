"""Sync-lightness, checked on the CPU: every way a tensor value reaches Python (``item``,
``tolist``, ``bool``, ``float``, ...) is counted inside ``guard.step()``. On CUDA each would be a
host-device sync. A clipping-only chain must make none; a chain that can skip makes exactly one.
Index tensors built from Python lists (a blocking host-to-device copy on CUDA) are counted too."""

from __future__ import annotations

import pytest
import torch

import gradguard

from tests.helpers import TinyNet, data, train_step

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    counts = {"active": False, "reads": [], "built": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            if counts["active"]:
                counts["reads"].append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    make = torch.tensor

    def counted_tensor(*a, **kw):
        if counts["active"]:
            counts["built"] += 1
        return make(*a, **kw)

    monkeypatch.setattr(torch, "tensor", counted_tensor)
    return counts


def steady_state_reads(spec: str, counts: dict, **guard_kw) -> tuple[list[str], int]:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, foreach=True)
    guard = gradguard.Guard(model, opt, spec, **guard_kw)
    for step in range(60):
        loss = train_step(model, opt, *data(step))
        if step == 50:
            model.fc1.weight.grad.mul_(1e3)  # a spike, so the adaptive clippers engage
        counts["active"] = step >= 40  # after warmup and buffer set-up
        guard.step(loss=loss)
        counts["active"] = False
    return counts["reads"], counts["built"]


def test_clipping_only_chain_never_reads_the_device(host_reads):
    spec = "clip_norm:0.5+zclip:warmup=10+autoclip:10+clip_layerwise:factor=2,warmup=10+agc:0.05+clip_value:1"
    reads, built = steady_state_reads(spec, host_reads, check_finite=False)
    assert reads == [] and built == 0


@pytest.mark.parametrize("spec", ["skip_nonfinite+adaptive_clip", "default_v1"])
def test_a_chain_that_can_skip_reads_once_per_step(host_reads, spec):
    reads, built = steady_state_reads(spec, host_reads, check_weights=False)
    assert len(reads) == 20 and set(reads) <= {"item", "tolist"} and built == 0


def test_the_weight_integrity_check_is_one_more_read_per_step(host_reads):
    reads, built = steady_state_reads("default_v1", host_reads)
    assert len(reads) == 40 and set(reads) <= {"item", "tolist", "__bool__"} and built == 0


@pytest.mark.parametrize("check_weights", [False, True])
def test_the_default_reads_twice_per_step_weight_check_included(host_reads, check_weights):
    # One read before the step (the norm: skip or clip), one after it: update_clip's
    # measurement brings the update norms and every weight's norm (the integrity check) together.
    reads, built = steady_state_reads("default", host_reads, check_weights=check_weights)
    assert sorted(reads) == ["numpy"] * 20 + ["tolist"] * 20 and built == 0


def test_loss_and_norm_come_back_in_the_same_read(host_reads):
    reads, _ = steady_state_reads("skip_spike+reset_moments", host_reads, check_weights=False)
    assert reads == ["tolist"] * 20


def test_reading_the_report_is_where_the_sync_happens(host_reads):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gradguard.Guard(model, opt, "clip_norm", check_finite=False)
    train_step(model, opt, *data(0))
    host_reads["active"] = True
    report = guard.step()
    assert host_reads["reads"] == []
    assert report.grad_norm > 0
    assert host_reads["reads"] == ["item"]
