"""What a fault is: a named injector with validated options, a schedule that is a pure function of
(seed, fault, step), hooks the training loop calls, and a record of every strike.

A fault's options are declared once as :class:`Option` records on its class; the spec parser
(:mod:`.spec`) and the Python constructor validate them with the same code, so ``nan:p=2`` and
``NanGrad(p=2)`` fail with the same message.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, SpecError
from ..specgrammar import Where, coerce, format_value

#: The per-step strike probability of a fault given neither ``p`` nor ``at``.
DEFAULT_P = 0.01

# What a ``layer=`` value may hold: a module name (``blocks.3.attn``, ``(root)``) or a glob over one.
_LAYER = re.compile(r"[A-Za-z0-9_.*?\[\]!()-]+")


class FaultSpecError(SpecError):
    """A fault spec or option that is malformed, unknown or out of range; the message names the
    problem and the fix (the valid faults, options or range)."""


@dataclass(frozen=True)
class Strike:
    """One fault that struck: the step, the fault's name, where (a layer, ``inputs``, ``labels``,
    ``lr``, ``*``) and the numbers (scale, factor, value, ...)."""

    step: int
    kind: str
    where: str
    detail: dict[str, Any] = field(default_factory=dict, compare=False)


def _show(v: Any) -> str:
    """A value for a message: ``2`` for a whole float, ``repr`` else."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


@dataclass(frozen=True)
class Option:
    """One option of a fault: its type, default, valid range and what it means.

    ``type`` is ``float``, ``int`` or ``str``. Bounds: ``min``/``max`` inclusive, ``above``
    exclusive. ``choices`` restricts a ``str``; ``many`` takes several values joined by ``|``
    (``at=3|7|20``), kept sorted and unique; ``glob`` makes a ``str`` a module name or glob.
    """

    name: str
    type: type
    default: Any = None
    doc: str = ""
    min: float | None = None
    max: float | None = None
    above: float | None = None
    choices: tuple[str, ...] = ()
    many: bool = False
    glob: bool = False

    # ----- text -> value (the spec parser) -------------------------------------------------------
    def parse(self, fault: str, raw: str) -> Any:
        """The option's value from its spec text (the shared grammar's typed reading); the range
        and the finiteness are checked by :meth:`validate`, as for a Python value."""
        scalar: Any = Literal[self.choices] if self.choices else self.type
        hint = tuple[scalar, ...] if self.many else scalar
        where = Where(f"fault {fault!r}", self.name, FaultSpecError, f"; {self.doc}", max_int=None)
        return coerce(raw, hint, where)

    # ----- value -> checked value (the constructor, so Python and spec share the checks) --------
    def validate(self, fault: str, value: Any) -> Any:
        if self.many:
            items = [value] if isinstance(value, (numbers.Number, str)) else value
            try:
                items = list(items)
            except TypeError:
                raise FaultSpecError(
                    f"fault {fault!r}: {self.name} must be {self._kind()} or a list of them, "
                    f"got {type(value).__name__}"
                ) from None
            if not items:
                raise FaultSpecError(f"fault {fault!r}: {self.name} is an empty list; {self.doc}")
            return tuple(sorted({self._check(fault, v) for v in items}))
        return self._check(fault, value)

    def _kind(self) -> str:
        return {int: "an integer", float: "a number", str: "a string"}[self.type]

    def _check(self, fault: str, v: Any) -> Any:
        given = v

        def bad(msg: str) -> FaultSpecError:
            return FaultSpecError(f"fault {fault!r}: {self.name}={_show(given)} {msg}; {self.doc}")

        if self.type is str:
            if not isinstance(v, str):
                raise bad(f"is not {self._kind()}")
            if self.choices and v not in self.choices:
                raise bad(f"is not one of {', '.join(self.choices)}")
            if self.glob:
                _check_layer(fault, v)
            return v
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise bad(f"is not {self._kind()}")
        if isinstance(v, numbers.Integral):
            v = int(v) if self.type is int else _float(v, bad)
        else:
            v = _float(v, bad)
            if self.type is int:
                if not v.is_integer():
                    raise bad("is not a whole number")
                v = int(v)
        lo, hi = self.min, self.max
        if lo is not None and hi is not None and not lo <= v <= hi:
            raise bad(f"is outside [{lo:g}, {hi:g}]")
        if lo is not None and v < lo:
            raise bad(f"must be >= {lo:g}")
        if hi is not None and v > hi:
            raise bad(f"must be <= {hi:g}")
        if self.above is not None and v <= self.above:
            raise bad(f"must be > {self.above:g}")
        return v

    def format(self, value: Any) -> str:
        """The value as spec text (``parse`` reads it back to the same value)."""
        return format_value(value)


