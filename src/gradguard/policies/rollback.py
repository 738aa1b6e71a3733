"""Roll back to the last good model and optimizer state when training goes non-finite or the loss
runs away while the weights stay finite.

The policy decides: when to take a snapshot, which kept one to go back to, what was undone and
how the LR is cut. The snapshots themselves (what they hold, their file format, their checks) are
:mod:`gradguard.snapshot`'s, and the Guard loads the one rollback picks
(:meth:`StepContext.request_restore`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import uuid
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .._lazy import torch
from ..errors import ConfigError, GradGuardError, SnapshotError, SpecError, TrainingHalted
from ..snapshot import (
    UnreadableSnapshot,
    capture,
    check_writable,
    content_problem,
    fingerprint,
    meta_problem,
    read_snapshot_meta,
    verify_snapshot,
    write_snapshot,
)
from .base import (
    Policy,
    StepContext,
    check_keys,
    check_number,
    check_numbers,
    refuse_state,
)
from .registry import register

if TYPE_CHECKING:
    from ..layout import ParamLayout

#: The LR scale a run of runaways can cut rollback's LR to, at the lowest.
MIN_LR_SCALE = 1e-3


def skip_batches(ranges: list[tuple[int, int]] | list[list[int]]) -> list[int]:
    """Every step index in the inclusive ``(start, end)`` ranges, sorted, each once."""
    return sorted({s for a, b in ranges for s in range(int(a), int(b) + 1)})


def write_skip_batches(ranges: list[tuple[int, int]] | list[list[int]], path: str | Path) -> Path:
    """Write the steps in ``ranges`` as Lightning's ``SpikeDetection`` writes the batches to
    exclude: a JSON list of batch indices (here: optimizer step indices, the index of the batch a
    step trained on when one batch makes one step). ``path`` is the file, or a folder to write
    ``skip_batches.json`` in (as Lightning does when the path does not end in ``.json``). Written
    atomically; returns the file's path."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "skip_batches.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(skip_batches(ranges), f, indent=4)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def _count(name: str, v: Any, low: int) -> int:
    """An integer option >= ``low``, or a SpecError naming it."""
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise SpecError(f"{name} must be an integer >= {low}, got {v!r}")
    return v


def _real(name: str, v: Any) -> float:
    """A finite number option, or a SpecError naming it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SpecError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _initial_state() -> dict[str, Any]:
    """rollback's state before its first step."""
    return {
        "snapshot_step": None,
        "since_snapshot": 0,
        "consecutive": 0,
        "rollbacks": 0,
        "run_id": None,
        # the runaway trigger
        "losses": [],
        "high": 0,
        "high_since": None,
        "runaways": 0,
        "retries": 0,
        "lr_scale": 1.0,
        # what was undone: inclusive step ranges, and what each kept snapshot is
        "skipped": [],
        "slots": [],
    }


def _check_skipped(state: Any) -> None:
    """``skipped``: ``[start, end]`` step pairs with start <= end."""
    if "skipped" not in state:
        return
    ranges = state["skipped"]
    if not isinstance(ranges, (list, tuple)):
        refuse_state("rollback", "skipped", ranges, "it must be a list of [start, end] steps")
    for i, r in enumerate(ranges):
        check_numbers("rollback", f"skipped[{i}]", r, integer=True, nonneg=True, length=2)
        if r[0] > r[1]:
            refuse_state("rollback", f"skipped[{i}]", r, "its start must be <= its end")


