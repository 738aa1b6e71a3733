"""Rollback snapshots: a restore brings back the last good state bit-identically (weights,
optimizer and BatchNorm state, from memory or disk), never a bad one, and gives up clearly when
training cannot recover; snapshots are validated whole before a single tensor is restored (issue
13, item 7): checksum (disk), run identity, parameter fingerprint, finite tensors; the folder is
checked writable up front; a failed write names the folder; a temp folder goes at close()."""

from __future__ import annotations

import gc
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradguard
from gradguard import ConfigError, GradGuardError, SnapshotError
from gradguard import snapshot as snap_io

from tests.helpers import TinyNet, assert_same, data, snapshot, train_step


def run(spec: str, steps: int = 3, model: TinyNet | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = model or TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gradguard.Guard(model, opt, spec)
    for step in range(steps):
        guard.step(loss=train_step(model, opt, *data(step)))
    return model, opt, guard


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def nan_step(model, opt, guard):
    """A step whose gradient is NaN: the rollback restores. Returns the weights before it."""
    train_step(model, opt, *data(100))
    model.fc1.weight.grad[0, 0] = float("nan")
    return weights(model)


def unchanged(model, before) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


# ----- disk: checksum ----------------------------------------------------------------------------
def test_a_disk_snapshot_still_loads_with_torch_load(tmp_path):
    model, _, guard = run(f"rollback:every=1,to=disk,path={tmp_path}")
    snap = torch.load(tmp_path / "last_good.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(snap["model"][k], v)
    meta = snap_io.read_snapshot_meta(tmp_path / "last_good.pt")
    assert meta["run_id"] == guard.policies[0].state["run_id"]
    assert [f[0] for f in meta["fingerprint"]] == guard.layout.names


def test_scribbled_tensor_bytes_are_refused_not_restored_as_nan_weights(tmp_path):
    """torch.load has no checksum: NaN bytes written over a weight in the file loaded fine and the
    old code restored NaN weights."""
    model, opt, guard = run(f"rollback:every=1,to=disk,path={tmp_path}")
    file = tmp_path / "last_good.pt"
    saved = torch.load(file, weights_only=True)["model"]["fc1.weight"]
    raw = bytearray(file.read_bytes())
    at = raw.find(saved.numpy().tobytes())
    assert at > 0
    raw[at : at + 8] = np.array([np.nan, np.nan], dtype=np.float32).tobytes()
    file.write_bytes(bytes(raw))
    before = nan_step(model, opt, guard)
    with pytest.raises(GradGuardError, match=r"last_good\.pt: its checksum does not match") as e:
        guard.step()
    assert "nothing was restored" in str(e.value)
    assert unchanged(model, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("mode", ["truncate", "garbage"])
def test_the_corrupt_checkpoint_injector_is_caught_by_the_checksum(tmp_path, mode):
    from gradguard.faults import corrupt_checkpoint

    model, opt, guard = run(f"rollback:to=disk,path={tmp_path}")
    corrupt_checkpoint(tmp_path / "last_good.pt", mode=mode, seed=3)
    before = nan_step(model, opt, guard)
    with pytest.raises(GradGuardError, match=r"could not read the rollback snapshot .*last_good"):
        guard.step()
    assert unchanged(model, before)


def test_a_snapshot_with_a_valid_checksum_but_a_nan_tensor_is_refused(tmp_path):
    model, opt, guard = run(f"rollback:every=1,to=disk,path={tmp_path}")
    pol = guard.policies[0]
    snap = torch.load(tmp_path / "last_good.pt", weights_only=True)
    snap["optim"][0]["exp_avg"][0, 0] = float("inf")
    snap_io.write_snapshot(snap, pol._meta(0), tmp_path / "last_good.pt")
    before = nan_step(model, opt, guard)
    with pytest.raises(GradGuardError, match=r"optimizer state\[0\]\[exp_avg\] .*not finite"):
        guard.step()
    assert unchanged(model, before)


# ----- disk: another run's snapshot ---------------------------------------------------------------
def test_a_snapshot_of_another_run_with_the_same_model_is_refused(tmp_path):
    """Two runs sharing a folder: the old code restored the other run's weights silently."""
    spec = f"rollback:every=1,to=disk,path={tmp_path}"
    model, opt, guard = run(spec, seed=0)
    run(spec, seed=1)  # the other run writes last_good.pt last
    before = nan_step(model, opt, guard)
    with pytest.raises(GradGuardError, match=r"last_good\.pt: it was taken by another run"):
        guard.step()
    assert unchanged(model, before)


def test_a_snapshot_of_another_model_is_refused_before_a_tensor_is_copied(tmp_path):
    """The old code copied the layers that fit, then failed at the first that did not."""
    spec = f"rollback:every=1,to=disk,path={tmp_path}"
    model, opt, guard = run(spec)
    _other, _, other_guard = run(spec, model=TinyNet(width=10))
    # Even with the same run id (a copied state), the fingerprint tells the models apart.
    other_guard.policies[0].state["run_id"] = guard.policies[0].state["run_id"]
    other_guard.policies[0].take_snapshot(0)
    before = nan_step(model, opt, guard)
    with pytest.raises(GradGuardError, match=r"another model .*fc1\.weight \[10, 6\]"):
        guard.step()
    assert unchanged(model, before)


def test_a_resumed_run_accepts_its_own_disk_snapshot(tmp_path):
    spec = f"rollback:every=1,to=disk,path={tmp_path}"
    model, opt, guard = run(spec)
    ck = {"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()}
    model2 = TinyNet()
    model2.load_state_dict(ck["model"])
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(ck["opt"])
    guard2 = gradguard.Guard(model2, opt2, spec)  # a new run id at bind...
    guard2.load_state_dict(ck["guard"])  # ...replaced by the saved one
    good = weights(model2)
    nan_step(model2, opt2, guard2)
    assert guard2.step().rolled_back
    assert unchanged(model2, good)


def test_an_old_state_without_a_run_id_takes_a_fresh_snapshot(tmp_path):
    spec = f"rollback:every=1,to=disk,path={tmp_path}"
    model, opt, guard = run(spec)
    state = guard.state_dict()
    del state["policies"][0]["state"]["run_id"]
    guard2 = gradguard.Guard(model, opt, spec)
    guard2.load_state_dict(state)
    assert guard2.policies[0]._snapshot is None  # the file's owner cannot be told: not trusted
    before = nan_step(model, opt, guard2)
    assert guard2.step().rolled_back  # onto the snapshot taken before this step
    assert unchanged(model, before)
    meta = snap_io.read_snapshot_meta(tmp_path / "last_good.pt")
    assert meta["run_id"] == guard2.policies[0].state["run_id"]


def test_resuming_next_to_another_runs_file_warns_and_replaces_it(tmp_path):
    spec = f"rollback:every=1,to=disk,path={tmp_path}"
    model, opt, guard = run(spec, seed=0)
    state = guard.state_dict()
    run(spec, seed=1)  # another run overwrote the file
    guard2 = gradguard.Guard(model, opt, spec)
    with pytest.warns(UserWarning, match="another run"):
        guard2.load_state_dict(state)
    assert guard2.policies[0]._snapshot is None


# ----- memory ------------------------------------------------------------------------------------
def test_a_memory_snapshot_of_another_model_in_a_state_dict_is_refused():
    _, _, saved = run("rollback:every=1", model=TinyNet(width=10))
    state = saved.state_dict()
    del state["fingerprint"]  # an old-style Guard state: only the snapshot tells the models apart
    _model, _, guard = run("rollback:every=1")
    before = guard.state_dict()
    with pytest.raises(ConfigError, match=r"rollback: .*snapshot.*another model"):
        guard.load_state_dict(state)
    assert str(before) == str(guard.state_dict())


def test_a_memory_snapshot_with_a_nan_tensor_in_a_state_dict_is_refused():
    _, _, saved = run("rollback:every=1")
    state = saved.state_dict()
    state["policies"][0]["state"]["snapshot"]["model"]["fc2.bias"][3] = float("nan")
    _, _, guard = run("rollback:every=1")
    with pytest.raises(
        ConfigError, match=r"rollback: .*model\[fc2\.bias\] element 3 is not finite"
    ):
        guard.load_state_dict(state)


def test_a_memory_snapshot_of_another_run_in_a_state_dict_is_refused():
    _, _, saved = run("rollback:every=1")
    state = saved.state_dict()
    state["policies"][0]["state"]["run_id"] = "0" * 32
    _, _, guard = run("rollback:every=1")
    with pytest.raises(ConfigError, match="another run"):
        guard.load_state_dict(state)


def test_a_memory_snapshot_is_fingerprinted_at_restore():
    model, opt, guard = run("rollback:every=1")
    guard.policies[0]._snapshot["meta"]["fingerprint"][0][1] = [9, 9]
    before = nan_step(model, opt, guard)
    with pytest.raises(GradGuardError, match=r"in-memory rollback snapshot: .*another model"):
        guard.step()
    assert unchanged(model, before)
    assert guard.policies[0].state["rollbacks"] == 0 and guard.policies[0].state["consecutive"] == 0


def test_a_non_finite_optimizer_state_is_never_snapshotted():
    model, opt, guard = run("rollback:every=1", steps=2)
    pol = guard.policies[0]
    step = pol.state["snapshot_step"]
    opt.state[model.fc1.weight]["exp_avg_sq"][0, 0] = float("inf")
    assert pol.take_snapshot(99) is False
    assert pol.state["snapshot_step"] == step


# ----- the folder --------------------------------------------------------------------------------
def test_a_folder_that_cannot_be_made_is_refused_at_construction(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"rollback cannot write its snapshots to .*a_file"):
        gradguard.Guard(model, opt, f"rollback:to=disk,path={blocker / 'sub'}")


def test_a_folder_without_write_permission_is_refused_at_construction(tmp_path, monkeypatch):
    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(snap_io.tempfile, "mkstemp", denied)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"to .*ro: Permission denied\. Give it a folder"):
        gradguard.Guard(model, opt, f"rollback:to=disk,path={tmp_path / 'ro'}")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_folder_is_refused_at_construction(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        model = TinyNet()
        with pytest.raises(ConfigError, match="rollback cannot write"):
            gradguard.Guard(
                model, torch.optim.SGD(model.parameters(), lr=0.1), f"rollback:to=disk,path={ro}"
            )
    finally:
        ro.chmod(0o700)


def test_the_probe_leaves_nothing_behind(tmp_path):
    model = TinyNet()
    gradguard.Guard(
        model, torch.optim.SGD(model.parameters(), lr=0.1), f"rollback:to=disk,path={tmp_path}"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_failed_snapshot_write_names_the_folder_and_changes_nothing(tmp_path, monkeypatch):
    _model, _opt, guard = run(f"rollback:every=1,to=disk,path={tmp_path}", steps=2)
    pol = guard.policies[0]
    state = dict(pol.state)
    good = (tmp_path / "last_good.pt").read_bytes()
    older = (tmp_path / "last_good.prev.pt").read_bytes()

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snap_io.os, "fsync", full)
    with pytest.raises(SnapshotError, match=rf"to {tmp_path}: .*No space left") as e:
        pol.take_snapshot(7)
    assert isinstance(e.value, GradGuardError) and isinstance(e.value, OSError)
    assert pol.state == state
    assert (tmp_path / "last_good.pt").read_bytes() == good
    assert (tmp_path / "last_good.prev.pt").read_bytes() == older
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_good.prev.pt", "last_good.pt"]


def test_a_snapshot_that_fails_inside_a_step_still_counts_the_step(tmp_path, monkeypatch):
    model, _opt, guard = run(f"rollback:every=1,to=disk,path={tmp_path}", steps=2)
    monkeypatch.setattr(snap_io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "full")))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(SnapshotError):
        guard.step()
    assert guard.counters["steps"] == 3  # the optimizer stepped: the step is counted


def test_an_error_inside_torch_save_is_reported_as_the_disk_error(tmp_path, monkeypatch):
    """torch.save turns the file's OSError into an opaque RuntimeError ('unexpected pos')."""
    _model, _opt, guard = run(f"rollback:every=1,to=disk,path={tmp_path}", steps=1)
    real = snap_io._HashingWriter.write

    def dies(self, b):
        if len(b) > 100:
            self.error = OSError(5, "Input/output error")
            raise self.error
        return real(self, b)

    monkeypatch.setattr(snap_io._HashingWriter, "write", dies)
    with pytest.raises(SnapshotError, match="Input/output error"):
        guard.policies[0].take_snapshot(3)


# ----- the temp folder ---------------------------------------------------------------------------
def test_the_temp_folder_is_removed_at_close():
    _model, _, guard = run("rollback:every=1,to=disk")
    folder = guard.policies[0]._file.parent
    assert (folder / "last_good.pt").exists()
    guard.close()
    assert not folder.exists()
    guard.close()  # idempotent


def test_the_temp_folder_is_removed_with_the_guard():
    _, _, guard = run("rollback:every=1,to=disk")
    folder = guard.policies[0]._file.parent
    assert folder.exists()
    del guard
    gc.collect()
    assert not folder.exists()


def test_a_given_folder_is_kept_at_close(tmp_path):
    _, _, guard = run(f"rollback:every=1,to=disk,path={tmp_path}")
    guard.close()
    assert (tmp_path / "last_good.pt").exists()


def test_a_run_that_goes_on_after_close_still_cleans_up():
    model, opt, guard = run("rollback:every=1,to=disk")
    folder = guard.policies[0]._file.parent
    guard.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.step(loss=train_step(model, opt, *data(50)))  # snapshots again: the folder returns
    assert (folder / "last_good.pt").exists()
    guard.close()
    assert not folder.exists()


def test_a_resumed_run_accepts_its_own_memory_snapshot():
    model, opt, guard = run("rollback:every=1")
    state = guard.state_dict()
    del state["policies"][0]["state"]["run_id"]  # the snapshot's own metadata still names the run
    guard2 = gradguard.Guard(model, opt, "rollback:every=1")
    guard2.load_state_dict(state)
    good = weights(model)
    nan_step(model, opt, guard2)
    assert guard2.step().rolled_back
    assert unchanged(model, good)


# ----- restoring the last good state --------------------------------------------------------------
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
