"""The Guard under DistributedDataParallel, 2 processes with gloo on the CPU: N ranks on one global
batch take the steps one process takes (clipping every step, or the default chain), a NaN on one
rank's data makes every rank skip that step, a loss spike on one rank does too (the Guard averages
the loss over the ranks), state saved under 2 ranks resumes in 1 process, and data-parallel
``gradguard train`` (``--nproc``, ``torchrun``) runs end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradguard
from gradguard.bench import parallel
from gradguard.bench.config import RunConfig
from gradguard.bench.train import train_run
from gradguard.cli import main

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")

WORLD = 2
GLOBAL_BATCH = 16
STEPS = 20


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def global_batch(step: int, poison: dict[int, tuple[int, float]]) -> tuple[torch.Tensor, ...]:
    """The batch of ``step``, the same on every rank; ``poison[step] = (rank, value)`` multiplies
    the first example of that rank's slice by ``value`` (NaN, or a large factor for a spike)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=gen)
    y = torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)
    if step in poison:
        rank, value = poison[step]
        per = GLOBAL_BATCH // WORLD
        x[rank * per : (rank + 1) * per] *= value
    return x, y


def train(
    net: nn.Module,
    guard: gradguard.Guard,
    steps: range,
    rank: int = 0,
    world: int = 1,
    poison: dict[int, tuple[int, float]] | None = None,
    local_loss: bool = False,
) -> list[int]:
    """The loop every test runs, in one process (``world=1``, ``net`` the bare model) or as one
    rank (``net`` the DDP wrapper). Returns the steps the Guard skipped.

    The Guard gets the loss averaged over the ranks (as ``train_run`` passes it), or with
    ``local_loss`` this rank's own loss, which the Guard must average itself."""
    skipped = []
    for step in steps:
        x, y = global_batch(step, poison or {})
        x, y = parallel.rank_slice((x, y), rank, world)
        guard.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        if world > 1 and not local_loss:
            loss = parallel.mean_over_ranks(loss)
        if guard.step(loss=loss).skipped:
            skipped.append(step)
    return skipped


def single_process(spec: str, steps: range, **kw) -> tuple[nn.Module, gradguard.Guard, list[int]]:
    model = make_model()
    guard = gradguard.Guard(model, make_optimizer(model), spec)
    return model, guard, train(model, guard, steps, **kw)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# ----- the 2 processes ---------------------------------------------------------------------------
def in_gloo_group(worker, out: str, *args) -> None:
    """One rank: join the group ``parallel.spawn``'s environment describes (gloo, even with GPUs)
    and run ``worker(rank, out, *args)``, whose DDP wrapper is freed before the group is."""
    dist.init_process_group("gloo")
    try:
        worker(dist.get_rank(), Path(out), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def ddp_worker(rank: int, out: Path, spec: str, poison: dict, local_loss: bool) -> None:
    model = make_model()
    net = DistributedDataParallel(model)
    guard = gradguard.Guard(model, make_optimizer(model), spec)  # the module: its own names
    skipped = train(net, guard, range(STEPS), rank, WORLD, poison, local_loss)
    state = {"weights": weights(model), "skipped": skipped, "counters": guard.counters}
    torch.save(state, out / f"rank{rank}.pt")


def resume_worker(rank: int, out: Path, spec: str, save_at: int, poison: dict) -> None:
    model = make_model()
    net = DistributedDataParallel(model)
    opt = make_optimizer(model)
    guard = gradguard.Guard(model, opt, spec)
    train(net, guard, range(save_at), rank, WORLD, poison)
    if rank == 0:
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()}
        torch.save(state, out / "checkpoint.pt")
    train(net, guard, range(save_at, STEPS), rank, WORLD, poison)
    torch.save({"weights": weights(model), "counters": guard.counters}, out / f"rank{rank}.pt")


def rerun_worker(rank: int, out: Path, spec: str, poison: dict) -> None:
    """Rerun attribution: each rank reruns its own slice on the unwrapped module (no collective)."""
    model = make_model()
    net = DistributedDataParallel(model)
    guard = gradguard.Guard(model, make_optimizer(model), spec)
    reruns = {}
    for step in range(STEPS):
        x, y = parallel.rank_slice(global_batch(step, poison), rank, WORLD)
        guard.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        r = guard.step(
            loss=parallel.mean_over_ranks(loss),
            replay=lambda x=x, y=y: nn.functional.cross_entropy(model(x), y),
        )
        if r.rerun is not None:
            reruns[step] = (r.rerun, r.rolled_back)
    torch.save({"weights": weights(model), "reruns": reruns}, out / f"rank{rank}.pt")


def train_run_worker(rank: int, out: Path, cfg: dict) -> None:
    # Only rank 0's log_dir counts: rank 1's folder must stay unwritten.
    result, steps = train_run(RunConfig(**cfg), log_dir=out / f"telemetry{rank}")
    (out / f"rank{rank}.json").write_text(json.dumps({"result": result, "steps": steps}))


