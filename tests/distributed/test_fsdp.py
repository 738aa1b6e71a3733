"""The Guard under FSDP2 (``fully_shard``, DTensor gradients), 2 processes with gloo on CPU: every
rank sees the norms of the full, unsharded gradient (global and per layer), clips its shard by the
same factor, and takes the same decisions, including loss-aware ones when the ranks' losses differ.
FSDP1 is refused clearly."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard

from tests.helpers import TinyNet

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")

WORLD = 2
GLOBAL_BATCH = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch(step: int, poison: bool = False):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=gen)
    y = torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)
    return x, y


def reference(spec: str, steps: int) -> list[dict]:
    """One process, unsharded, on the global batch: norms before the step and the weights after."""
    torch.manual_seed(0)
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, spec, layer_stats=True)
    out = []
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        r = guard.step()
        out.append(
            {
                "norm": r.grad_norm,
                "layers": r.layer_norms,
                "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            }
        )
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: every scenario, one after the other, in ONE pair of processes (starting two
    Python processes costs more than all the training); "weight" last, as it ends in an error."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for scenario in SCENARIOS:
            _scenario(rank, scenario, out_dir)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _scenario(rank: int, scenario: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyNet(width=16)
    mesh = init_device_mesh("cpu", (WORLD,))
    for m in (model.fc1, model.fc2, model.head):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = {
        "clip": "clip_norm:0.05",
        "nan": "default",
        "loss": "skip_spike:warmup=5,window=20",
        "weight": "default",
    }[scenario]
    guard = gradguard.Guard(model, opt, spec, layer_stats=True)
    per = GLOBAL_BATCH // WORLD
    records = []
    for step in range(12):
        x, y = batch(step)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        if scenario == "nan" and step == 7 and rank == 1:
            x = x.clone()
            x[0, 0] = float("nan")  # one rank's batch is poisoned
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if scenario == "loss" and step == 9 and rank == 0:
            loss_seen = loss.detach() * 1e4  # a loss spike seen by one rank only
        else:
            loss_seen = loss.detach()
        loss.backward()
        if scenario == "weight" and step == 4 and rank == 1:
            with torch.no_grad():  # one rank's shard of the weights is corrupted
                model.fc2.weight.to_local().view(-1)[0] = float("nan")
        if scenario == "weight" and step == 4:
            try:
                guard.step(loss=loss_seen)
            except gradguard.GradGuardError as e:
                records.append({"raised": type(e).__name__, "step": step})
            break
        r = guard.step(loss=loss_seen)
        records.append(
            {
                "norm": r.grad_norm,
                "layers": r.layer_norms,
                "skipped": r.skipped,
                "weights": {k: v.full_tensor().clone() for k, v in model.state_dict().items()},
            }
        )
    torch.save(
        {"records": records, "state": guard.state_dict()},
        os.path.join(out_dir, f"{scenario}-r{rank}.pt"),
    )


SCENARIOS = ("clip", "nan", "loss", "weight")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.fixture
def run(two_ranks):
    """``run(scenario)``: what each rank saved in that scenario."""

    def load(scenario: str) -> list[dict]:
        return [
            torch.load(two_ranks / f"{scenario}-r{r}.pt", weights_only=True) for r in range(WORLD)
        ]

    return load


@pytest.mark.slow
def test_sharded_norms_and_clipped_steps_equal_the_unsharded_run(run):
    ranks = run("clip")
    ref = reference("clip_norm:0.05", 12)
    for rank in ranks:
        for got, want in zip(rank["records"], ref, strict=True):
            assert got["norm"] == pytest.approx(want["norm"], rel=1e-5)
            assert got["layers"].keys() == want["layers"].keys()
            for k in want["layers"]:
                assert got["layers"][k] == pytest.approx(want["layers"][k], rel=1e-5)
            for k in want["weights"]:
                torch.testing.assert_close(
                    got["weights"][k], want["weights"][k], rtol=1e-5, atol=1e-6
                )
    assert ranks[0]["state"] == ranks[1]["state"]


@pytest.mark.slow
def test_a_nan_on_one_ranks_batch_makes_every_rank_skip_that_step(run):
    ranks = run("nan")
    skipped = [[i for i, r in enumerate(rank["records"]) if r["skipped"]] for rank in ranks]
    assert skipped == [[7], [7]]
    for a, b in zip(
        ranks[0]["records"][-1]["weights"].values(),
        ranks[1]["records"][-1]["weights"].values(),
        strict=True,
    ):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.slow
def test_loss_aware_decisions_agree_when_the_ranks_losses_differ(run):
    ranks = run("loss")
    skipped = [[i for i, r in enumerate(rank["records"]) if r["skipped"]] for rank in ranks]
    assert skipped[0] == skipped[1] == [9]
    assert ranks[0]["state"] == ranks[1]["state"]


@pytest.mark.slow
def test_a_nan_weight_in_one_ranks_shard_stops_every_rank_together(run):
    """The post-step weight check reads each rank's shards and the ranks agree: both raise the
    same error at the same step (one raising alone would leave the other in a collective)."""
    ranks = run("weight")
    assert [r["records"][-1] for r in ranks] == [{"raised": "IntegrityError", "step": 4}] * 2


def test_fsdp1_is_refused_clearly():
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        model = FullyShardedDataParallel(TinyNet(width=16), device_id=torch.device("cpu"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(gradguard.ConfigError, match="FSDP2"):
            gradguard.Guard(model, opt)
    finally:
        dist.destroy_process_group()
