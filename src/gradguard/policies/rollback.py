"""Roll back to the last good model and optimizer state when training goes non-finite."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ConfigError, GradGuardError, SpecError, TrainingHalted
from ..stats import foreach_norms
from .base import Policy, StepContext
from .registry import register


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clone_to(obj: Any, device: torch.device | None) -> Any:
    if isinstance(obj, Tensor):
        t = obj.detach()
        return t.to(device, copy=True) if device is not None else t.clone()
    if isinstance(obj, dict):
        return {k: _clone_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_to(v, device) for v in obj)
    return obj


@register
class rollback(Policy):
    """Keep the last good model + optimizer state; restore it when the gradients or the loss go
    non-finite, skip the step, and continue (chain ``lr_backoff`` to also cut the LR).

    A snapshot is taken before the first step and then every ``every`` applied steps, only if every
    parameter is finite then (a parameter norm pass, amortized over ``every`` steps). It holds the
    model's ``state_dict`` (parameters and buffers, e.g. BatchNorm statistics) and each parameter's
    optimizer state; param-group hyperparameters (the LR) are left as they are so schedulers and
    ``lr_backoff`` keep control of them.

    ``to="memory"`` keeps the snapshot in CPU memory; ``to="disk"`` writes it atomically to ``path``
    (default: a temp folder) and reads it back with ``weights_only=True``. After
    ``max_consecutive`` rollbacks with no good step between them, raises: the run cannot recover by
    itself (lower the LR).
    """

    name = "rollback"
    needs_host = True
    kind = "skip"

    def __init__(
        self,
        every: int = 100,
        to: Literal["memory", "disk"] = "memory",
        path: str | None = None,
        max_consecutive: int = 5,
    ):
        super().__init__()
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise SpecError(f"every must be an integer >= 1, got {every!r}")
        if to not in ("memory", "disk"):
            raise SpecError(f"to must be 'memory' or 'disk', got {to!r}")
        if not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise SpecError(f"max_consecutive must be an integer >= 1, got {max_consecutive!r}")
        self.every = every
        self.to = to
        self.path = path
        self.max_consecutive = max_consecutive
        self.state = {"snapshot_step": None, "since_snapshot": 0, "consecutive": 0, "rollbacks": 0}
        self._snapshot: dict[str, Any] | None = None
        self._model: torch.nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._params: list[Tensor] = []
        self._file: Path | None = None

    def bind(self, layout, optimizer) -> None:
        self._model = layout.module
        self._optimizer = optimizer
        self._params = layout.params
        if self.to == "disk":
            folder = (
                Path(self.path)
                if self.path
                else Path(tempfile.mkdtemp(prefix="gradguard-rollback-"))
            )
            if folder.exists() and not folder.is_dir():
                raise ConfigError(
                    f"rollback path {folder} exists and is not a folder; give a folder path"
                )
            # Under torch.distributed every rank snapshots its own (possibly sharded) state.
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                self._file = folder / f"last_good.rank{dist.get_rank()}.pt"
            else:
                self._file = folder / "last_good.pt"

    # ----- snapshot -------------------------------------------------------------------------------
    def _capture(self) -> dict[str, Any]:
        opt = self._optimizer
        assert opt is not None
        model_sd = (
            self._model.state_dict()
            if self._model is not None
            else {str(i): p for i, p in enumerate(self._params)}
        )
        optim = [opt.state.get(p, {}) for p in self._params]
        return {"model": model_sd, "optim": optim}

    def _params_finite(self) -> bool:
        groups: dict[tuple, list[Tensor]] = {}
        for p in self._params:
            groups.setdefault((p.device, p.dtype), []).append(p.detach())
        norms = [n.cpu() for ts in groups.values() for n in foreach_norms(ts)]
        return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True

    def take_snapshot(self, step: int) -> bool:
        if not self._params_finite():
            return False
        snap = _clone_to(self._capture(), torch.device("cpu"))
        if self.to == "disk":
            assert self._file is not None
            atomic_save(snap, self._file)
            self._snapshot = {"on_disk": True}
        else:
            self._snapshot = snap
        self.state["snapshot_step"] = step
        self.state["since_snapshot"] = 0
        return True

    def restore(self) -> None:
        if self._snapshot is None:
            raise GradGuardError("rollback requested before any snapshot was taken")
        if self._snapshot.get("on_disk"):
            assert self._file is not None
            try:
                snap = torch.load(self._file, map_location="cpu", weights_only=True)
            except Exception as e:
                raise GradGuardError(
                    f"could not read the rollback snapshot {self._file}: {e}"
                ) from e
        else:
            snap = self._snapshot
        with torch.no_grad():
            if self._model is not None:
                self._model.load_state_dict(snap["model"])
            else:
                for i, p in enumerate(self._params):
                    p.copy_(snap["model"][str(i)])
            opt = self._optimizer
            assert opt is not None
            for p, saved in zip(self._params, snap["optim"], strict=True):
                cur = opt.state.get(p)
                if not saved:
                    # The optimizer re-initializes it lazily, as at the start.
                    opt.state.pop(p, None)
                    continue
                if cur is None:
                    opt.state[p] = cur = {}
                for k, v in saved.items():
                    old = cur.get(k)
                    if isinstance(v, Tensor) and isinstance(old, Tensor) and old.shape == v.shape:
                        old.copy_(v)  # in place: fused/capturable optimizers keep their buffers
                    elif isinstance(v, Tensor):
                        # A copy: the optimizer updates it in place, the snapshot must stay intact.
                        cur[k] = v.clone() if k == "step" else v.to(p.device, copy=True)
                    else:
                        cur[k] = v
                for k in [k for k in cur if k not in saved]:
                    del cur[k]

    # ----- the step -------------------------------------------------------------------------------
    def apply(self, ctx: StepContext) -> None:
        host = ctx.host
        assert host is not None
        if self._snapshot is None:
            self.take_snapshot(ctx.step)
        bad = not host.finite or (host.loss is not None and not math.isfinite(host.loss))
        if bad:
            self.recover(ctx, "nonfinite")

    def recover(self, ctx: StepContext, why: str) -> bool:
        """Restore the last good snapshot and cancel this step; False if there is none.

        Called by :meth:`apply` for a non-finite gradient or loss, and by the Guard when a step it
        took left non-finite weights (``why`` names what it saw). Raises
        :class:`~gradguard.errors.TrainingHalted` after ``max_consecutive`` recoveries with no
        good step between them.
        """
        if self._snapshot is None:
            # Nothing good to go back to (the parameters were already non-finite): just skip.
            ctx.request_skip("nonfinite_no_snapshot")
            ctx.record(self.name, False)
            return False
        self.state["consecutive"] += 1
        if self.state["consecutive"] > self.max_consecutive:
            raise TrainingHalted(
                f"training went non-finite ({why}) {self.state['consecutive']} times in a row after "
                f"rolling back to step {self.state['snapshot_step']}; it will not recover by itself: "
                "lower the learning rate, or add clipping (e.g. policy='zclip+rollback+lr_backoff')",
                "rollback_exhausted",
            )
        self.restore()
        self.state["rollbacks"] += 1
        ctx.rollback = True
        ctx.request_skip("rollback")
        ctx.record(self.name, True)
        return True

    def after_step(self, ctx: StepContext, stepped: bool) -> None:
        if not stepped:
            return
        self.state["consecutive"] = 0
        self.state["since_snapshot"] += 1
        if self.state["since_snapshot"] >= self.every:
            self.take_snapshot(ctx.step)

    def state_dict(self) -> dict:
        sd = dict(self.state)
        if self._snapshot is not None and not self._snapshot.get("on_disk"):
            sd["snapshot"] = self._snapshot
        return sd

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        snap = state.pop("snapshot", None)
        self.state.update(state)
        if snap is not None:
            self._snapshot = snap
        elif self.to == "disk" and self._file is not None and self._file.exists():
            self._snapshot = {"on_disk": True}
