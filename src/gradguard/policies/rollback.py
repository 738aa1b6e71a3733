"""Roll back to the last good model and optimizer state when training goes non-finite.

A snapshot carries a fingerprint of the parameters (names, shapes, dtypes) and the identity of the
run that took it (a random id made at bind and kept in the policy's state, so a resumed run knows
its own snapshots). On disk it is the ``torch.save`` archive followed by a trailer: the metadata as
JSON, a BLAKE2b checksum of everything before it, the metadata's length and a magic tag
(``torch.load`` ignores bytes after the archive, so the file still loads with it). A snapshot is
validated whole before a single tensor is restored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from torch import Tensor

from ..errors import ConfigError, GradGuardError, SnapshotError, SpecError, TrainingHalted
from ..stats import all_finite
from .base import Policy, StepContext, check_keys, check_number, refuse_state
from .registry import register

#: The last bytes of a snapshot file: checksum (32), metadata length (8), magic (8).
_MAGIC = b"GGSNAP1\n"
_TAIL = struct.Struct("<32sQ8s")
_CHUNK = 1 << 20


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it (``torch.save`` streams into
    it) and keeps the first OSError (torch turns it into an opaque RuntimeError)."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.hash = hashlib.blake2b(digest_size=32)
        self.error: OSError | None = None

    def write(self, b: bytes) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise
        self.hash.update(b)
        return n

    def flush(self) -> None:
        self.f.flush()


def write_snapshot(obj: Any, meta: dict[str, Any], path: Path) -> None:
    """``torch.save(obj)`` plus the checksummed metadata trailer, atomically: written to a temp file
    in the same folder, fsynced, then renamed over ``path``. An OSError is the disk's own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            w = _HashingWriter(f)
            try:
                torch.save(obj, w)
            except Exception:
                if w.error is not None:
                    raise w.error from None
                raise
            meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
            w.write(meta_bytes)
            f.write(_TAIL.pack(w.hash.digest(), len(meta_bytes), _MAGIC))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Unreadable(Exception):
    """What is wrong with a snapshot file (the caller names the file)."""


def _read_trailer(f: BinaryIO, size: int) -> tuple[bytes, int, dict[str, Any]]:
    """(checksum, length of the archive, metadata) from an open snapshot file."""
    if size < _TAIL.size:
        raise _Unreadable(f"it is {size} bytes, too short to be a snapshot (truncated?)")
    f.seek(size - _TAIL.size)
    digest, meta_len, magic = _TAIL.unpack(f.read(_TAIL.size))
    payload = size - _TAIL.size - meta_len
    if magic != _MAGIC or payload <= 0:
        raise _Unreadable(
            "it does not end with gradguard's checksum trailer: the file was truncated, "
            "overwritten by something else, or written by an older gradguard"
        )
    f.seek(payload)
    try:
        meta = json.loads(f.read(meta_len))
    except ValueError as e:
        raise _Unreadable(f"its metadata is damaged ({e})") from None
    if not isinstance(meta, dict):
        raise _Unreadable("its metadata is damaged (not a JSON object)")
    return digest, payload, meta


def read_snapshot_meta(path: Path) -> dict[str, Any]:
    """The metadata of a snapshot file (run id, step, fingerprint), read from its trailer only:
    cheap, but the checksum is not verified (:func:`verify_snapshot` does)."""
    with open(path, "rb") as f:
        return _read_trailer(f, os.fstat(f.fileno()).st_size)[2]


def verify_snapshot(path: Path) -> dict[str, Any]:
    """Check a snapshot file's checksum (streamed, in 1 MiB chunks); return its metadata.
    Raises :class:`_Unreadable` saying what is wrong."""
    with open(path, "rb") as f:
        digest, _, meta = _read_trailer(f, os.fstat(f.fileno()).st_size)
        h = hashlib.blake2b(digest_size=32)
        f.seek(0)
        left = os.fstat(f.fileno()).st_size - _TAIL.size
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    if h.digest() != digest:
        raise _Unreadable(
            "its checksum does not match its bytes: the file was damaged after it was written "
            "(a bad disk, or another process writing to it)"
        )
    return meta


