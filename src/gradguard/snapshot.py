"""A snapshot of a model and its optimizer: taken, checked, written, read, and loaded back.

What ``rollback`` keeps and what the Guard restores when rollback decides to go back. A snapshot
is a dict: ``model`` (the module's ``state_dict``, parameters and buffers, or the parameters by
index where the Guard has no module) and ``optim`` (each parameter's optimizer state, in the
layout's order); param-group hyperparameters (the LR) are not in it, so schedulers keep control.

A snapshot carries a fingerprint of the parameters (names, shapes, dtypes) and the identity of the
run that took it. On disk it is the ``torch.save`` archive followed by a trailer: the metadata as
JSON, a BLAKE2b checksum of everything before it, the metadata's length and a magic tag
(``torch.load`` ignores bytes after the archive, so the file still loads with it). A snapshot is
validated whole (:func:`meta_problem`, :func:`content_problem`) before a single tensor is
restored (:func:`load_snapshot_`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ._lazy import torch
from .errors import ConfigError
from .stats import all_finite

if TYPE_CHECKING:
    from torch import Tensor

    from .layout import ParamLayout

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
                torch.save(obj, w)  # type: ignore[arg-type]  # torch writes to any .write()/.flush()
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


class UnreadableSnapshot(Exception):
    """What is wrong with a snapshot file (the caller names the file)."""


def _read_trailer(f: BinaryIO, size: int) -> tuple[bytes, int, dict[str, Any]]:
    """(checksum, length of the archive, metadata) from an open snapshot file."""
    if size < _TAIL.size:
        raise UnreadableSnapshot(f"it is {size} bytes, too short to be a snapshot (truncated?)")
    f.seek(size - _TAIL.size)
    digest, meta_len, magic = _TAIL.unpack(f.read(_TAIL.size))
    payload = size - _TAIL.size - meta_len
    if magic != _MAGIC or payload <= 0:
        raise UnreadableSnapshot(
            "it does not end with gradguard's checksum trailer: the file was truncated, "
            "overwritten by something else, or written by an older gradguard"
        )
    f.seek(payload)
    try:
        meta = json.loads(f.read(meta_len))
    except ValueError as e:
        raise UnreadableSnapshot(f"its metadata is damaged ({e})") from None
    if not isinstance(meta, dict):
        raise UnreadableSnapshot("its metadata is damaged (not a JSON object)")
    return digest, payload, meta


def read_snapshot_meta(path: Path) -> dict[str, Any]:
    """The metadata of a snapshot file (run id, step, fingerprint), read from its trailer only:
    cheap, but the checksum is not verified (:func:`verify_snapshot` does)."""
    with open(path, "rb") as f:
        return _read_trailer(f, os.fstat(f.fileno()).st_size)[2]


def verify_snapshot(path: Path) -> dict[str, Any]:
    """Check a snapshot file's checksum (streamed, in 1 MiB chunks); return its metadata.
    Raises :class:`UnreadableSnapshot` saying what is wrong."""
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
        raise UnreadableSnapshot(
            "its checksum does not match its bytes: the file was damaged after it was written "
            "(a bad disk, or another process writing to it)"
        )
    return meta


def check_writable(folder: Path) -> None:
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


# ----- what a snapshot holds ----------------------------------------------------------------------
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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nonfinite_entry(snap: dict[str, Any]) -> str | None:
    """Where the first non-finite value of a snapshot is (``model[name]`` or ``optim[i][key]``)."""
    for k, v in snap["model"].items():
        if isinstance(v, torch.Tensor) and _first_nonfinite(v) is not None:
            return f"model[{k}] element {_first_nonfinite(v)}"
    for i, saved in enumerate(snap["optim"]):
        for k, v in saved.items():
            if isinstance(v, torch.Tensor) and _first_nonfinite(v) is not None:
                return f"optimizer state[{i}][{k}] element {_first_nonfinite(v)}"
    return None


def _clone_to(obj: Any, device: torch.device | None) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to(device, copy=True) if device is not None else t.clone()
    if isinstance(obj, dict):
        return {k: _clone_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_to(v, device) for v in obj)
    return obj


def _model_state(layout: ParamLayout) -> dict[str, Any]:
    """The module's ``state_dict``, or the parameters by index where the layout has no module."""
    if layout.module is not None:
        return layout.module.state_dict()
    return {str(i): p for i, p in enumerate(layout.params)}


def params_finite(layout: ParamLayout) -> bool:
    """Every parameter finite (one fused pass, exact where a norm overflows: huge is finite)."""
    return all_finite([p.detach() for p in layout.params])


