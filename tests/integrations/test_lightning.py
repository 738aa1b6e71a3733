"""GuardCallback driven by a real ``lightning.Trainer`` on CPU, with faults injected."""

from __future__ import annotations

import csv
import math
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from gradguard.diagnose import load_run  # noqa: E402
from gradguard.errors import ConfigError, SpecError  # noqa: E402
from gradguard.integrations.lightning import GuardCallback  # noqa: E402

BATCHES_PER_EPOCH = 5
NAN_STEP = 3


def _data(
    n_batches: int = BATCHES_PER_EPOCH, batch: int = 16, repeat: bool = False
) -> torch.utils.data.DataLoader:
    """``repeat``: every batch the same, so that what a step sees does not depend on where
    Lightning restarts its data iterator on resume (a fresh iterator, one batch early, when a
    checkpoint was written at the end of an epoch: Lightning's behaviour, not the Guard's)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch if repeat else n_batches * batch, 8, generator=g)
    if repeat:
        x = x.repeat(n_batches, 1)
    y = (x[:, :2].sum(1) > 0).long()
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False
    )


class Net(pl.LightningModule):
    """A small classifier whose loss turns NaN at the optimizer steps listed in ``nan_steps``."""

    def __init__(self, nan_steps=(), optimizer="adam", manual=False):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        self.nan_steps = set(nan_steps)
        self.optimizer_name = optimizer
        self.automatic_optimization = not manual
        self.snapshots: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.body(x), y)
        if self.global_step in self.nan_steps:
            loss = loss * float("nan")
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # The weights after each optimizer step (global_step has already advanced).
        self.snapshots[self.global_step - 1] = self.flat().clone()

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _trainer(max_steps, callbacks, tmp_path=None, enable_checkpointing=False, **kw):
    logger = False
    if tmp_path is not None:
        logger = pl.loggers.CSVLogger(tmp_path, name="logs", version=0)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def _fit(model, max_steps, callbacks, tmp_path=None, ckpt_path=None, repeat=False, **kw):
    trainer = _trainer(max_steps, callbacks, tmp_path, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*number of training batches.*")
        trainer.fit(model, _data(repeat=repeat), ckpt_path=ckpt_path)
    return trainer


def test_unguarded_run_is_poisoned_by_the_fault():
    """The control: the injected NaN really reaches the weights without the callback."""
    model = Net(nan_steps=[NAN_STEP])
    _fit(model, 6, [])
    assert not torch.isfinite(model.flat()).all()


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_nan_step_is_skipped_and_training_goes_on(tmp_path, optimizer):
    model = Net(nan_steps=[NAN_STEP], optimizer=optimizer)
    cb = GuardCallback("default", log_dir=tmp_path / "telemetry")
    trainer = _fit(model, 8, [cb], tmp_path)

    assert trainer.global_step == 8
    assert torch.isfinite(model.flat()).all()
    # The skipped step left the weights exactly as they were; the steps around it moved them.
    assert torch.equal(model.snapshots[NAN_STEP], model.snapshots[NAN_STEP - 1])
    assert not torch.equal(model.snapshots[NAN_STEP + 1], model.snapshots[NAN_STEP])
    assert not torch.equal(model.snapshots[NAN_STEP - 1], model.snapshots[NAN_STEP - 2])
    counters = cb.guard.counters
    assert counters["steps"] == 8 and counters["skipped"] == 1
    opt = trainer.optimizers[0]
    if optimizer == "adam":
        # The optimizer never saw the skipped step: its step count is one short.
        assert all(int(s["step"]) == 7 for s in opt.state.values())
    else:
        assert all(torch.isfinite(s["momentum_buffer"]).all() for s in opt.state.values())

    # Metrics reached the module's logger, the skip at its step.
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("gradguard/skipped")]
    by_step = {int(r["step"]): r for r in rows}
    assert float(by_step[NAN_STEP]["gradguard/skipped"]) == 1.0
    assert float(by_step[NAN_STEP - 1]["gradguard/skipped"]) == 0.0
    assert math.isnan(float(by_step[NAN_STEP]["gradguard/grad_norm"]))
    assert math.isfinite(float(by_step[NAN_STEP + 1]["gradguard/grad_norm"]))
    assert float(by_step[7]["gradguard/total_skipped"]) == 1.0

    # The Guard's telemetry is the same format gradguard report reads.
    run = load_run(tmp_path / "telemetry")
    assert run.end is not None and run.end["counters"]["skipped"] == 1
    assert {e["kind"] for e in run.events if e["step"] == NAN_STEP} >= {
        "nonfinite_loss",
        "nonfinite_grad",
    }


def test_checkpoint_resumes_exactly(tmp_path):
    """A run checkpointed at the end of its first epoch and resumed in a new Trainer ends exactly
    where the uninterrupted run ends: weights, optimizer, the Guard's statistics and counters."""
    spec = "skip_nonfinite+zclip:warmup=2+clip_norm:1.0"
    straight = Net(nan_steps=[NAN_STEP])
    cb_straight = GuardCallback(spec)
    ckpts = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1
    )
    trainer = _fit(straight, 8, [cb_straight, ckpts], enable_checkpointing=True, repeat=True)
    epoch_end = next(tmp_path.glob("epoch=0-*.ckpt"))
    assert trainer.global_step == 8

    resumed = Net(nan_steps=[NAN_STEP])
    cb_resumed = GuardCallback(spec)
    _fit(resumed, 8, [cb_resumed], ckpt_path=str(epoch_end), repeat=True)

    assert sorted(resumed.snapshots) == [5, 6, 7]  # only the steps after the checkpoint ran
    assert torch.equal(resumed.flat(), straight.flat())
    assert cb_resumed.guard.counters == cb_straight.guard.counters
    assert cb_resumed.guard.counters["skipped"] == 1  # the NaN step was before the checkpoint
    zs, zr = cb_straight.guard.policies[1].state_dict(), cb_resumed.guard.policies[1].state_dict()
    assert zs.keys() == zr.keys()
    for k in zs:
        assert torch.equal(torch.as_tensor(zs[k]), torch.as_tensor(zr[k])), k

    # A checkpoint of another chain is refused with the fix, not half-loaded.
    with pytest.raises(ConfigError, match="same policy"):
        _fit(Net(), 8, [GuardCallback("clip_norm:1.0")], ckpt_path=str(epoch_end), repeat=True)


