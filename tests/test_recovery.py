"""skip_spike, reset_moments and rollback: the policies that change what the optimizer does."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard
from gradguard import GradGuardError
from gradguard.policies import reset_param_state_

from tests.helpers import TinyNet, assert_same, data, snapshot, train_step


def skip_spike_reference(
    values: list[float], z: float, window: int, warmup: int, admit: int = 8
) -> list[bool]:
    """OLMo-core's rule (sample std over a rolling window; checks once ``warmup`` values counting
    the current one are in), except skipped values stay out, two earlier values are needed, and
    ``admit`` finite outliers in a row replace the window (a shift of level)."""
    hist: list[float] = []
    run: list[float] = []  # the finite outliers in a row so far
    out = []
    for v in values:
        skip = outlier = False
        if not math.isfinite(v):
            skip = True
        elif len(hist) + 1 >= warmup and len(hist) >= 2:
            mean = sum(hist) / len(hist)
            std = math.sqrt(sum((h - mean) ** 2 for h in hist) / (len(hist) - 1))
            skip = outlier = v - mean > z * std
        out.append(skip)
        run = [*run, v] if outlier else []
        if len(run) == admit:
            hist, run = run[-window:], []
        elif not skip:
            hist = [*hist, v][-window:]
    return out


def _reference_run(norms: list[float], spec: str) -> list[bool]:
    model = nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = gradguard.Guard(model, opt, spec, max_consecutive_skips=None)
    got = []
    for n in norms:
        model.weight.grad = torch.full((1, 1), n)
        got.append(guard.step().skipped)
    return got


def test_skip_spike_matches_reference_on_a_long_sequence():
    gen = torch.Generator().manual_seed(3)
    norms = (torch.rand(400, generator=gen) * 0.5 + 1.0).tolist()
    for i, f in [(50, 20.0), (51, 30.0), (120, 5.0), (300, 1e4), (301, float("inf"))]:
        norms[i] *= f
    got = _reference_run(norms, "skip_spike:z=4,window=32,warmup=8,on=grad_norm")
    want = skip_spike_reference(norms, 4.0, 32, 8)
    assert got == want
    assert want[50] and want[51] and want[300] and want[301] and sum(want) < 10


@pytest.mark.parametrize(("admit", "window"), [(2, 32), (3, 32), (8, 32), (8, 5)])
def test_skip_spike_matches_reference_through_shifts_of_level(admit, window):
    """Levels that move up 10x and back, bursts of every length around ``admit``, NaN and Inf
    inside runs of outliers, a run longer than the window: the same skips as the reference, step
    by step."""
    gen = torch.Generator().manual_seed(4)
    norms = (torch.rand(900, generator=gen) * 0.5 + 1.0).tolist()
    for lo, hi, f in [(100, 400, 10.0), (600, 900, 0.3)]:
        norms[lo:hi] = [v * f for v in norms[lo:hi]]
    for start, length in [(40, 1), (60, 2), (70, 3), (80, 7), (450, 8), (500, 9)]:
        for i in range(start, start + length):
            norms[i] *= 50.0
    norms[102], norms[455], norms[456] = float("nan"), float("inf"), float("nan")
    warmup = min(8, window)
    spec = f"skip_spike:z=4,window={window},warmup={warmup},on=grad_norm,admit={admit}"
    got = _reference_run(norms, spec)
    want = skip_spike_reference(norms, 4.0, window, warmup, admit)
    assert got == want
    if window == 32:  # every new level was admitted (a 5-value window is noisier than that)
        assert not any(want[420:440]) and not any(want[880:])


def test_skip_spike_on_loss():
    model = nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, "skip_spike:on=loss,window=16")
    skipped = []
    for step in range(40):
        model.weight.grad = torch.ones(1, 1)
        loss = 100.0 if step == 30 else 1.0 + 0.01 * (step % 3)
        skipped.append(guard.step(loss=torch.tensor(loss)).skipped)
    assert skipped == [s == 30 for s in range(40)]


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-3),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, amsgrad=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    ],
)
def test_reset_moments_zeroes_only_the_spiked_parameter(make_opt):
    torch.manual_seed(0)
    model = TinyNet()
    opt = make_opt(model.parameters())
    guard = gradguard.Guard(model, opt, "reset_moments:z=6,warmup=10")
    for step in range(30):
        train_step(model, opt, *data(step))
        assert "reset_moments" not in guard.step().actions
    train_step(model, opt, *data(30))
    model.fc2.weight.grad.mul_(1e3)
    before = model.fc2.weight.detach().clone()
    r = guard.step()
    assert r.actions == ("reset_moments",) and r.layers["reset_moments"] == ("fc2",)
    # The spiked weight did not move, and its spiking gradient is in none of its moments.
    assert torch.equal(model.fc2.weight, before)
    names = [n for n, _ in model.named_parameters()]
    for name, p in zip(names, model.parameters(), strict=True):
        st = opt.state[p]
        for k, v in st.items():
            if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                continue
            if name == "fc2.weight":
                assert torch.equal(v, torch.zeros_like(v)), k
            else:
                assert not torch.equal(v, torch.zeros_like(v))
    if "step" in opt.state[model.fc2.weight]:
        assert float(opt.state[model.fc2.weight]["step"]) == 0.0
        assert float(opt.state[model.fc1.weight]["step"]) == 31.0
    # The next step is an ordinary first step for fc2.weight.
    train_step(model, opt, *data(31))
    guard.step()
    assert not torch.equal(model.fc2.weight, before)


def test_reset_param_state_helper_leaves_unknown_state_alone():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p]["custom"] = "keep"
    assert sorted(reset_param_state_(opt, p)) == ["exp_avg", "exp_avg_sq", "step"]
    assert opt.state[p]["custom"] == "keep"
    assert reset_param_state_(opt, nn.Parameter(torch.ones(2))) == []


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


@pytest.mark.parametrize("to", ["memory", "disk"])
def test_rollback_restores_the_last_good_state_bit_identically(to, tmp_path):
    torch.manual_seed(0)
    model = BNNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    spec = f"rollback:every=5,to={to}" + (f",path={tmp_path}" if to == "disk" else "")
    guard = gradguard.Guard(model, opt, spec)
    good = None
    for step in range(12):
        train_step(model, opt, *data(step))
        guard.step()
        if step == 9:  # snapshots after applied steps 5 and 10 (step index 4 and 9)
            good = (snapshot(model, opt), {k: v.clone() for k, v in model.state_dict().items()})
    # Poison the weights (and BatchNorm statistics) as a bad update would, then the next loss is NaN.
    with torch.no_grad():
        model.fc.weight[0, 0] = float("inf")
        model.bn.running_mean.fill_(float("nan"))
    loss = train_step(model, opt, *data(12))
    r = guard.step(loss=loss)
    assert r.rolled_back and r.skipped and r.skip_reason == "rollback"
    assert_same(good[0], snapshot(model, opt))
    for k, v in model.state_dict().items():
        assert torch.equal(v, good[1][k]), k
    assert guard.counters["rolled_back"] == 1
    # Training goes on from the restored state.
    for step in range(13, 20):
        assert not guard.step(loss=train_step(model, opt, *data(step))).skipped
    if to == "disk":
        assert (tmp_path / "last_good.pt").exists()


def test_rollback_never_snapshots_bad_weights():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, "rollback:every=2")
    train_step(model, opt, *data(0))
    first = snapshot(model, opt)  # the first snapshot is taken before the first step
    guard.step()
    train_step(model, opt, *data(1))
    with torch.no_grad():
        model.head.bias[0] = float("nan")  # corrupted outside the Guard's view before the snapshot
    guard.step()
    assert guard.policies[0].state["snapshot_step"] == 0
    train_step(model, opt, *data(2))
    model.head.bias.grad[0] = float("nan")
    assert guard.step().rolled_back
    assert torch.equal(model.fc1.weight, first["params"][0])


def test_rollback_gives_up_clearly_when_training_cannot_recover():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, "rollback:max_consecutive=2")
    train_step(model, opt, *data(0))
    guard.step()
    for _ in range(2):
        train_step(model, opt, *data(1))
        model.fc1.weight.grad.fill_(float("nan"))
        assert guard.step().rolled_back
    train_step(model, opt, *data(1))
    model.fc1.weight.grad.fill_(float("nan"))
    with pytest.raises(GradGuardError, match="lower the learning rate"):
        guard.step()


def test_corrupt_disk_snapshot_is_named(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, f"rollback:to=disk,path={tmp_path}")
    train_step(model, opt, *data(0))
    guard.step()
    (tmp_path / "last_good.pt").write_bytes(b"not a checkpoint")
    train_step(model, opt, *data(1))
    model.fc1.weight.grad.fill_(float("nan"))
    with pytest.raises(GradGuardError, match=r"last_good\.pt"):
        guard.step()


def test_restored_state_is_a_copy_of_the_snapshot():
    """Restoring into an optimizer whose state was dropped must not hand it the snapshot's own
    tensors: the next steps would update the snapshot in place."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gradguard.Guard(model, opt, "rollback:every=2")
    for step in range(2):
        guard.step(loss=train_step(model, opt, *data(step)))
    saved = snapshot(model, opt)  # the snapshot taken after the second applied step
    for rollback_round in range(2):
        opt.state.clear()  # e.g. state dropped by user code
        train_step(model, opt, *data(10 + rollback_round))
        model.fc1.weight.grad.fill_(float("nan"))
        assert guard.step().rolled_back
        assert_same(saved, snapshot(model, opt))
        guard.step(loss=train_step(model, opt, *data(20 + rollback_round)))  # a good step after it