# Every 2-rank scenario, run one after the other in ONE pair of processes (starting two Python
# processes costs more than all the training): name -> (worker, its arguments).
NAN = {5: (1, math.nan), 12: (0, math.nan)}  # a NaN in rank 1's slice, later in rank 0's
SPIKE_SPEC, SPIKE = "skip_spike:on=loss,window=8,warmup=4", {10: (1, 60.0)}  # rank 1's loss only
# zclip with a short warmup carries an EMA of the norm; the spike two steps after the save is
# clipped only by a Guard that resumed that EMA (a fresh one is still warming up).
RESUME_SPEC, SAVE_AT, RESUME_SPIKE = "zclip:warmup=5", 10, {12: (1, 30.0)}
RUN = {
    "task": "digits",
    "model": "mlp",
    "optimizer": "momentum",
    "lr": 0.05,
    "mitigation": "clip_norm:0.5",
    "steps": 20,
    "batch_size": 32,
    "eval_every": 10,
    "model_options": {"depth": 3, "width": 32},
}
SCENARIOS = {
    "clip_norm:0.05": (ddp_worker, ("clip_norm:0.05", {}, False)),
    "default": (ddp_worker, ("default", {}, False)),
    "nan_on_one_rank": (ddp_worker, ("default", NAN, False)),
    # The loss passed as each rank sees it: the Guard must average it over the ranks, or rank 0
    # (calm loss) steps while rank 1 skips.
    "loss_spike_on_one_rank": (ddp_worker, (SPIKE_SPEC, SPIKE, True)),
    "resume": (resume_worker, (RESUME_SPEC, SAVE_AT, RESUME_SPIKE)),
    "train_run": (train_run_worker, (RUN,)),
    # The NaN sits in one rank's slice: only that rank's rerun reproduces it; the verdict is
    # reduced, so both roll back alike.
    "rerun": (rerun_worker, ("rollback:every=2,on=reproducible", NAN)),
}


def every_scenario(rank: int, out: Path) -> None:
    for name, (worker, args) in SCENARIOS.items():
        (out / name).mkdir(exist_ok=True)
        worker(rank, out / name, *args)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    parallel.spawn(WORLD, in_gloo_group, every_scenario, str(out))
    return out


def per_rank(folder: Path) -> list[dict]:
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


# ----- (a) the same steps as one process ----------------------------------------------------------
@pytest.mark.parametrize("spec", ["clip_norm:0.05", "default"])
def test_ddp_matches_one_process_on_the_global_batch(two_ranks, spec):
    ranks = per_rank(two_ranks / spec)
    model, guard, _ = single_process(spec, range(STEPS))
    for r in ranks:
        assert_close(r["weights"], weights(model))
        assert r["counters"] == guard.counters
    # DDP hands every rank the same bits: the ranks agree exactly, not only to rounding.
    for k, v in ranks[0]["weights"].items():
        assert torch.equal(v, ranks[1]["weights"][k]), k
    if spec.startswith("clip_norm"):
        assert guard.counters["clipped"] == STEPS  # the clipping was active on every step


# ----- (b) one rank's NaN, one rank's loss spike: every rank skips ---------------------------------
@pytest.mark.parametrize(
    ("scenario", "spec", "poison"),
    [("nan_on_one_rank", "default", NAN), ("loss_spike_on_one_rank", SPIKE_SPEC, SPIKE)],
    ids=["nan_on_one_rank", "loss_spike_on_one_rank"],
)
def test_one_ranks_incident_is_skipped_on_every_rank(two_ranks, scenario, spec, poison):
    ranks = per_rank(two_ranks / scenario)
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == sorted(poison)
    for k, v in ranks[0]["weights"].items():
        assert torch.isfinite(v).all(), k
        assert torch.equal(v, ranks[1]["weights"][k]), k
    # ...and one process on the same global batch skips the same steps and lands on the same weights.
    model, _, skipped = single_process(spec, range(STEPS), poison=poison)
    assert skipped == sorted(poison)
    assert_close(ranks[0]["weights"], weights(model))


# ----- (c) saved under 2 ranks, resumed in 1 -----------------------------------------------------
def test_state_saved_under_two_ranks_resumes_in_one_process(two_ranks):
    ranks = per_rank(two_ranks / "resume")
    state = torch.load(two_ranks / "resume" / "checkpoint.pt", weights_only=True)

    def resumed(guard_state: bool) -> tuple[nn.Module, gradguard.Guard]:
        model = make_model()
        opt = make_optimizer(model)
        guard = gradguard.Guard(model, opt, RESUME_SPEC)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if guard_state:
            guard.load_state_dict(state["guard"])
        train(model, guard, range(SAVE_AT, STEPS), poison=RESUME_SPIKE)
        return model, guard

    model, guard = resumed(guard_state=True)
    assert_close(ranks[0]["weights"], weights(model))
    assert guard.counters == ranks[0]["counters"] == ranks[1]["counters"]
    assert guard.counters["acted.zclip"] == 1  # the spike, clipped thanks to the resumed EMA
    fresh, fresh_guard = resumed(guard_state=False)  # the check has teeth: without the state...
    assert "acted.zclip" not in fresh_guard.counters
    assert not torch.allclose(weights(fresh)["4.weight"], weights(model)["4.weight"])


