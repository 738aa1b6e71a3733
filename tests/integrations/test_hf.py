"""The Hugging Face integration driven by a real ``transformers.Trainer`` on a tiny randomly
initialized GPT-2 (nothing downloaded), with faults injected through gradguard.faults."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradguard import faults  # noqa: E402
from gradguard.diagnose import load_run  # noqa: E402
from gradguard.errors import ConfigError  # noqa: E402
from gradguard.integrations.hf import (  # noqa: E402
    GuardCallback,
    GuardedTrainer,
    adopt_max_grad_norm,
)
from gradguard.optim import GuardedOptimizer  # noqa: E402

NAN_STEP = 3
VOCAB, SEQ = 64, 16


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2
    )
    return transformers.GPT2LMHeadModel(config)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Inject(transformers.TrainerCallback):
    """A NaN in one layer's gradient at ``NAN_STEP``, after the Trainer's own clipping and right
    before ``optimizer.step()``; records the weights after every step."""

    def __init__(self, model, spec: str = f"nan:at={NAN_STEP}"):
        self.model = model
        self.plan = faults.parse(spec, seed=0)
        self.snapshots: dict[int, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.plan.on_gradients(state.global_step, self.model)

    def on_step_end(self, args, state, control, **kwargs):
        self.snapshots[state.global_step - 1] = _flat(self.model).clone()


def _args(tmp_path, **kw) -> transformers.TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _train(trainer, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        trainer.train(**kw)
    return trainer


def test_unguarded_trainer_is_poisoned_by_the_fault(tmp_path):
    model = _model()
    inject = Inject(model)
    _train(
        transformers.Trainer(
            model=model, args=_args(tmp_path), train_dataset=Tokens(), callbacks=[inject]
        )
    )
    assert inject.plan.strikes and inject.plan.strikes[0].step == NAN_STEP
    assert not torch.isfinite(_flat(model)).all()


def test_guarded_trainer_skips_the_nan_step(tmp_path):
    model = _model()
    inject = Inject(model)
    trainer = GuardedTrainer(
        model=model,
        args=_args(tmp_path, max_grad_norm=0.5),
        train_dataset=Tokens(),
        callbacks=[inject],
        guard_log_dir=tmp_path / "telemetry",
    )
    _train(trainer)

    assert trainer.state.global_step == 8
    assert torch.isfinite(_flat(model)).all()
    s = inject.snapshots
    assert torch.equal(s[NAN_STEP], s[NAN_STEP - 1])  # the poisoned step changed nothing
    assert not torch.equal(s[NAN_STEP + 1], s[NAN_STEP])  # and training went on
    assert trainer.guard.counters["skipped"] == 1
    # max_grad_norm moved from the Trainer into the Guard's chain.
    assert trainer.args.max_grad_norm == 0.0
    clips = [p for p in trainer.guard.policies if p.name == "clip_norm"]
    assert [p.max_norm for p in clips] == [0.5]
    # The Guard's metrics are in the Trainer's log history, per logged step.
    logged = {h["step"]: h for h in trainer.state.log_history if "gradguard/skipped" in h}
    assert logged[NAN_STEP]["gradguard/skipped"] == 0.0  # counted at the end of its step...
    assert logged[NAN_STEP + 1]["gradguard/skipped"] == 1.0  # ...and logged from the next one
    assert logged[8]["gradguard/steps"] == 8.0
    # The telemetry was closed at the end of training and says where the NaN was.
    run = load_run(tmp_path / "telemetry")
    assert run.end is not None and run.end["counters"]["skipped"] == 1
    nan_events = [e for e in run.events if e["kind"] == "nonfinite_grad"]
    assert [e["step"] for e in nan_events] == [NAN_STEP]
    assert nan_events[0]["layers"]


def test_plain_trainer_with_guarded_optimizer_and_callback(tmp_path):
    model = _model()
    inject = Inject(model)
    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_grad_norm=0.0),
        train_dataset=Tokens(),
        optimizers=(opt, None),
        callbacks=[GuardCallback(), inject],
    )
    _train(trainer)
    assert torch.isfinite(_flat(model)).all()
    assert opt.guard.counters["skipped"] == 1
    assert torch.equal(inject.snapshots[NAN_STEP], inject.snapshots[NAN_STEP - 1])
    # AdamW never saw the skipped step.
    assert all(int(st["step"]) == 7 for st in opt.state.values())


def test_callback_warns_when_the_trainer_clips_first(tmp_path):
    model = _model()
    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1, max_grad_norm=1.0),
        train_dataset=Tokens(),
        optimizers=(opt, None),
        callbacks=[GuardCallback()],
    )
    with pytest.warns(UserWarning, match="max_grad_norm"):
        trainer.train()


def test_callback_without_guarded_optimizer_is_refused(tmp_path):
    model = _model()
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        train_dataset=Tokens(),
        callbacks=[GuardCallback()],
    )
    with pytest.raises(ConfigError, match="GuardedOptimizer"):
        trainer.train()


def test_clipping_matches_the_trainers_own(tmp_path):
    """The Guard's clip_norm at max_grad_norm gives the update the Trainer's clipping gives."""
    guarded, plain = _model(), _model()
    _train(
        GuardedTrainer(
            model=guarded,
            args=_args(tmp_path, max_steps=4, max_grad_norm=0.05),
            train_dataset=Tokens(),
            guard_policy="clip_norm",
        )
    )
    _train(
        transformers.Trainer(
            model=plain,
            args=_args(tmp_path, max_steps=4, max_grad_norm=0.05),
            train_dataset=Tokens(),
        )
    )
    torch.testing.assert_close(_flat(guarded), _flat(plain), rtol=1e-5, atol=1e-6)
    assert not torch.equal(_flat(guarded), _flat(_model()))


def test_checkpoint_resumes_exactly(tmp_path):
    spec = "skip_nonfinite+zclip:warmup=2+clip_norm:1.0"
    straight = _model()
    trainer = GuardedTrainer(
        model=straight,
        args=_args(tmp_path, save_strategy="steps", save_steps=4, max_grad_norm=0.0),
        train_dataset=Tokens(),
        callbacks=[Inject(straight)],
        guard_policy=spec,
    )
    _train(trainer)
    ckpt = tmp_path / "out" / "checkpoint-4"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["gradguard"]["counters"]["steps"] == 4

    resumed = _model()
    watch = Inject(resumed, spec="none")  # the fault struck before the checkpoint
    again = GuardedTrainer(
        model=resumed,
        args=_args(tmp_path, save_strategy="no", max_grad_norm=0.0),
        train_dataset=Tokens(),
        callbacks=[watch],
        guard_policy=spec,
    )
    _train(again, resume_from_checkpoint=str(ckpt))
    assert sorted(watch.snapshots) == [4, 5, 6, 7]  # only the steps after the checkpoint ran
    assert torch.equal(_flat(resumed), _flat(straight))
    # The Guard came back from optimizer.pt: its counters include the skip before the checkpoint,
    # and its ZClip statistics continued (a cold ZClip would warm up again and clip differently).
    assert again.guard.counters == trainer.guard.counters
    assert again.guard.counters["skipped"] == 1
    zs, zr = trainer.guard.policies[1].state_dict(), again.guard.policies[1].state_dict()
    for k in zs:
        assert torch.equal(torch.as_tensor(zs[k]), torch.as_tensor(zr[k])), k


def test_adopt_max_grad_norm():
    chain = adopt_max_grad_norm("zclip", 0.5)
    assert [p.name for p in chain] == ["zclip", "clip_norm"] and chain[1].max_norm == 0.5
    chain = adopt_max_grad_norm("skip_nonfinite+clip_norm:max_norm=1.0,norm_type=inf", 2.0)
    assert chain[1].max_norm == 2.0 and chain[1].norm_type == float("inf")
    assert [p.name for p in adopt_max_grad_norm("zclip", 0.0)] == ["zclip"]


def test_gradient_accumulation_guards_each_optimizer_step_once(tmp_path):
    model = _model()
    inject = Inject(model)
    trainer = GuardedTrainer(
        model=model,
        args=_args(tmp_path, max_steps=5, gradient_accumulation_steps=2, max_grad_norm=0.0),
        train_dataset=Tokens(),
        callbacks=[inject],
    )
    _train(trainer)
    counters = trainer.guard.counters
    assert counters["steps"] == 5 and counters["skipped"] == 1  # not once per micro-batch
    assert torch.equal(inject.snapshots[NAN_STEP], inject.snapshots[NAN_STEP - 1])
    assert torch.isfinite(_flat(model)).all()
