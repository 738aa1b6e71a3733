"""Deterministic fault injection: the faults that hit real training, scheduled from a seed, each
strike recorded (step, kind, where), for tests, for your own loop, and for the bench's fault axis.

    plan = gradguard.faults.parse("nan:p=0.01+spike:scale=1e4,p=0.02", seed=0)
    for step in range(steps):
        x, y = plan.on_batch(step, *next(batches))       # poison: scaled inputs, shuffled labels
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        plan.on_gradients(step, model)                   # nan / inf / spike / fp16_overflow
        plan.on_optimizer(step, optimizer)               # lr_burst: LR x factor for k steps
        guard.step(loss=loss)
        plan.after_step(step, optimizer)                 # lr_burst: the LR restored exactly
    plan.strikes                                         # [Strike(step, kind, where, detail), ...]

Spec grammar (as for policies): faults joined by ``+``, each ``name[:key=value,...]``; ``none``
is the empty plan. A fault strikes at step ``at`` (an int; ``lr_burst`` requires it), or on each
step with probability ``p``. Schedules are a pure function of (seed, fault, step): the same seed
strikes the same steps and layers whatever else the run does.

=================  ==============================================================================
``nan``, ``inf``   a NaN/Inf in one layer's gradient; ``layer=`` a module name or glob (default:
                   one drawn per strike among the parameter-owning modules); ``p=0.01``, ``at=``
``spike``          one layer's gradient x ``scale`` (default 1e4; ``layer=*``: every layer)
``poison``         a poisoned batch: inputs x ``scale`` (default 1e3, ``mode=scale``) or labels
                   shuffled (``mode=shuffle``)
``lr_burst``       every param group's LR x ``factor`` (default 100) for ``steps`` (10) steps from
                   ``at``; restored exactly after each step, whatever a scheduler did
``fp16_overflow``  an Inf in a (scaled) gradient before ``GradScaler.unscale_``: the scaler skips
=================  ==============================================================================

:func:`corrupt_checkpoint` truncates or scribbles over a checkpoint file, deterministically.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SpecError

__all__ = [
    "FaultPlan",
    "FaultSpecError",
    "Strike",
    "available_faults",
    "corrupt_checkpoint",
    "parse",
]


class FaultSpecError(SpecError):
    """A fault spec that cannot be parsed or validated; the message names the problem and the fix."""


@dataclass(frozen=True)
class Strike:
    """One fault that struck: when, what, where, and the numbers (scale, factor, ...)."""

    step: int
    kind: str
    where: str
    detail: dict = field(default_factory=dict, compare=False)


# name -> {option: (type, default)}; None default = optional
_OPTIONS: dict[str, dict[str, tuple[type, Any]]] = {
    "nan": {"p": (float, None), "at": (int, None), "layer": (str, None)},
    "inf": {"p": (float, None), "at": (int, None), "layer": (str, None)},
    "spike": {"p": (float, None), "at": (int, None), "layer": (str, None), "scale": (float, 1e4)},
    "poison": {
        "p": (float, None),
        "at": (int, None),
        "scale": (float, 1e3),
        "mode": (str, "scale"),
    },
    "lr_burst": {"at": (int, None), "factor": (float, 100.0), "steps": (int, 10)},
    "fp16_overflow": {"p": (float, None), "at": (int, None)},
}
_DEFAULT_P = 0.01


def available_faults() -> dict[str, dict[str, Any]]:
    """Every fault with its options and their defaults."""
    return {name: {k: d for k, (_, d) in opts.items()} for name, opts in _OPTIONS.items()}


def _uniform(seed: int, name: str, step: int, salt: int = 0) -> float:
    """A uniform number that depends on (seed, fault, step) only."""
    return float(np.random.default_rng([seed, zlib.crc32(name.encode()), step, salt]).random())


class _Fault:
    def __init__(self, name: str, seed: int, opts: dict[str, Any]):
        self.name = name
        self.seed = seed
        self.opts = opts
        self.strikes: list[Strike] = []

    def strikes_at(self, step: int) -> bool:
        at = self.opts.get("at")
        if at is not None:
            return step == at
        p = self.opts.get("p")
        return _uniform(self.seed, self.name, step) < (_DEFAULT_P if p is None else p)

    def spec(self) -> str:
        defaults = available_faults()[self.name]
        parts = [f"{k}={_fmt(v)}" for k, v in self.opts.items() if v != defaults.get(k)]
        return self.name + (":" + ",".join(parts) if parts else "")

    def _record(self, step: int, where: str, **detail: Any) -> None:
        self.strikes.append(Strike(step, self.name, where, detail))

    # hooks (no-ops unless a fault overrides them)
    def on_batch(self, step, x, y):
        return x, y

    def on_gradients(self, step, model) -> None:
        pass

    def on_optimizer(self, step, optimizer) -> None:
        pass

    def after_step(self, step, optimizer) -> None:
        pass


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _grad_layers(model: nn.Module) -> list[tuple[str, list[torch.Tensor]]]:
    """(module name, its parameters' gradients) for modules that own parameters with a gradient."""
    out = []
    for name, mod in model.named_modules():
        grads = [p.grad for p in mod.parameters(recurse=False) if p.grad is not None]
        if grads:
            out.append((name or "(root)", grads))
    return out


class _LayerFault(_Fault):
    def _pick(self, step: int, model: nn.Module) -> list[tuple[str, list[torch.Tensor]]]:
        layers = _grad_layers(model)
        if not layers:
            return []
        pattern = self.opts.get("layer")
        if pattern == "*":
            return layers
        if pattern is not None:
            chosen = [lg for lg in layers if fnmatch.fnmatchcase(lg[0], pattern)]
            if not chosen:
                raise FaultSpecError(
                    f"{self.name}: layer={pattern!r} matches no module with a gradient; "
                    f"modules: {', '.join(n for n, _ in layers)}"
                )
            return chosen[:1]
        k = int(_uniform(self.seed, self.name, step, salt=1) * len(layers))
        return [layers[min(k, len(layers) - 1)]]


class _NonFinite(_LayerFault):
    def on_gradients(self, step, model) -> None:
        if not self.strikes_at(step):
            return
        value = math.nan if self.name == "nan" else math.inf
        for name, grads in self._pick(step, model):
            with torch.no_grad():
                grads[0].view(-1)[0] = value
            self._record(step, name, value=value)


class _Spike(_LayerFault):
    def on_gradients(self, step, model) -> None:
        if not self.strikes_at(step):
            return
        scale = self.opts["scale"]
        picked = self._pick(step, model)
        with torch.no_grad():
            for _, grads in picked:
                torch._foreach_mul_(grads, scale)
        where = "*" if self.opts.get("layer") == "*" else ",".join(n for n, _ in picked)
        if picked:
            self._record(step, where, scale=scale)


class _Poison(_Fault):
    def on_batch(self, step, x, y):
        if not self.strikes_at(step):
            return x, y
        if self.opts["mode"] == "shuffle":
            gen = torch.Generator().manual_seed(
                int(_uniform(self.seed, self.name, step, 2) * 2**31)
            )
            y = y[torch.randperm(y.shape[0], generator=gen)]
            self._record(step, "labels", mode="shuffle")
        else:
            x = x * self.opts["scale"]
            self._record(step, "inputs", mode="scale", scale=self.opts["scale"])
        return x, y


class _LrBurst(_Fault):
    def __init__(self, name, seed, opts):
        super().__init__(name, seed, opts)
        self._saved: list[float] | None = None

    def on_optimizer(self, step, optimizer) -> None:
        at, n = self.opts["at"], self.opts["steps"]
        if not at <= step < at + n:
            return
        self._saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * self.opts["factor"]
        self._record(step, "lr", factor=self.opts["factor"])

    def after_step(self, step, optimizer) -> None:
        if self._saved is not None:
            for g, lr in zip(optimizer.param_groups, self._saved, strict=True):
                g["lr"] = lr
            self._saved = None


class _Fp16Overflow(_Fault):
    def on_gradients(self, step, model) -> None:
        if not self.strikes_at(step):
            return
        layers = _grad_layers(model)
        if layers:
            name, grads = layers[0]
            with torch.no_grad():
                grads[0].view(-1)[0] = math.inf  # what an fp16 overflow leaves in a scaled gradient
            self._record(step, name, value=math.inf)


_CLASSES: dict[str, type[_Fault]] = {
    "nan": _NonFinite,
    "inf": _NonFinite,
    "spike": _Spike,
    "poison": _Poison,
    "lr_burst": _LrBurst,
    "fp16_overflow": _Fp16Overflow,
}


class FaultPlan:
    """The faults of one run, driven by the training loop through its four hooks."""

    def __init__(self, faults: list[_Fault]):
        self.faults = faults

    def on_batch(self, step: int, x, y):
        for f in self.faults:
            x, y = f.on_batch(step, x, y)
        return x, y

    def on_gradients(self, step: int, model: nn.Module) -> None:
        for f in self.faults:
            f.on_gradients(step, model)

    def on_optimizer(self, step: int, optimizer) -> None:
        for f in self.faults:
            f.on_optimizer(step, optimizer)

    def after_step(self, step: int, optimizer) -> None:
        for f in reversed(self.faults):
            f.after_step(step, optimizer)

    @property
    def strikes(self) -> list[Strike]:
        return sorted((s for f in self.faults for s in f.strikes), key=lambda s: s.step)

    def spec(self) -> str:
        return "+".join(f.spec() for f in self.faults) or "none"

    def __repr__(self) -> str:
        return f"FaultPlan({self.spec()!r})"


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _value(fault: str, key: str, typ: type, raw: str) -> Any:
    where = f"fault {fault!r}: option {key}={raw!r}"
    if typ is str:
        if not raw or any(c in raw for c in "+:,="):
            raise FaultSpecError(f"{where} is empty or holds one of '+:,='; give a plain name")
        return raw
    try:
        v = float(raw)
    except ValueError:
        raise FaultSpecError(f"{where} is not a number") from None
    if not math.isfinite(v):
        raise FaultSpecError(f"{where} must be finite")
    if typ is int:
        if v != int(v):
            raise FaultSpecError(f"{where} must be a whole number")
        return int(v)
    return v


def _check(fault: str, opts: dict[str, Any]) -> None:
    def bad(msg: str) -> FaultSpecError:
        return FaultSpecError(f"fault {fault!r}: {msg}")

    if opts.get("p") is not None and not 0.0 <= opts["p"] <= 1.0:
        raise bad(f"p={opts['p']} is a probability per step: give 0 <= p <= 1")
    if opts.get("at") is not None and opts["at"] < 0:
        raise bad(f"at={opts['at']} is a step: give at >= 0")
    if opts.get("p") is not None and opts.get("at") is not None:
        raise bad("give either p (a probability per step) or at (one step), not both")
    for k in ("scale", "factor"):
        if k in opts and opts[k] <= 0:
            raise bad(f"{k}={opts[k]} must be > 0")
    if fault == "spike" and opts["scale"] <= 1:
        raise bad(f"scale={opts['scale']} does not spike: give scale > 1 (e.g. 1e4)")
    if fault == "lr_burst":
        if opts.get("at") is None:
            raise bad(
                "needs at=STEP, the first step of the burst (e.g. lr_burst:factor=100,at=200)"
            )
        if opts["steps"] < 1:
            raise bad(f"steps={opts['steps']} must be >= 1")
    if fault == "poison" and opts["mode"] not in ("scale", "shuffle"):
        raise bad(f"mode={opts['mode']!r}: choose scale or shuffle")


def parse_fault(text: str, seed: int = 0) -> _Fault:
    """One fault ``name[:key=value,...]``."""
    name, sep, rest = text.strip().partition(":")
    name = name.strip()
    if not _NAME.match(name) or name not in _OPTIONS:
        raise FaultSpecError(
            f"unknown fault {name!r}; valid faults: {', '.join(_OPTIONS)} (or 'none')"
        )
    spec = _OPTIONS[name]
    opts = {k: d for k, (_, d) in spec.items()}
    seen: set[str] = set()
    if sep:
        if not rest.strip():
            raise FaultSpecError(f"fault {name!r}: nothing after ':'; write {name}:key=value")
        for item in rest.split(","):
            key, eq, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not eq or not key:
                raise FaultSpecError(
                    f"fault {name!r}: {item.strip()!r} is not key=value; options: {', '.join(spec)}"
                )
            if key not in spec:
                raise FaultSpecError(
                    f"fault {name!r}: unknown option {key!r}; options: {', '.join(spec)}"
                )
            if key in seen:
                raise FaultSpecError(f"fault {name!r}: option {key!r} given twice")
            seen.add(key)
            opts[key] = _value(name, key, spec[key][0], raw)
    _check(name, opts)
    return _CLASSES[name](name, seed, opts)


def parse(spec: str, seed: int = 0) -> FaultPlan:
    """A :class:`FaultPlan` from a spec such as ``"nan:p=0.01+lr_burst:factor=100,at=200"``."""
    if not isinstance(spec, str):
        raise FaultSpecError(f"a fault spec is a string, got {type(spec).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise FaultSpecError(f"seed must be an int, got {seed!r}")
    text = spec.strip()
    if text == "none":
        return FaultPlan([])
    if not text:
        raise FaultSpecError("empty fault spec; write 'none' or e.g. 'nan:p=0.01'")
    parts = text.split("+")
    if any(not p.strip() for p in parts):
        raise FaultSpecError(f"empty fault in {spec!r}; join faults with a single '+'")
    faults = [parse_fault(p, seed) for p in parts]
    names = [f.name for f in faults]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FaultSpecError(f"fault {', '.join(dupes)} given twice; give each fault once")
    return FaultPlan(faults)


def corrupt_checkpoint(path: str | os.PathLike, mode: str = "truncate", seed: int = 0) -> None:
    """Damage a checkpoint file as a crash or a bad disk would: ``truncate`` cuts it at a point
    drawn from the seed (in its second half or before); ``garbage`` overwrites a run of bytes."""
    p = Path(path)
    data = bytearray(p.read_bytes())
    if not data:
        raise FaultSpecError(f"{p} is empty: nothing to corrupt")
    rng = np.random.default_rng([seed, zlib.crc32(b"corrupt_checkpoint")])
    if mode == "truncate":
        cut = int(rng.integers(1, max(2, len(data) * 3 // 4)))
        p.write_bytes(bytes(data[:cut]))
    elif mode == "garbage":
        n = max(16, len(data) // 8)
        start = int(rng.integers(0, max(1, len(data) - n)))
        data[start : start + n] = (
            rng.integers(0, 256, size=min(n, len(data) - start)).astype(np.uint8).tobytes()
        )
        p.write_bytes(bytes(data))
    else:
        raise FaultSpecError(f"corrupt_checkpoint mode={mode!r}: choose truncate or garbage")