# ----- train_run and the command line ------------------------------------------------------------
def test_train_run_on_two_ranks_takes_one_process_steps(two_ranks):
    folder = two_ranks / "train_run"
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] == ranks[1]  # rank 0's result and the same per-step metrics on every rank
    result, steps = train_run(RunConfig(**RUN))
    for mine, one in zip(ranks[0]["steps"], steps, strict=True):
        for k in ("loss", "grad_norm", "grad_norm_after"):
            assert mine[k] == pytest.approx(one[k], rel=1e-5), (mine["step"], k)
        assert mine["clipped"] == one["clipped"]
    assert ranks[0]["result"]["test_loss"] == pytest.approx(result["test_loss"], rel=1e-5)
    assert ranks[0]["result"]["interventions"] == result["interventions"]
    assert (folder / "telemetry0" / "telemetry.jsonl").exists()
    assert not (folder / "telemetry1").exists()


def test_train_refuses_bad_process_counts_up_front(capsys, monkeypatch):
    assert main(["train", "--nproc", "2", "--batch-size", "63", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "batch_size 63" in err and "multiple of 2" in err and "Traceback" not in err
    assert main(["train", "--nproc", "0"]) == 2
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--nproc", "2"]) == 2  # under torchrun, torchrun sets the count
    assert "under torchrun" in capsys.readouterr().err


# The RunConfig defaults below (plain SGD, the registry's 4x128 MLP), not train's own defaults.
CLI_ARGS = [
    *("train", "--task", "digits", "--model", "mlp", "--optimizer", "sgd", "--lr", "0.1"),
    *("--model-option", "depth=4", "--model-option", "width=128"),
    *("--steps", "20", "--batch-size", "32"),
]


def cli(launcher: list[str], extra: list[str] = ()) -> dict[str, str]:
    """Run ``gradguard train`` in fresh processes; the printed result as {key: text}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *launcher, *CLI_ARGS, *extra],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("final_train_loss")]
    assert len(lines) == 1, done.stdout  # printed once, by rank 0
    return dict(line.split(maxsplit=1) for line in done.stdout.splitlines() if " " in line)


def one_process_loss() -> float:
    cfg = RunConfig(task="digits", model="mlp", mitigation="default", steps=20, batch_size=32)
    return train_run(cfg)[0]["final_train_loss"]


@pytest.mark.slow
def test_cli_nproc_2_end_to_end(tmp_path):
    printed = cli(["-m", "gradguard"], ["--nproc", "2", "--out", str(tmp_path / "run")])
    assert float(printed["final_train_loss"]) == pytest.approx(one_process_loss(), rel=1e-5)
    assert (tmp_path / "run" / "telemetry.jsonl").exists()


@pytest.mark.slow
def test_cli_under_torchrun_end_to_end():
    printed = cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gradguard"])
    assert float(printed["final_train_loss"]) == pytest.approx(one_process_loss(), rel=1e-5)


def test_a_rerun_verdict_is_the_same_on_every_rank(two_ranks):
    states = per_rank(two_ranks / "rerun")
    assert (
        states[0]["reruns"]
        == states[1]["reruns"]
        == {
            5: ("reproducible", True),
            12: ("reproducible", True),
        }
    )
    assert_close(states[0]["weights"], states[1]["weights"])


def say_and_exit(status: int) -> int:
    """A spawned rank: print without a newline (left in the buffer), and return ``status`` on
    rank 1."""
    print(f"rank {os.environ['RANK']} done", end="")
    return status if os.environ["RANK"] == "1" else 0


def test_spawned_ranks_print_everything_and_their_status_reaches_the_parent():
    code = (
        "import sys, torch.multiprocessing as mp\n"
        "from gradguard.bench import parallel\n"
        "from tests.distributed.test_ddp import say_and_exit\n"
        "try:\n"
        "    parallel.spawn(2, say_and_exit, int(sys.argv[1]))\n"
        "except mp.ProcessExitedException as e:\n"
        "    sys.exit(100 + e.exit_code)\n"
    )
    for status, rc in ((0, 0), (3, 103)):
        done = subprocess.run(
            [sys.executable, "-c", code, str(status)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=Path(__file__).resolve().parents[2],
            # stdout a pipe and buffered, as under a user's `| tee`
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
        )
        assert done.returncode == rc, done.stderr[-2000:]
        # The failing rank's buffered line reaches the parent. When it fails, torch's spawn
        # terminates the other ranks (SIGTERM), so rank 0's line is certain only when none fails.
        assert "rank 1 done" in done.stdout, done.stdout
        if status == 0:
            assert "rank 0 done" in done.stdout, done.stdout
