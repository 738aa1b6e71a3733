"""Data-parallel bench runs: which rank this process is, its slice of a global batch, the process
group from ``torchrun``'s environment, and the local launcher behind ``gradguard train --nproc N``.

A thin adapter, no algorithm: DistributedDataParallel averages the gradients before the Guard
measures them, so every rank sees the same statistics and takes the same decision.

    torchrun --nproc_per_node 4 -m gradguard train --task digits --model mlp
    gradguard train --nproc 4 --task digits --model mlp       # the same, without torchrun
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError

#: The variables ``torchrun`` sets for each process; ``spawn`` sets the same ones.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the initialized process group."""

    rank: int
    world_size: int
    device: torch.device  # where the model lives: the rank's GPU with nccl, else the CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Ranks | None:
    """The initialized process group's rank, size and device; ``None`` when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if "nccl" in str(dist.get_backend()):
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def check_divisible(batch_size: int, world_size: int) -> None:
    """The batch size is the global batch: each of ``world_size`` ranks takes an equal share, so
    that the ranks' mean losses average to the whole batch's mean."""
    if batch_size % world_size:
        lower = max(world_size, batch_size - batch_size % world_size)
        raise ConfigError(
            f"batch_size {batch_size} is the global batch, split evenly across {world_size} "
            f"processes; pass a multiple of {world_size} (e.g. {lower} or {lower + world_size})"
        )


def rank_slice(batch: tuple[Tensor, ...], rank: int, world_size: int) -> tuple[Tensor, ...]:
    """Rank ``rank``'s contiguous share of a global batch (examples along the first dimension)."""
    per = len(batch[0]) // world_size
    return tuple(t[rank * per : (rank + 1) * per] for t in batch)


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a tensor over the ranks, as a new tensor (SUM then divide: gloo has no AVG)."""
    out = value.detach().clone()
    dist.all_reduce(out)
    return out.div_(dist.get_world_size())


def from_main(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small objects: a result dict, a path)."""
    box = [obj]
    dist.broadcast_object_list(
        box, src=0, device=ranks.device if ranks.device.type != "cpu" else None
    )
    return box[0]


# ----- process groups and launching ----------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or ``spawn``): its rank is in the
    environment."""
    return all(v in os.environ for v in TORCHRUN_VARS)


@contextmanager
def process_group_from_env() -> Iterator[None]:
    """Join the process group that ``torchrun``'s environment describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and leave it on exit.

    Backend: nccl when every local rank has a GPU of its own (rank ``LOCAL_RANK`` uses
    ``cuda:LOCAL_RANK``), gloo on the CPU otherwise (NCCL refuses two ranks on one GPU). A group
    that is already initialized is used as it is and left open.
    """
    if dist.is_initialized():
        yield
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
        # Rank 0 hosts the rendezvous store: no rank leaves while another still talks to it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(nproc: int, fn: Callable[..., int | None], *args: Any) -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes, each with the environment ``torchrun``
    would give it (rank = its index, a free port on 127.0.0.1), and wait for all of them.

    ``fn`` must be importable (a module-level function): the processes are started fresh
    ("spawn"), not forked. A process that raises makes this raise
    ``torch.multiprocessing.ProcessRaisedException`` with its traceback; one that returns a non-zero
    status, ``ProcessExitedException``.
    """
    import torch.multiprocessing as mp

    if nproc < 1:
        raise ConfigError(f"the number of processes must be >= 1, got {nproc}")
    mp.spawn(_spawned, args=(nproc, free_port(), fn, args), nprocs=nproc, join=True)


def _spawned(
    local_rank: int, nproc: int, port: int, fn: Callable[..., int | None], args: tuple
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        WORLD_SIZE=str(nproc),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    if "OMP_NUM_THREADS" not in os.environ:
        # Like torchrun (OMP_NUM_THREADS=1 unless set): one thread per process, not a share of
        # the cores, so what ``fn`` computes does not depend on the machine. A bench run pins its
        # own count anyway (RunConfig.threads, see gradguard.bench.train.pinned_threads).
        torch.set_num_threads(1)
    status = fn(*args)
    # Leave without the interpreter's teardown: a spawned gloo rank 0 once aborted after its work
    # was done and its group destroyed (1 of 7 runs of the end-to-end test, on a loaded machine:
    # "terminate called without an active exception", a C++ thread destroyed while running), and
    # the whole run was reported failed. What the rank printed is flushed first; its files are
    # closed by the ``with`` blocks that wrote them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)