@pytest.mark.parametrize("mode", ["truncate", "garbage"])
def test_a_corrupted_snapshot_is_a_clear_error_naming_the_file(tmp_path, mode):
    from gradguard.faults import corrupt_checkpoint

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, f"rollback:to=disk,path={tmp_path}")
    guard.step(loss=train_step(model, opt, *data(0)))
    corrupt_checkpoint(tmp_path / "last_good.pt", mode=mode, seed=1)
    train_step(model, opt, *data(1))
    model.fc1.weight.grad.fill_(float("nan"))
    with pytest.raises(
        GradGuardError, match=r"could not read the rollback snapshot .*last_good\.pt"
    ):
        guard.step()


def test_a_crash_while_writing_a_snapshot_keeps_the_previous_good_one(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, f"rollback:every=1,to=disk,path={tmp_path}")
    guard.step(loss=train_step(model, opt, *data(0)))
    good = torch.load(tmp_path / "last_good.pt", weights_only=True)
    real_save = torch.save

    def dies_halfway(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        raise OSError("disk full")  # after writing the temp file, before the rename

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        guard.step(loss=train_step(model, opt, *data(1)))
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(tmp_path / "last_good.pt", weights_only=True)  # still loads, still the old
    for k, v in good["model"].items():
        assert torch.equal(kept["model"][k], v)
    # No temp file left behind: only the two snapshots kept (the newest and the one before it).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_good.prev.pt", "last_good.pt"]
