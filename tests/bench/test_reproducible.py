"""Reproducible on any machine: a run's figures follow from its config alone, not from the worker
count, the cores or the caller's torch thread setting (each run pins ``RunConfig.threads``)."""

from __future__ import annotations

import pytest
import torch

from gradguard.bench.config import RunConfig, expand_grid, resolve
from gradguard.bench.runner import DB_NAME, run_grid, train_stored
from gradguard.bench.store import ResultStore, canonical_json, run_key
from gradguard.bench.train import pinned_threads, train_run
from gradguard.errors import ConfigError

#: Result fields that measure time, so differ between any two executions of the same run.
TIMING = {"wall_seconds", "guard_seconds", "guard_share", "seconds_to_target"}
#: Small enough to train in a fraction of a second, big enough that torch splits its matmuls over
#: two threads: with 1 thread and with 2 its losses part from the 6th step on.
SMALL = {
    "task": "digits",
    "model": "mlp",
    "optimizer": "momentum",
    "lr": 0.1,
    "steps": 40,
    "batch_size": 32,
    "eval_every": 20,
    "model_options": {"depth": 4, "width": 32},
}


def figures(result: dict, steps: list[dict]) -> str:
    """A run's result less its timings, and its step metrics, as text (NaN == NaN)."""
    return canonical_json(
        [{k: v for k, v in result.items() if k not in TIMING}, [dict(s) for s in steps]]
    )


def stored(out) -> dict[str, str]:
    with ResultStore(out / DB_NAME) as store:
        return {r["key"]: figures(r["result"], store.steps(r["key"])) for r in store.runs("done")}


@pytest.mark.slow
def test_a_grid_gives_the_same_figures_with_one_worker_and_with_two(tmp_path):
    grid = expand_grid(SMALL, {"mitigation": ["none", "zclip"]})
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's count, which one worker used to train with
    try:
        run_grid(grid, tmp_path / "one", workers=1, progress=False)  # in this process
    finally:
        torch.set_num_threads(old)
    run_grid(grid, tmp_path / "two", workers=2, progress=False)  # two spawned workers
    one, two = stored(tmp_path / "one"), stored(tmp_path / "two")
    assert len(one) == 2 and one == two


def test_a_run_trains_with_its_own_threads_whatever_the_callers(monkeypatch):
    seen: list[int] = []

    def record(_step: int) -> None:
        seen.append(torch.get_num_threads())

    cfg = RunConfig(**SMALL, mitigation="zclip")
    out = []
    old = torch.get_num_threads()
    try:
        for caller in (1, 2):
            torch.set_num_threads(caller)
            out.append(figures(*train_run(cfg, on_step=record)))
            assert torch.get_num_threads() == caller  # given back
    finally:
        torch.set_num_threads(old)
    assert out[0] == out[1]
    assert set(seen) == {1}
    # The count is the config's: threads=2 trains on two (and is another run).
    train_run(RunConfig(**{**SMALL, "steps": 2, "threads": 2}), on_step=record)
    assert seen[-2:] == [2, 2]


def test_threads_is_part_of_the_stored_config_and_the_run_key():
    cfg = RunConfig(**SMALL)
    d = cfg.as_dict()
    assert d["threads"] == 1
    assert run_key(d) != run_key(RunConfig(**SMALL, threads=2).as_dict())
    assert RunConfig.from_dict(d) == cfg
    # A row stored before runs pinned their threads still reads (as the default).
    legacy = {k: v for k, v in d.items() if k != "threads"}
    assert RunConfig.from_dict(legacy).threads == 1 and run_key(legacy) != run_key(d)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_bad_thread_count_is_refused_before_any_run(bad):
    with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
        resolve(RunConfig(**SMALL, threads=bad))
    with pytest.raises(ConfigError, match="threads must be an integer >= 1"), pinned_threads(bad):
        pass


def test_an_entry_run_trains_with_its_own_threads():
    """``gradguard advise --entry`` runs too: the same figures whatever the caller's count."""
    from gradguard.advice.runs import EntryRun

    cfg = EntryRun("examples.advise_entry:build", "", 0.05, "zclip", 0, 15).as_dict()
    assert cfg["threads"] == 1
    out = []
    old = torch.get_num_threads()
    try:
        for caller in (1, 2):
            torch.set_num_threads(caller)
            out.append(figures(*train_stored(cfg)))
            assert torch.get_num_threads() == caller
    finally:
        torch.set_num_threads(old)
    assert out[0] == out[1]


def test_the_device_is_part_of_a_gpu_runs_config_and_a_cpu_run_keeps_its_old_key():
    cpu = RunConfig(**SMALL).as_dict()
    assert "device" not in cpu  # a CPU run's key is the one it had before devices existed
    gpu = {**cpu, "device": "cuda"}
    assert run_key(gpu) != run_key(cpu)
    assert RunConfig.from_dict(gpu).device == "cuda"


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("gpu", "'cpu', 'cuda' or 'cuda:N'"),
        ("cuda:x", "'cuda:N'"),
        ("cuda:", "'cuda:N'"),
        (0, "a string"),
    ],
)
def test_a_malformed_device_is_refused_before_any_run(bad, says):
    with pytest.raises(ConfigError, match=f"device must be .*{says}"):
        expand_grid({**SMALL, "device": bad}, {"mitigation": ["none"]})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_a_gpu_run_on_a_machine_without_one_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"no CUDA GPU .* drop --device to train on the CPU"):
        expand_grid({**SMALL, "device": "cuda"}, {"mitigation": ["none", "zclip"]})


def test_a_keras_model_on_a_gpu_is_refused(monkeypatch):
    # As on a machine with one GPU: the Keras path trains on the CPU only.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="Keras model, which the bench trains on the CPU"):
        resolve(RunConfig(task="digits", model="keras_mlp", device="cuda"))
    with pytest.raises(ConfigError, match="has 1 CUDA GPU"):
        resolve(RunConfig(**SMALL, device="cuda:1"))