def test_manual_optimization_is_guarded():
    model = Net(nan_steps=[NAN_STEP], manual=True)
    cb = GuardCallback("default")
    _fit(model, 6, [cb])
    assert torch.isfinite(model.flat()).all()
    assert cb.guard.counters["skipped"] == 1
    assert torch.equal(model.snapshots[NAN_STEP], model.snapshots[NAN_STEP - 1])


def test_clipping_matches_torch_clip_grad_norm():
    """clip_norm through the callback leaves the same update as torch's clip_grad_norm_."""
    model = Net(optimizer="momentum")
    ref = Net(optimizer="momentum")
    _fit(model, 4, [GuardCallback("clip_norm:0.05", check_finite=False)])
    _fit(ref, 4, [], gradient_clip_val=0.05, gradient_clip_algorithm="norm")
    torch.testing.assert_close(model.flat(), ref.flat(), rtol=1e-6, atol=1e-7)


def test_lightning_clipping_on_top_warns():
    with pytest.warns(UserWarning, match="gradient_clip_val"):
        _fit(Net(), 1, [GuardCallback("default")], gradient_clip_val=1.0)


def test_bad_policy_fails_at_construction():
    with pytest.raises(SpecError, match="unknown policy"):
        GuardCallback("clip_nrom:1.0")


def test_bf16_autocast_and_accumulation():
    """bf16-mixed precision and gradient accumulation: one Guard step per optimizer step (not per
    micro-batch), and the step whose micro-batch went NaN is skipped whole."""
    model = Net(nan_steps=[1], optimizer="momentum")
    cb = GuardCallback("default")
    trainer = _fit(model, 4, [cb], precision="bf16-mixed", accumulate_grad_batches=2)
    assert trainer.global_step == 4
    assert cb.guard.counters["steps"] == 4 and cb.guard.counters["skipped"] == 1
    assert torch.isfinite(model.flat()).all()


class RankNan(Net):
    """The loss of rank 1 alone goes NaN at ``NAN_STEP``."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.body(x), y)
        if self.global_step == NAN_STEP and self.global_rank == 1:
            loss = loss * float("nan")
        return loss


@pytest.mark.slow
def test_ddp_both_ranks_skip_a_nan_seen_by_one(tmp_path):
    """Lightning DDP, 2 gloo processes: the NaN in rank 1's loss reaches both ranks' averaged
    gradients, and each rank's Guard skips that step (each writes its own telemetry)."""
    model = RankNan()
    cb = GuardCallback("default", log_dir=tmp_path / "tel")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=6,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, _data())
    assert torch.isfinite(model.flat()).all()  # the weights ddp_spawn brought back from rank 0
    for folder in (tmp_path / "tel", tmp_path / "tel" / "rank1"):
        run = load_run(folder)
        assert run.end["counters"]["steps"] == 6 and run.end["counters"]["skipped"] == 1
        assert {e["step"] for e in run.events if e["kind"] == "nonfinite_grad"} == {NAN_STEP}