def capture(layout: ParamLayout, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """A copy, in CPU memory, of the model's state and each parameter's optimizer state; None if
    any of it is not finite (not a good state to go back to)."""
    if not params_finite(layout):
        return None
    live = {
        "model": _model_state(layout),
        "optim": [optimizer.state.get(p, {}) for p in layout.params],
    }
    snap: dict[str, Any] = _clone_to(live, torch.device("cpu"))
    return None if nonfinite_entry(snap) is not None else snap


def fingerprint(layout: ParamLayout) -> list[list[Any]]:
    """Each parameter's name, shape and dtype: what a snapshot must match to be loaded."""
    return [
        [n, list(p.shape), dtype_name(p.dtype)]
        for n, p in zip(layout.names, layout.params, strict=True)
    ]


def meta_problem(meta: Any, run_id: str | None, mine: list[list[Any]]) -> str | None:
    """What makes a snapshot's metadata not this run's (``run_id``) or not of this model (its
    fingerprint ``mine``), or None."""
    if not isinstance(meta, dict):
        return "its metadata is malformed"
    theirs = meta.get("run_id")
    if run_id is not None and theirs is not None and theirs != run_id:
        return (
            f"it was taken by another run (run id {theirs}, this run's is {run_id}): do two "
            "runs share the folder? Give each run its own rollback path"
        )
    saved = meta.get("fingerprint")
    if saved is not None and saved != mine:
        if not isinstance(saved, list):
            return "its parameter fingerprint is malformed"
        i = next(
            (i for i, (a, b) in enumerate(zip(saved, mine, strict=False)) if a != b),
            min(len(saved), len(mine)),
        )

        def show(fp: list[Any], i: int) -> str:
            return " ".join(map(str, fp[i])) if i < len(fp) else "nothing"

        return (
            f"it is a snapshot of another model ({len(saved)} parameters where this one has "
            f"{len(mine)}; parameter {i} is {show(saved, i)} in it but {show(mine, i)} here)"
        )
    return None


def _tensor_mismatch(what: str, v: Tensor, cur: Tensor) -> str | None:
    if tuple(v.shape) != tuple(cur.shape) or v.dtype != cur.dtype:
        return (
            f"{what} is {dtype_name(v.dtype)} {tuple(v.shape)} in it but "
            f"{dtype_name(cur.dtype)} {tuple(cur.shape)} here"
        )
    return None


def _model_problem(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    missing = [k for k in current if k not in saved]
    extra = [k for k in saved if k not in current]
    if missing or extra:
        return (
            f"its model state does not match this model's (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    for k, cur in current.items():
        v = saved[k]
        if not isinstance(cur, torch.Tensor):
            continue
        if not isinstance(v, torch.Tensor):
            return f"model[{k}] is {type(v).__name__}, not a tensor"
        problem = _tensor_mismatch(f"model[{k}]", v, cur)
        if problem is not None:
            return problem
    return None


def _optim_problem(
    optim: Any, layout: ParamLayout, optimizer: torch.optim.Optimizer | None
) -> str | None:
    params = layout.params
    if len(optim) != len(params):
        return f"it holds optimizer state for {len(optim)} parameters, this optimizer has {len(params)}"
    for i, (p, st) in enumerate(zip(params, optim, strict=True)):
        if not isinstance(st, dict):
            return f"optimizer state[{i}] is {type(st).__name__}, not a dict"
        cur_st = optimizer.state.get(p, {}) if optimizer is not None else {}
        for k, v in st.items():
            cur = cur_st.get(k)
            if isinstance(v, torch.Tensor) and isinstance(cur, torch.Tensor):
                problem = _tensor_mismatch(f"optimizer state[{i}][{k}]", v, cur)
                if problem is not None:
                    return problem
    return None


def content_problem(
    snap: Any, layout: ParamLayout, optimizer: torch.optim.Optimizer | None
) -> str | None:
    """What makes a snapshot's tensors unfit to restore into this model and optimizer: a
    missing or extra entry, another shape or dtype, a non-finite value. None if fit."""
    if not (
        isinstance(snap, dict)
        and isinstance(snap.get("model"), dict)
        and isinstance(snap.get("optim"), (list, tuple))
    ):
        return "it is not a rollback snapshot (a dict of model and optim)"
    problem = _model_problem(snap["model"], _model_state(layout)) or _optim_problem(
        snap["optim"], layout, optimizer
    )
    if problem is not None:
        return problem
    where = nonfinite_entry(snap)
    if where is not None:
        return f"{where} is not finite: it was damaged after it was taken"
    return None


# ----- loading one back ---------------------------------------------------------------------------
def _load_param_state_(optimizer: torch.optim.Optimizer, p: Tensor, saved: dict[str, Any]) -> None:
    """Put ``saved`` back as ``p``'s optimizer state, in place where the shapes allow."""
    cur = optimizer.state.get(p)
    if not saved:
        # The optimizer re-initializes it lazily, as at the start.
        optimizer.state.pop(p, None)
        return
    if cur is None:
        optimizer.state[p] = cur = {}
    for k, v in saved.items():
        old = cur.get(k)
        if isinstance(v, torch.Tensor) and isinstance(old, torch.Tensor) and old.shape == v.shape:
            old.copy_(v)  # in place: fused/capturable optimizers keep their buffers
        elif isinstance(v, torch.Tensor):
            # A copy: the optimizer updates it in place, the snapshot must stay intact.
            cur[k] = v.clone() if k == "step" else v.to(p.device, copy=True)
        else:
            cur[k] = v
    for k in [k for k in cur if k not in saved]:
        del cur[k]


def load_snapshot_(
    layout: ParamLayout, optimizer: torch.optim.Optimizer, snap: dict[str, Any]
) -> None:
    """Load a validated snapshot (:func:`content_problem` None) into the model and optimizer, in
    place. The snapshot itself is left intact: it can be loaded again."""
    with torch.no_grad():
        if layout.module is not None:
            layout.module.load_state_dict(snap["model"])
        else:
            for i, p in enumerate(layout.params):
                p.copy_(snap["model"][str(i)])
        for p, saved in zip(layout.params, snap["optim"], strict=True):
            _load_param_state_(optimizer, p, saved)