def _float(v: Any, bad: Any) -> float:
    try:
        f = float(v)
    except OverflowError:  # an int too large for a float
        raise bad("must be finite") from None
    if not math.isfinite(f):
        raise bad("must be finite")
    return f


def _check_layer(fault: str, pattern: str) -> None:
    if not _LAYER.fullmatch(pattern):
        raise FaultSpecError(
            f"fault {fault!r}: layer={pattern!r} is not a module name or glob "
            "(letters, digits and _ . * ? [ ] ! ( ) -), e.g. layer=fc2, layer=blocks.*.attn or "
            "layer=* for every layer"
        )
    try:
        re.compile(fnmatch.translate(pattern))
    except re.error as e:
        raise FaultSpecError(
            f"fault {fault!r}: layer={pattern!r} is not a valid glob: {e}"
        ) from None


def uniform(seed: int, fault: str, step: int, salt: int = 0) -> float:
    """A uniform number in [0, 1) that depends on (seed, fault, step, salt) only, so a schedule
    never depends on what else the run did (how many faults, which draws came before)."""
    return float(np.random.default_rng([seed, zlib.crc32(fault.encode()), step, salt]).random())


def check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ConfigError(
            f"fault hooks take the optimizer step, an int >= 0, got {step!r}; "
            "call plan.on_batch(step, x, y), plan.on_gradients(step, model), ..."
        )
    return int(step)


def grad_layers(model: nn.Module) -> list[tuple[str, list[torch.Tensor]]]:
    """(module name, its own parameters' gradients) for each module that owns a parameter with a
    gradient, in ``named_modules`` order; the root module is named ``(root)``."""
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"plan.on_gradients needs the nn.Module being trained, got {type(model).__name__}"
        )
    out = []
    for name, mod in model.named_modules():
        grads = [p.grad for p in mod.parameters(recurse=False) if p.grad is not None]
        if grads:
            out.append((name or "(root)", grads))
    return out


class Fault:
    """Base class of the injectors: options declared as :class:`Option` records in ``options``
    (the first one is what ``name:VALUE`` sets), hooks that default to doing nothing.

    A fault strikes at the steps in ``at``, or on each step with probability ``p`` (``DEFAULT_P``
    when neither is given), drawn by :func:`uniform` from (seed, name, step).
    """

    name: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    #: When its hook runs within a step (batch 0, gradients 1, optimizer 2): orders a plan's strikes.
    phase: ClassVar[int] = 1
    #: Whether ``at`` or ``p`` must be given (a burst needs its start).
    needs_at: ClassVar[bool] = False

    def __init__(self, *, seed: int = 0, **options: Any):
        self.seed = check_seed(seed)
        by_name = {o.name: o for o in self.options}
        for k in options:
            if k not in by_name:
                raise FaultSpecError(
                    f"fault {self.name!r}: unknown option {k!r}; options: {', '.join(by_name)}"
                )
        values: dict[str, Any] = {}
        for o in self.options:
            v = options.get(o.name, o.default)
            values[o.name] = None if v is None else o.validate(self.name, v)
        if values.get("p") is not None and values.get("at") is not None:
            raise FaultSpecError(
                f"fault {self.name!r}: give either p (a probability per step) or at "
                "(steps, e.g. at=3|7), not both"
            )
        if "at" in values and values["at"] is None:
            if self.needs_at:
                raise FaultSpecError(f"fault {self.name!r}: needs at=STEP; {by_name['at'].doc}")
            if "p" in values and values["p"] is None:
                values["p"] = DEFAULT_P
        self.values = values
        self._at = frozenset(values.get("at") or ())
        self.strikes: list[Strike] = []

    # ----- schedule ------------------------------------------------------------------------------
    def scheduled(self, step: int) -> bool:
        """Whether the fault strikes at ``step`` (a pure function of seed, name and step)."""
        if self.values.get("at") is not None:
            return step in self._at
        return uniform(self.seed, self.name, step) < self.values["p"]

    def _record(self, step: int, where: str, **detail: Any) -> None:
        self.strikes.append(Strike(step, self.name, where, detail))

    # ----- hooks (no-ops unless a fault overrides them) ------------------------------------------
    def on_batch(self, step: int, x: Any, y: Any) -> tuple[Any, Any]:
        return x, y

    def on_gradients(self, step: int, model: nn.Module) -> None:
        pass

    def on_optimizer(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    # ----- identity ------------------------------------------------------------------------------
    def spec(self) -> str:
        """The spec that rebuilds this fault: its name and every option that is not the default."""
        parts = [
            f"{o.name}={o.format(self.values[o.name])}"
            for o in self.options
            if self.values[o.name] is not None and self.values[o.name] != o.default
        ]
        return self.name + (":" + ",".join(parts) if parts else "")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fault):
            return NotImplemented
        return (self.name, self.seed, self.values) == (other.name, other.seed, other.values)

    __hash__ = None  # type: ignore[assignment]  # mutable: it records strikes

    def __repr__(self) -> str:
        return f"<fault {self.spec()} seed={self.seed}>"