def _check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write and delete a probe file in it; ConfigError if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".gradguard-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"rollback cannot write its snapshots to {folder}: {e.strerror or e}. Give it a folder "
            "this process can write (rollback:to=disk,path=...), or fix the folder's permissions"
        ) from e


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


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _first_nonfinite(t: Tensor) -> int | None:
    t = _local(t).detach()
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return None
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    return int(bad.reshape(-1).nonzero()[0])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _snapshot_finite(snap: dict[str, Any]) -> str | None:
    """Where the first non-finite value of a snapshot is (``model[name]`` or ``optim[i][key]``)."""
    for k, v in snap["model"].items():
        if isinstance(v, Tensor) and _first_nonfinite(v) is not None:
            return f"model[{k}] element {_first_nonfinite(v)}"
    for i, saved in enumerate(snap["optim"]):
        for k, v in saved.items():
            if isinstance(v, Tensor) and _first_nonfinite(v) is not None:
                return f"optimizer state[{i}][{k}] element {_first_nonfinite(v)}"
    return None


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
    (default: a temp folder, removed by ``guard.close()``, when the Guard is garbage-collected, or
    at exit) with a checksum, and reads it back with ``weights_only=True``. The folder is checked
    writable when the Guard is built. After ``max_consecutive`` rollbacks with no good step between
    them, raises: the run cannot recover by itself (lower the LR).

    Before restoring, the whole snapshot is validated: its checksum (on disk), that it is this
    run's (a folder shared by two runs holds the other's), that its parameters have the names,
    shapes and dtypes of the model's, and that every tensor in it is finite. A snapshot that fails
    raises :class:`~gradguard.errors.GradGuardError` naming the file and the problem, with nothing
    restored. A state dict saved before snapshots carried a run id resumes without trusting the
    file on disk: a fresh snapshot is taken at the next step.
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
        self.state = {
            "snapshot_step": None,
            "since_snapshot": 0,
            "consecutive": 0,
            "rollbacks": 0,
            "run_id": None,
        }
        self._snapshot: dict[str, Any] | None = None
        self._model: torch.nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._params: list[Tensor] = []
        self._names: list[str] = []
        self._file: Path | None = None
        self._tmpdir: Path | None = None
        self._cleanup: weakref.finalize | None = None

    def bind(self, layout, optimizer) -> None:
        self._model = layout.module
        self._optimizer = optimizer
        self._params = layout.params
        self._names = layout.names
        if self.state["run_id"] is None:
            self.state["run_id"] = uuid.uuid4().hex
        if self.to == "disk":
            if self.path:
                folder = Path(self.path)
            else:
                if self._tmpdir is None:
                    self._tmpdir = Path(tempfile.mkdtemp(prefix="gradguard-rollback-"))
                folder = self._tmpdir
                self._watch_tmpdir()
            if folder.exists() and not folder.is_dir():
                raise ConfigError(
                    f"rollback path {folder} exists and is not a folder; give a folder path"
                )
            _check_writable(folder)
            # Under torch.distributed every rank snapshots its own (possibly sharded) state.
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                self._file = folder / f"last_good.rank{dist.get_rank()}.pt"
            else:
                self._file = folder / "last_good.pt"

    def _watch_tmpdir(self) -> None:
        """Remove the temp folder at close(), when this policy is garbage-collected, or at exit."""
        if self._tmpdir is not None and (self._cleanup is None or not self._cleanup.alive):
            self._cleanup = weakref.finalize(
                self, shutil.rmtree, str(self._tmpdir), ignore_errors=True
            )

    def close(self) -> None:
        if self._cleanup is not None and self._cleanup.alive:
            self._cleanup()
            if self._snapshot is not None and self._snapshot.get("on_disk"):
                self._snapshot = None  # the file went with the folder

    # ----- fingerprint ----------------------------------------------------------------------------
    def _fingerprint(self) -> list[list]:
        return [
            [n, list(p.shape), _dtype_name(p.dtype)]
            for n, p in zip(self._names, self._params, strict=True)
        ]

    def _meta(self, step: int) -> dict[str, Any]:
        return {
            "format": 1,
            "run_id": self.state["run_id"],
            "step": step,
            "fingerprint": self._fingerprint(),
        }

    def _meta_problem(self, meta: Any, run_id: str | None) -> str | None:
        """What makes a snapshot's metadata not this run's, or None."""
        if not isinstance(meta, dict):
            return "its metadata is malformed"
        theirs = meta.get("run_id")
        if run_id is not None and theirs is not None and theirs != run_id:
            return (
                f"it was taken by another run (run id {theirs}, this run's is {run_id}): do two "
                "runs share the folder? Give each run its own rollback path"
            )
        saved = meta.get("fingerprint")
        mine = self._fingerprint()
        if saved is not None and saved != mine:
            if not isinstance(saved, list):
                return "its parameter fingerprint is malformed"
            i = next(
                (i for i, (a, b) in enumerate(zip(saved, mine, strict=False)) if a != b),
                min(len(saved), len(mine)),
            )

            def show(fp: list, i: int) -> str:
                return " ".join(map(str, fp[i])) if i < len(fp) else "nothing"

            return (
                f"it is a snapshot of another model ({len(saved)} parameters where this one has "
                f"{len(mine)}; parameter {i} is {show(saved, i)} in it but {show(mine, i)} here)"
            )
        return None

    def _content_problem(self, snap: Any) -> str | None:
        """What makes a snapshot's tensors unfit to restore into this model and optimizer: a
        missing or extra entry, another shape or dtype, a non-finite value. None if fit."""
        if not (
            isinstance(snap, dict)
            and isinstance(snap.get("model"), dict)
            and isinstance(snap.get("optim"), (list, tuple))
        ):
            return "it is not a rollback snapshot (a dict of model and optim)"
        if self._model is not None:
            current: dict[str, Any] = self._model.state_dict()
        else:
            current = {str(i): p for i, p in enumerate(self._params)}
        saved = snap["model"]
        missing = [k for k in current if k not in saved]
        extra = [k for k in saved if k not in current]
        if missing or extra:
            return (
                f"its model state does not match this model's (missing {missing[:3]}, "
                f"unexpected {extra[:3]})"
            )
        for k, cur in current.items():
            v = saved[k]
            if not isinstance(cur, Tensor):
                continue
            if not isinstance(v, Tensor):
                return f"model[{k}] is {type(v).__name__}, not a tensor"
            if tuple(v.shape) != tuple(cur.shape) or v.dtype != cur.dtype:
                return (
                    f"model[{k}] is {_dtype_name(v.dtype)} {tuple(v.shape)} in it but "
                    f"{_dtype_name(cur.dtype)} {tuple(cur.shape)} here"
                )
        optim = snap["optim"]
        if len(optim) != len(self._params):
            return f"it holds optimizer state for {len(optim)} parameters, this optimizer has {len(self._params)}"
        opt = self._optimizer
        for i, (p, st) in enumerate(zip(self._params, optim, strict=True)):
            if not isinstance(st, dict):
                return f"optimizer state[{i}] is {type(st).__name__}, not a dict"
            cur_st = opt.state.get(p, {}) if opt is not None else {}
            for k, v in st.items():
                cur = cur_st.get(k)
                if (
                    isinstance(v, Tensor)
                    and isinstance(cur, Tensor)
                    and (tuple(v.shape) != tuple(cur.shape) or v.dtype != cur.dtype)
                ):
                    return (
                        f"optimizer state[{i}][{k}] is {_dtype_name(v.dtype)} {tuple(v.shape)} "
                        f"in it but {_dtype_name(cur.dtype)} {tuple(cur.shape)} here"
                    )
        where = _snapshot_finite(snap)
        if where is not None:
            return f"{where} is not finite: it was damaged after it was taken"
        return None

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
        # stats.all_finite: one fused pass, exact where a norm overflowed (huge weights are finite)
        return all_finite([p.detach() for p in self._params])

    def take_snapshot(self, step: int) -> bool:
        """Snapshot the model and optimizer if everything in them is finite; False if not.

        On disk, a failed write raises :class:`~gradguard.errors.SnapshotError` naming the folder;
        the previous snapshot file and this policy's state are left as they were."""
        if not self._params_finite():
            return False
        snap = _clone_to(self._capture(), torch.device("cpu"))
        if _snapshot_finite(snap) is not None:
            return False  # a non-finite buffer or optimizer state: not a good state to go back to
        meta = self._meta(step)
        if self.to == "disk":
            assert self._file is not None
            self._watch_tmpdir()  # again if close() removed it and the run went on
            try:
                write_snapshot(snap, meta, self._file)
            except OSError as e:
                raise SnapshotError(
                    f"rollback could not write its snapshot to {self._file.parent}: {e}. Free "
                    "space there or fix its permissions, or give rollback a folder it can write "
                    "(rollback:to=disk,path=...); the previous snapshot is kept"
                ) from e
            self._snapshot = {"on_disk": True}
        else:
            snap["meta"] = meta
            self._snapshot = snap
        self.state["snapshot_step"] = step
        self.state["since_snapshot"] = 0
        return True

    def _load_checked(self) -> dict[str, Any]:
        """The snapshot to restore, validated whole (nothing is restored if this raises)."""
        if self._snapshot is None:
            raise GradGuardError("rollback requested before any snapshot was taken")
        run_id = self.state["run_id"]
        if not self._snapshot.get("on_disk"):
            snap = self._snapshot
            problem = self._meta_problem(snap.get("meta", {}), run_id)
            if problem is not None:
                raise GradGuardError(
                    f"refused to restore the in-memory rollback snapshot: {problem}; nothing was "
                    "restored"
                )
            return snap
        file = self._file
        assert file is not None
        try:
            meta = verify_snapshot(file)
            snap = torch.load(file, map_location="cpu", weights_only=True)
        except _Unreadable as e:
            raise GradGuardError(
                f"could not read the rollback snapshot {file}: {e}; nothing was restored"
            ) from None
        except Exception as e:
            raise GradGuardError(f"could not read the rollback snapshot {file}: {e}") from e
        problem = self._meta_problem(meta, run_id) or self._content_problem(snap)
        if problem is not None:
            raise GradGuardError(
                f"refused to restore the rollback snapshot {file}: {problem}; nothing was restored"
            )
        return snap

    def restore(self) -> None:
        snap = self._load_checked()
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
        consecutive = self.state["consecutive"] + 1
        if consecutive > self.max_consecutive:
            self.state["consecutive"] = consecutive
            raise TrainingHalted(
                f"training went non-finite ({why}) {consecutive} times in a row after "
                f"rolling back to step {self.state['snapshot_step']}; it will not recover by itself: "
                "lower the learning rate, or add clipping (e.g. policy='zclip+rollback+lr_backoff')",
                "rollback_exhausted",
            )
        self.restore()
        self.state["consecutive"] = consecutive
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

    def check_state(self, state) -> None:
        """Counters: integers >= 0 (``snapshot_step`` None before the first snapshot); ``run_id``
        a string (absent in a state saved before snapshots carried one); ``snapshot`` (an
        in-memory snapshot) this run's, of this model, every tensor finite."""
        name = self.name
        check_keys(
            name,
            state,
            ("snapshot_step", "since_snapshot", "consecutive", "rollbacks"),
            optional=("run_id", "snapshot"),
        )
        check_number(
            name, "snapshot_step", state["snapshot_step"], integer=True, nonneg=True, nullable=True
        )
        for key in ("since_snapshot", "consecutive", "rollbacks"):
            check_number(name, key, state[key], integer=True, nonneg=True)
        run_id = state.get("run_id")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            refuse_state(name, "run_id", run_id, "it must be the run id string rollback made")
        snap = state.get("snapshot")
        if snap is not None:
            problem = None
            if isinstance(snap, dict):
                problem = self._meta_problem(snap.get("meta", {}), run_id)
            problem = problem or self._content_problem(snap)
            if problem is not None:
                raise ConfigError(
                    f"{name}: cannot load the saved state's snapshot (an in-memory snapshot): "
                    f"{problem}; load the state this run saved, into a Guard on the same model, or "
                    "drop its 'snapshot' entry to start without one"
                )

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        snap = state.pop("snapshot", None)
        run_id = state.pop("run_id", None)
        self.state.update(state)
        if run_id is None and isinstance(snap, dict) and isinstance(snap.get("meta"), dict):
            run_id = snap["meta"].get("run_id")
        if run_id is not None:
            self.state["run_id"] = run_id  # the run resumes: its own snapshots are accepted
        if snap is not None:
            self._snapshot = snap
            return
        self._snapshot = None
        if self.to != "disk" or self._file is None or not self._file.exists():
            return
        if run_id is None:
            # Saved before snapshots carried a run id: whose the file is cannot be told. A fresh
            # snapshot is taken at the next step instead.
            return
        try:
            problem = self._meta_problem(read_snapshot_meta(self._file), run_id)
        except (OSError, _Unreadable) as e:
            problem = str(e)
        if problem is None:
            self._snapshot = {"on_disk": True}
        else:
            warnings.warn(
                f"rollback: the snapshot {self._file} is not used ({problem}); a fresh one is "
                "taken at the next step, replacing it",
                stacklevel=3,
            )