@register
class rollback(Policy):
    """Keep the last good model + optimizer state; restore it when training goes non-finite, or
    when the loss runs away while the weights stay finite (PaLM's recipe, automated: go back to a
    state from before the spike, skip the data, carry on); skip the step, and continue.

    **Snapshots.** One is taken before the first step and then every ``every`` applied steps, only
    if every parameter is finite then (a parameter norm pass, amortized over ``every`` steps) and
    not while the loss is above its runaway threshold (it waits for a calm step). It holds the
    model's ``state_dict`` (parameters and buffers, e.g. BatchNorm statistics) and each parameter's
    optimizer state; param-group hyperparameters (the LR) are left as they are so schedulers and
    ``lr_backoff`` keep control of them. With ``runaway`` on, the last **two** snapshots are kept
    (one without it): the newest may postdate the start of a runaway. Memory: at most 2 x (model
    state + optimizer state), e.g. 2 x 3 x the parameters' bytes for Adam, in CPU memory with
    ``to="memory"`` or on disk with ``to="disk"`` (``benchmarks/bench_rollback_snapshot.py``
    measures the bytes and the time).

    **Non-finite** gradients or loss (in :meth:`apply`), or weights after the step (the Guard calls
    :meth:`recover`): the newest snapshot is restored. After ``max_consecutive`` such rollbacks
    with no good step between them, raises: the run cannot recover by itself (lower the LR).

    **Finite runaway** (``runaway=True``, needs ``guard.step(loss=...)``; without a loss this
    trigger is inactive): the loss's robust running level is the median (and MAD) of the last
    ``window`` finite losses of applied steps whose loss was not high. A loss is high when above
    ``level + max(z * 1.4826 * MAD, rel * |level|)``; high losses stay out of the window. After
    ``patience`` high losses in a row (checked once the window holds ``window // 2`` losses):

    - restore the newest snapshot whose weights gave a calm loss, i.e. one that begins before
      the first high loss (else the older one): a state from before the loss started rising,
      with the loss window it had then;
    - skip this step, and record the steps whose updates were undone (from the snapshot to this
      step; the caller's data stream goes on, so their batches are not replayed) in
      :attr:`skipped_steps`, ``report.metrics`` (``rollback.skipped_from``/``_to``) and
      :meth:`write_skip_batches` (Lightning's ``skip_batches.json`` format);
    - multiply the LR by ``lr_factor`` (not below 1e-3), applied around the optimizer step as
      ``lr_backoff`` does (schedulers untouched), and grow it back geometrically over
      ``lr_recover`` calm steps so that one cut is undone in that many;
    - after ``max_consecutive`` runaway rollbacks with no new snapshot between them, or
      ``max_runaways`` in the whole run, raise
      :class:`~gradguard.errors.TrainingHalted` (reason ``runaway_exhausted``).

    **Rerun attribution** (``on``, with ``guard.step(replay=...)``): ``on="any"`` (the default)
    rolls back on every non-finite step, as above. ``on="reproducible"`` acts on what the step's
    rerun showed (``StepContext.rerun``): a non-finite step whose rerun was finite again
    (``transient``: hardware, nondeterminism) is only skipped, with nothing restored; one whose
    rerun was non-finite again (``reproducible``: the state or the data) rolls back and records its
    steps as skipped data, as above; so does a spike that a policy before this one in the chain
    skipped (``skip_spike+rollback:on=reproducible``) when its rerun reproduced it. A step without
    a rerun (no ``replay`` given) is handled as with ``on="any"``.

    A non-finite value while the loss is already high ends the runaway: it is handled as one.
    Another policy can ask for the same recovery with :meth:`StepContext.request_rollback`
    (e.g. an update/weight ratio far above its history); it is honoured before the update.

    Defaults, measured (``docs/policies.md``): ``window=100, z=8, rel=0.5, patience=4`` never
    fire on 27 healthy runs of the bench (the digits MLP at LRs 0.01 to 0.3, the digits CNN, the
    LSTM on temporal order, the vanilla RNN on adding, the GPT at LRs 1e-3 and 1e-2; their worst
    4-step stretch stays below 0.27 of the way from the level to the threshold), and catch the
    faults suite's LR burst 4 steps after its first high loss; ``lr_factor=0.5`` (as
    ``lr_backoff``), ``lr_recover=100``. Chaining ``lr_backoff`` cuts the LR on top (it counts the
    rollbacks as incidents): set ``lr_factor=1`` to leave the LR to it. A run whose loss
    legitimately moves to a higher level for good (a new data phase) would be taken for a
    runaway: set ``runaway=false`` there.

    ``to="memory"`` keeps the snapshots in CPU memory; ``to="disk"`` writes them atomically to
    ``path`` (default: a temp folder, removed by ``guard.close()``, when the Guard is
    garbage-collected, or at exit) as ``last_good.pt`` (the newest) and ``last_good.prev.pt``, with
    a checksum, and reads them back with ``weights_only=True``. The folder is checked writable when
    the Guard is built.

    Before restoring, the whole snapshot is validated: its checksum (on disk), that it is this
    run's (a folder shared by two runs holds the other's), that its parameters have the names,
    shapes and dtypes of the model's, and that every tensor in it is finite. A snapshot that fails
    raises :class:`~gradguard.errors.GradGuardError` naming the file and the problem, with nothing
    restored. A state dict saved before snapshots carried a run id resumes without trusting the
    file on disk: a fresh snapshot is taken at the next step.
    """

    name = "rollback"
    keras_refusal = (
        "it restores a snapshot of the model and the optimizer, which a Keras optimizer cannot "
        "reach from inside a compiled train step; use keras.callbacks.BackupAndRestore or "
        "ModelCheckpoint to resume from a good state"
    )
    needs_host = True
    kind = "skip"

    def __init__(
        self,
        every: int = 100,
        to: Literal["memory", "disk"] = "memory",
        path: str | None = None,
        max_consecutive: int = 5,
        runaway: bool = True,
        window: int = 100,
        z: float = 8.0,
        rel: float = 0.5,
        patience: int = 4,
        lr_factor: float = 0.5,
        lr_recover: int = 100,
        max_runaways: int = 20,
        on: Literal["any", "reproducible"] = "any",
    ):
        super().__init__()
        count, real = _count, _real
        self.every = count("every", every, 1)
        if to not in ("memory", "disk"):
            raise SpecError(f"to must be 'memory' or 'disk', got {to!r}")
        self.to = to
        self.path = path
        self.max_consecutive = count("max_consecutive", max_consecutive, 1)
        if not isinstance(runaway, bool):
            raise SpecError(f"runaway must be true or false, got {runaway!r}")
        self.runaway = runaway
        self.window = count("window", window, 4)
        self.z = real("z", z)
        self.rel = real("rel", rel)
        if self.z < 0 or self.rel < 0 or self.z == self.rel == 0:
            raise SpecError(
                f"z and rel must be >= 0 and not both 0 (every loss above the median would be "
                f"high), got z={z!r}, rel={rel!r}"
            )
        self.patience = count("patience", patience, 1)
        self.lr_factor = real("lr_factor", lr_factor)
        if not 0.0 < self.lr_factor <= 1.0:
            raise SpecError(f"lr_factor must be in (0, 1] (1: no LR cut), got {lr_factor!r}")
        self.lr_recover = count("lr_recover", lr_recover, 1)
        self.max_runaways = count("max_runaways", max_runaways, 1)
        if on not in ("any", "reproducible"):
            raise SpecError(
                f"on must be 'any' (roll back on every non-finite step) or 'reproducible' (only "
                f"when the step's rerun reproduced it; needs guard.step(replay=...)), got {on!r}"
            )
        self.on = on
        self.state = _initial_state()
        #: The kept snapshots, oldest first, as ``state["slots"]`` describes them: a snapshot dict
        #: in memory, ``{"on_disk": True}`` on disk.
        self._snaps: list[dict[str, Any]] = []
        self._calm_loss: float | None = None
        self._layout: ParamLayout | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._file: Path | None = None
        self._tmpdir: Path | None = None
        self._cleanup: weakref.finalize | None = None

    @property
    def keep(self) -> int:
        """How many snapshots are kept: 2 with the runaway trigger, 1 without."""
        return 2 if self.runaway else 1

    @property
    def _snapshot(self) -> dict[str, Any] | None:
        """The newest snapshot (None before the first)."""
        return self._snaps[-1] if self._snaps else None

    @property
    def skipped_steps(self) -> list[tuple[int, int]]:
        """The steps whose updates rollbacks undid, as inclusive ``(start, end)`` ranges in step
        order (adjacent ranges merged). Their batches were trained on and undone, and the data
        stream went on: skip them too when replaying the run (e.g. resuming from an earlier
        checkpoint) so that it sees the data this run kept."""
        return [(int(a), int(b)) for a, b in self.state["skipped"]]

    def write_skip_batches(self, path: str | Path) -> Path:
        """Write :attr:`skipped_steps` as Lightning's ``skip_batches.json`` (a JSON list of step
        indices) to ``path`` (a ``.json`` file, or a folder); see :func:`write_skip_batches`."""
        return write_skip_batches(self.state["skipped"], path)

    def bind(self, layout: ParamLayout, optimizer: torch.optim.Optimizer) -> None:
        self._layout = layout
        self._optimizer = optimizer
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
            check_writable(folder)
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
            if self._snaps and self._snaps[-1].get("on_disk"):
                self._snaps, self.state["slots"] = [], []  # the files went with the folder

    # ----- fingerprint ----------------------------------------------------------------------------
    def _fingerprint(self) -> list[list[Any]]:
        assert self._layout is not None
        return fingerprint(self._layout)

    def _meta(self, step: int) -> dict[str, Any]:
        return {
            "format": 1,
            "run_id": self.state["run_id"],
            "step": step,
            "fingerprint": self._fingerprint(),
        }

    def _meta_problem(self, meta: Any, run_id: str | None) -> str | None:
        """What makes a snapshot's metadata not this run's, or None."""
        return meta_problem(meta, run_id, self._fingerprint())

    def _content_problem(self, snap: Any) -> str | None:
        """What makes a snapshot's tensors unfit to restore into this model and optimizer."""
        assert self._layout is not None
        return content_problem(snap, self._layout, self._optimizer)

    # ----- snapshot -------------------------------------------------------------------------------
    def _prev_file(self) -> Path:
        """The older of the two snapshot files (``last_good.pt`` is the newest)."""
        assert self._file is not None
        return self._file.with_name(self._file.stem + ".prev.pt")

    def take_snapshot(self, step: int, begin: int | None = None) -> bool:
        """Snapshot the model and optimizer if everything in them is finite; False if not.

        ``step``: the step it is taken at; ``begin``: the first step whose update it does not hold
        (``step`` if taken before that step's update, ``step + 1`` after it; default ``step``).
        It becomes the newest of the :attr:`keep` snapshots kept, replacing the oldest.

        On disk, a failed write raises :class:`~gradguard.errors.SnapshotError` naming the folder;
        the previous snapshot files and this policy's state are left as they were."""
        assert self._layout is not None and self._optimizer is not None
        snap = capture(self._layout, self._optimizer)
        if snap is None:
            return False  # a non-finite weight, buffer or optimizer state: not a good state
        begin = step if begin is None else begin
        meta = self._meta(step)
        meta["begin"] = begin
        keep = self.keep
        if self.to == "disk":
            assert self._file is not None
            self._watch_tmpdir()  # again if close() removed it and the run went on
            rotate = keep == 2 and bool(self._snaps)
            # With two kept, the new file is written whole first, then the newest becomes the
            # older one and the new one the newest: a failed write leaves both as they were.
            target = self._file.with_name(self._file.stem + ".new.pt") if rotate else self._file
            try:
                write_snapshot(snap, meta, target)
                if rotate:
                    os.replace(self._file, self._prev_file())
                    os.replace(target, self._file)
            except OSError as e:
                raise SnapshotError(
                    f"rollback could not write its snapshot to {self._file.parent}: {e}. Free "
                    "space there or fix its permissions, or give rollback a folder it can write "
                    "(rollback:to=disk,path=...); the previous snapshot is kept"
                ) from e
            held: dict[str, Any] = {"on_disk": True}
        else:
            snap["meta"] = meta
            held = snap
        slot = {"step": step, "begin": begin, "losses": list(self.state["losses"])}
        self._snaps = [*self._snaps, held][-keep:]
        self.state["slots"] = [*self.state["slots"], slot][-keep:]
        self.state["snapshot_step"] = step
        self.state["since_snapshot"] = 0
        self.state["retries"] = 0  # progress since the last runaway rollback
        return True

    def _load_checked(self, index: int = -1) -> dict[str, Any]:
        """The kept snapshot ``index`` (-1: the newest), validated whole (nothing is restored if
        this raises)."""
        if not self._snaps:
            raise GradGuardError("rollback requested before any snapshot was taken")
        index %= len(self._snaps)
        held = self._snaps[index]
        run_id = self.state["run_id"]
        if not held.get("on_disk"):
            problem = self._meta_problem(held.get("meta", {}), run_id)
            if problem is not None:
                raise GradGuardError(
                    f"refused to restore the in-memory rollback snapshot: {problem}; nothing was "
                    "restored"
                )
            return held
        assert self._file is not None
        file = self._file if index == len(self._snaps) - 1 else self._prev_file()
        try:
            meta = verify_snapshot(file)
            snap: dict[str, Any] = torch.load(file, map_location="cpu", weights_only=True)
        except UnreadableSnapshot as e:
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

    # ----- the runaway trigger --------------------------------------------------------------------
    def threshold(self) -> float | None:
        """The loss above which a loss is high now, or None while the window holds fewer than
        ``window // 2`` losses (the trigger is not armed yet)."""
        losses = self.state["losses"]
        if len(losses) < self.window // 2:
            return None
        s = sorted(losses)
        level = _median(s)
        mad = _median(sorted(abs(v - level) for v in s))
        return level + max(self.z * 1.4826 * mad, self.rel * abs(level))

    def _is_high(self, loss: float) -> bool:
        losses = self.state["losses"]
        if len(losses) < self.window // 2:
            return False
        level = _median(sorted(losses))
        if loss <= level + self.rel * abs(level):
            return False  # below the smaller bound: no need for the MAD (most steps)
        thr = self.threshold()
        assert thr is not None
        return loss > thr

    def _pick(self, since: int | None) -> int:
        """Which kept snapshot to restore for trouble that began at step ``since`` (None: the
        newest): the newest taken before it, else the oldest. A snapshot that begins at step b
        holds the weights the loss of step b was computed on, so one that begins before the
        first high loss is a state whose loss was seen calm; one taken right after the last calm
        step holds the update that made the first high loss, and is passed over."""
        slots = self.state["slots"]
        if since is None:
            return len(slots) - 1
        for i in range(len(slots) - 1, -1, -1):
            if slots[i]["begin"] < since:
                return i
        return 0

    # ----- the step -------------------------------------------------------------------------------
    def apply(self, ctx: StepContext) -> None:
        host = ctx.host
        assert host is not None
        st = self.state
        self._calm_loss = None
        if not self._snaps:
            self.take_snapshot(ctx.step)
        loss = host.loss
        bad = not host.finite or (loss is not None and not math.isfinite(loss))
        if bad and self.on == "reproducible" and ctx.rerun == "transient":
            # The rerun came out finite: a hardware fault or nondeterminism, not the state or the
            # data. Nothing to undo: the step is only skipped.
            ctx.request_skip("nonfinite_grad" if not host.finite else "nonfinite_loss")
            ctx.record(self.name, False)
            return
        if bad:
            self.recover(ctx, "nonfinite")
            return
        if self.on == "reproducible" and ctx.rerun == "reproducible" and ctx.skip:
            # A spike a policy before this one skipped, and the rerun made it again: the state x
            # the data makes it (PaLM's spikes); go back to the snapshot and skip the data.
            self.recover(ctx, "spike")
            return
        if ctx.rollback_request is not None:
            self.honour_request(ctx)
            return
        if self.runaway and loss is not None:
            if self._is_high(loss):
                st["high"] += 1
                if st["high"] == 1:
                    st["high_since"] = ctx.step
                if st["high"] >= self.patience:
                    self._runaway(ctx, "runaway", st["high_since"], loss)
                    return
            else:
                st["high"], st["high_since"] = 0, None
                self._calm_loss = loss
        if st["lr_scale"] < 1.0:
            ctx.lr_scale *= st["lr_scale"]
            ctx.metrics["rollback.lr_scale"] = st["lr_scale"]

    def honour_request(self, ctx: StepContext) -> bool:
        """Honour :meth:`StepContext.request_rollback` as a runaway that began at the first high
        loss of a current streak, or at this step. The Guard calls it when the request came from
        a policy after this one in the chain."""
        if ctx.rollback or ctx.rollback_request is None:
            return False
        st = self.state
        since = st["high_since"] if st["high"] > 0 else ctx.step
        return self._runaway(ctx, ctx.rollback_request, since, None)

    def _runaway(self, ctx: StepContext, why: str, since: int, loss: float | None) -> bool:
        """Roll back for a finite runaway that began at step ``since``; cut the LR."""
        st = self.state
        if not self._snaps:
            ctx.request_skip(f"{why}_no_snapshot")
            ctx.record(self.name, False)
            return False
        retries, total = st["retries"] + 1, st["runaways"] + 1
        if retries > self.max_consecutive or total > self.max_runaways:
            st["retries"], st["runaways"] = retries, total
            thr = self.threshold()
            seen = f"loss {loss:.4g} above {thr:.4g}, " if loss is not None and thr else ""
            limit = (
                f"{retries} times in a row without a new snapshot between them (max_consecutive="
                f"{self.max_consecutive})"
                if retries > self.max_consecutive
                else f"{total} times in this run (max_runaways={self.max_runaways})"
            )
            raise TrainingHalted(
                f"step {ctx.step}: the loss ran away ({why}: {seen}high since step {since}) "
                f"{limit}, with snapshots back to step {st['slots'][0]['step']} and the LR cut to "
                f"{st['lr_scale']:.3g}x; it will not recover by itself: lower the learning rate "
                "or add warmup, check the data around the skipped steps "
                f"{self.skipped_steps[-3:]}, or raise max_consecutive/max_runaways",
                "runaway_exhausted",
            )
        index = self._pick(since)
        self._roll_back(ctx, index, why)
        st["retries"], st["runaways"] = retries, total
        if self.lr_factor < 1.0:
            st["lr_scale"] = max(st["lr_scale"] * self.lr_factor, MIN_LR_SCALE)
        ctx.metrics["rollback.runaway_since"] = float(since)
        return True

    def recover(self, ctx: StepContext, why: str) -> bool:
        """Restore the last good snapshot and cancel this step; False if there is none.

        Called by :meth:`apply` for a non-finite gradient or loss, and by the Guard when a step it
        took left non-finite weights (``why`` names what it saw). While the loss is running away
        (high losses before this step), handled as the runaway's end (:meth:`_runaway`). Raises
        :class:`~gradguard.errors.TrainingHalted` after ``max_consecutive`` recoveries with no
        good step between them.
        """
        if not self._snaps:
            # Nothing good to go back to (the parameters were already non-finite): just skip.
            ctx.request_skip("nonfinite_no_snapshot")
            ctx.record(self.name, False)
            return False
        st = self.state
        if self.runaway and st["high"] > 0:
            return self._runaway(ctx, f"runaway_{why}", st["high_since"], None)
        consecutive = st["consecutive"] + 1
        if consecutive > self.max_consecutive:
            st["consecutive"] = consecutive
            raise TrainingHalted(
                f"training went non-finite ({why}) {consecutive} times in a row after "
                f"rolling back to step {st['snapshot_step']}; it will not recover by itself: "
                "lower the learning rate, or add clipping (e.g. policy='zclip+rollback+lr_backoff')",
                "rollback_exhausted",
            )
        self._roll_back(ctx, len(self._snaps) - 1, "rollback")
        st["consecutive"] = consecutive
        return True

    def _roll_back(self, ctx: StepContext, index: int, reason: str) -> None:
        """Go back to kept snapshot ``index`` (the Guard loads it: :meth:`StepContext.request_restore`),
        drop the newer one, record the undone steps as skipped, put the loss window back as it
        was then, and cancel this step."""
        ctx.request_restore(
            self._load_checked(index)
        )  # validated whole first: raises, nothing changed
        st = self.state
        index %= len(self._snaps)
        if index < len(self._snaps) - 1:
            # The newer snapshot is not trusted (too close to the trouble): the restored one is
            # the newest now.
            if self.to == "disk":
                assert self._file is not None
                os.replace(self._prev_file(), self._file)
            self._snaps = self._snaps[: index + 1]
            st["slots"] = st["slots"][: index + 1]
        slot = st["slots"][-1]
        start, end = int(slot["begin"]), ctx.step
        self._add_skipped(start, end)
        # The next rollback to this snapshot undoes only the steps after this one.
        slot["begin"] = end + 1
        st["losses"] = list(slot["losses"])
        st["high"], st["high_since"] = 0, None
        st["snapshot_step"] = slot["step"]
        st["since_snapshot"] = 0  # the next snapshot comes `every` steps of training later
        st["rollbacks"] += 1
        ctx.rollback = True
        ctx.request_skip(reason)
        ctx.record(self.name, True)
        ctx.metrics["rollback.skipped_from"] = float(start)
        ctx.metrics["rollback.skipped_to"] = float(end)

    def _add_skipped(self, start: int, end: int) -> None:
        ranges = self.state["skipped"]
        if ranges and start <= ranges[-1][1] + 1:
            ranges[-1] = [min(ranges[-1][0], start), max(ranges[-1][1], end)]
        else:
            ranges.append([start, end])

    def after_step(self, ctx: StepContext, stepped: bool) -> None:
        calm, self._calm_loss = self._calm_loss, None
        if not stepped:
            return
        st = self.state
        st["consecutive"] = 0
        if calm is not None:
            st["losses"] = [*st["losses"], calm][-self.window :]
        if st["lr_scale"] < 1.0 and st["high"] == 0:  # a calm step (with or without a loss)
            grow = (1.0 / self.lr_factor) ** (1.0 / self.lr_recover)
            st["lr_scale"] = min(1.0, st["lr_scale"] * grow)
        st["since_snapshot"] += 1
        if st["since_snapshot"] >= self.every and st["high"] == 0:
            self.take_snapshot(ctx.step, begin=ctx.step + 1)

    # ----- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = copy.deepcopy({k: v for k, v in self.state.items()})
        if self._snaps and not self._snaps[-1].get("on_disk"):
            sd["snapshot"] = self._snaps[-1]
            if len(self._snaps) == 2:
                sd["previous"] = self._snaps[0]
        return sd

    def _check_snapshot_entry(self, key: str, snap: Any, run_id: str | None) -> None:
        problem = None
        if isinstance(snap, dict):
            problem = self._meta_problem(snap.get("meta", {}), run_id)
        problem = problem or self._content_problem(snap)
        if problem is not None:
            raise ConfigError(
                f"{self.name}: cannot load the saved state's {key} (an in-memory snapshot): "
                f"{problem}; load the state this run saved, into a Guard on the same model, or "
                f"drop its '{key}' entry to start without one"
            )

    def check_state(self, state: Any) -> None:
        """Counters: integers >= 0 (``snapshot_step`` None before the first snapshot); ``run_id``
        a string (absent in a state saved before snapshots carried one); ``snapshot`` and
        ``previous`` (in-memory snapshots) this run's, of this model, every tensor finite. The
        runaway trigger's keys (absent in a state saved before it existed): ``losses`` at most
        ``window`` finite numbers, ``high``/``runaways``/``retries`` integers >= 0,
        ``high_since`` a step or None, ``lr_scale`` in (0, 1], ``skipped`` ``[start, end]`` step
        pairs with start <= end, ``slots`` at most 2 ``{step, begin, losses}`` records, as many
        as the in-memory snapshots saved with them."""
        self._check_counters(state)
        _check_skipped(state)
        snaps = [k for k in ("previous", "snapshot") if state.get(k) is not None]
        if "slots" in state:
            self._check_slots(state["slots"], len(snaps))
        name = self.name
        if state.get("previous") is not None and state.get("snapshot") is None:
            refuse_state(
                name,
                "previous",
                state["previous"],
                "an older snapshot needs a newest one beside it",
            )
        run_id = state.get("run_id")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            refuse_state(name, "run_id", run_id, "it must be the run id string rollback made")
        for key in snaps:
            self._check_snapshot_entry(key, state[key], run_id)

    def _check_counters(self, state: Any) -> None:
        """The state's keys, its counters, the loss window and the LR scale."""
        name = self.name
        check_keys(
            name,
            state,
            ("snapshot_step", "since_snapshot", "consecutive", "rollbacks"),
            optional=(
                "run_id",
                "snapshot",
                "previous",
                "losses",
                "high",
                "high_since",
                "runaways",
                "retries",
                "lr_scale",
                "skipped",
                "slots",
            ),
        )
        check_number(
            name, "snapshot_step", state["snapshot_step"], integer=True, nonneg=True, nullable=True
        )
        for key in ("since_snapshot", "consecutive", "rollbacks"):
            check_number(name, key, state[key], integer=True, nonneg=True)
        for key in ("high", "runaways", "retries"):
            if key in state:
                check_number(name, key, state[key], integer=True, nonneg=True)
        if "high_since" in state:
            check_number(
                name, "high_since", state["high_since"], integer=True, nonneg=True, nullable=True
            )
        if "losses" in state:
            check_numbers(name, "losses", state["losses"], max_length=self.window)
        if "lr_scale" in state:
            check_number(name, "lr_scale", state["lr_scale"])
            if not 0.0 < state["lr_scale"] <= 1.0:
                refuse_state(name, "lr_scale", state["lr_scale"], "the LR scale must be in (0, 1]")

    def _check_slots(self, slots: Any, n_snaps: int) -> None:
        """At most 2 ``{step, begin, losses}`` records, one per in-memory snapshot saved."""
        name = self.name
        if not isinstance(slots, (list, tuple)) or len(slots) > 2:
            refuse_state(name, "slots", slots, "it must be a list of at most 2 snapshot records")
        for i, slot in enumerate(slots):
            key = f"slots[{i}]"
            check_keys(f"{name} {key}", slot, ("step", "begin", "losses"))
            check_number(name, f"{key}.step", slot["step"], integer=True, nonneg=True)
            check_number(name, f"{key}.begin", slot["begin"], integer=True, nonneg=True)
            check_numbers(name, f"{key}.losses", slot["losses"], max_length=self.window)
        if n_snaps and len(slots) != n_snaps:
            refuse_state(
                name,
                "slots",
                slots,
                f"it describes {len(slots)} snapshots where the state holds {n_snaps}",
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        snap = state.pop("snapshot", None)
        prev = state.pop("previous", None)
        run_id = state.pop("run_id", None)
        slots = state.pop("slots", None)
        # A state saved before the runaway trigger existed lacks its keys: they start afresh.
        fresh = {k: v for k, v in _initial_state().items() if k not in ("run_id", "slots")}
        fresh.update({k: copy.deepcopy(v) for k, v in state.items()})
        fresh["losses"] = [float(v) for v in fresh["losses"]]
        fresh["skipped"] = [[int(a), int(b)] for a, b in fresh["skipped"]]
        self.state.update(fresh)
        if run_id is None:
            for s in (snap, prev):
                if isinstance(s, dict) and isinstance(s.get("meta"), dict):
                    run_id = run_id or s["meta"].get("run_id")
        if run_id is not None:
            self.state["run_id"] = run_id  # the run resumes: its own snapshots are accepted
        if snap is not None:
            snaps = [s for s in (prev, snap) if s is not None]
            if slots is None or len(slots) != len(snaps):
                slots = [self._slot_from_meta(s.get("meta")) for s in snaps]
            self._snaps = snaps[-self.keep :]
            self.state["slots"] = [self._plain_slot(s) for s in slots][-self.keep :]
            return
        self._snaps, self.state["slots"] = [], []
        if self.to != "disk" or self._file is None or not self._file.exists():
            return
        if run_id is None:
            # Saved before snapshots carried a run id: whose the file is cannot be told. A fresh
            # snapshot is taken at the next step instead.
            return
        self._adopt_files(run_id, list(slots or []))

    def _adopt_files(self, run_id: str, slots: list[dict[str, Any]]) -> None:
        """Resume from the snapshot files on disk that are this run's (the newest first; the
        first one that is not ends the search, with a warning if it is the newest)."""
        assert self._file is not None
        files = [self._file]
        if self.keep == 2 and len(slots) == 2:
            files.append(self._prev_file())
        kept: list[dict[str, Any]] = []
        for j, file in enumerate(files):  # the newest first
            if j > 0 and not file.exists():
                break
            try:
                meta = read_snapshot_meta(file)
                problem = self._meta_problem(meta, run_id)
            except (OSError, UnreadableSnapshot) as e:
                meta, problem = {}, str(e)
            if problem is not None:
                if j == 0:
                    warnings.warn(
                        f"rollback: the snapshot {file} is not used ({problem}); a fresh one is "
                        "taken at the next step, replacing it",
                        stacklevel=4,
                    )
                break
            slot = slots[-1 - j] if len(slots) > j else None
            if slot is None or slot.get("step") != meta.get("step"):
                slot = self._slot_from_meta(meta)  # the file is newer than the saved state
            kept.insert(0, self._plain_slot(slot))
        self._snaps = [{"on_disk": True} for _ in kept]
        self.state["slots"] = kept

    def _slot_from_meta(self, meta: Any) -> dict[str, Any]:
        """A snapshot record from a snapshot's metadata, for a state saved without records."""
        meta = meta if isinstance(meta, dict) else {}
        step = meta.get("step", self.state["snapshot_step"] or 0)
        return {"step": int(step), "begin": int(meta.get("begin", step)), "losses": []}

    @staticmethod
    def _plain_slot(slot: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": int(slot["step"]),
            "begin": int(slot["begin"]),
            "losses": [float(v) for v in slot["losses"]],
        }