def check_seed(seed: Any) -> int:
    # numpy's SeedSequence takes non-negative integers only: refuse others here, not mid-run.
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise FaultSpecError(f"seed must be an int >= 0, got {seed!r}")
    return int(seed)


class FaultPlan:
    """The faults of one run, driven by the training loop through four hooks (see the package
    docstring for the loop). Each hook runs every fault's hook of that name, in spec order."""

    def __init__(self, faults: Iterable[Fault] = ()):
        self.faults: tuple[Fault, ...] = tuple(faults)
        for f in self.faults:
            if not isinstance(f, Fault):
                raise FaultSpecError(f"a FaultPlan holds faults, not {type(f).__name__}")
        names = [f.name for f in self.faults]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise FaultSpecError(
                f"fault {', '.join(dupes)} given twice; give each fault once "
                "(several steps: at=3|7|20, or a probability p)"
            )

    def on_batch(self, step: int, x: Any, y: Any) -> tuple[Any, Any]:
        """Before the forward pass: returns the (possibly poisoned) batch; the inputs are never
        modified in place."""
        step = check_step(step)
        for f in self.faults:
            x, y = f.on_batch(step, x, y)
        return x, y

    def on_gradients(self, step: int, model: nn.Module) -> None:
        """After the (last) backward of the step, before ``guard.step`` (and, under AMP, before
        the scaler unscales)."""
        step = check_step(step)
        for f in self.faults:
            f.on_gradients(step, model)

    def on_optimizer(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Right before the optimizer step."""
        step = check_step(step)
        for f in self.faults:
            f.on_optimizer(step, optimizer)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Right after the optimizer step, before the LR scheduler's step."""
        step = check_step(step)
        for f in reversed(self.faults):
            f.after_step(step, optimizer)

    @property
    def strikes(self) -> list[Strike]:
        """Every strike of every fault, in the order they happened (step, then hook, then spec)."""
        tagged = [(s.step, f.phase, s) for f in self.faults for s in f.strikes]
        return [s for *_, s in sorted(tagged, key=lambda t: t[:2])]

    def spec(self) -> str:
        """The spec that rebuilds this plan (``parse(plan.spec(), seed) == plan``)."""
        return "+".join(f.spec() for f in self.faults) or "none"

    def __len__(self) -> int:
        return len(self.faults)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FaultPlan):
            return NotImplemented
        return self.faults == other.faults

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        seeds = sorted({f.seed for f in self.faults})
        return f"FaultPlan({self.spec()!r}" + (f", seed={seeds[0]})" if len(seeds) == 1 else ")")
