"""The fault injectors: the failures that hit real training, each a small registered class.

Every draw comes from :func:`~.base.uniform` (seed, fault name, step, salt), so a schedule is a
pure function of the seed: the same seed strikes the same steps and layers whatever else the run
does, and adding a fault to a plan does not move the others' strikes. The salts: 0 decides whether
a step is struck, 1 picks the layer, 2 seeds a label shuffle.
"""

from __future__ import annotations

import fnmatch
import math
import os
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .base import Fault, FaultSpecError, Option, Strike, check_seed, grad_layers, uniform
from .spec import register

P = Option(
    "p",
    float,
    None,
    "p is the strike probability per step, 0 <= p <= 1 (0.01 unless at is given)",
    min=0.0,
    max=1.0,
)
AT = Option(
    "at",
    int,
    None,
    "at is the step to strike at, or steps joined by '|' (at=3|7|20), each >= 0",
    min=0,
    many=True,
)
LAYER = Option(
    "layer",
    str,
    None,
    "layer is a module name or glob (default: one drawn per strike among the modules that own "
    "a gradient; layer=* is every such module)",
    glob=True,
)


class _LayerFault(Fault):
    """A fault on the gradients of one layer (drawn, or named by ``layer=``) or of all (``*``)."""

    def _pick(self, step: int, model: nn.Module) -> list[tuple[str, list[torch.Tensor]]]:
        layers = grad_layers(model)
        pattern = self.values.get("layer")
        if not layers or pattern == "*":
            return layers
        if pattern is not None:
            matched = [lg for lg in layers if fnmatch.fnmatchcase(lg[0], pattern)]
            if not matched:
                raise FaultSpecError(
                    f"fault {self.name!r}: layer={pattern!r} matches no module with a gradient; "
                    f"modules with one: {', '.join(n for n, _ in layers)}"
                )
            layers = matched
        k = int(uniform(self.seed, self.name, step, salt=1) * len(layers))
        return [layers[min(k, len(layers) - 1)]]

    def _where(self, picked: list[tuple[str, list[torch.Tensor]]]) -> str:
        return "*" if self.values.get("layer") == "*" else ",".join(n for n, _ in picked)


class _NonFinite(_LayerFault):
    value: ClassVar[float]
    options = (P, AT, LAYER)

    def on_gradients(self, step: int, model: nn.Module) -> None:
        if not self.scheduled(step):
            return
        picked = self._pick(step, model)
        with torch.no_grad():
            for _, grads in picked:
                g = next((g for g in grads if g.numel()), None)
                if g is not None:
                    # One element is enough: one NaN/Inf poisons every norm and every update.
                    g[(0,) * g.dim()] = self.value
        if picked:
            self._record(step, self._where(picked), value=self.value)


@register
class NanGrad(_NonFinite):
    """A NaN in one layer's gradient (its first element), after backward: what an overflowing
    activation, a log(0) or a 0/0 leaves. ``p=0.01`` per step unless ``at=``; ``layer=`` a module
    name or glob (default: one drawn per strike)."""

    name = "nan"
    value = math.nan


@register
class InfGrad(_NonFinite):
    """An Inf in one layer's gradient (its first element), after backward: an overflow.
    ``p=0.01`` per step unless ``at=``; ``layer=`` a module name or glob (default: one drawn)."""

    name = "inf"
    value = math.inf


@register
class SpikeGrad(_LayerFault):
    """One layer's gradient multiplied by ``scale`` (default 1e4; ``layer=*``: every layer's): the
    loss spike of a bad batch or an instability. ``p=0.01`` per step unless ``at=``."""

    name = "spike"
    options = (
        Option(
            "scale",
            float,
            1e4,
            "scale multiplies the gradient: give scale > 1 (1e3 to 1e6 are typical)",
            above=1.0,
        ),
        P,
        AT,
        LAYER,
    )

    def on_gradients(self, step: int, model: nn.Module) -> None:
        if not self.scheduled(step):
            return
        scale = self.values["scale"]
        picked = self._pick(step, model)
        with torch.no_grad():
            for _, grads in picked:
                for g in grads:
                    g.mul_(scale)
        if picked:
            self._record(step, self._where(picked), scale=scale)


@register
class PoisonBatch(Fault):
    """A poisoned batch, before the forward pass: its (float) inputs multiplied by ``scale``
    (``mode=scale``, default 1e3) or its labels permuted (``mode=shuffle``). The batch passed in is
    never modified. ``p=0.01`` per step unless ``at=``."""

    name = "poison"
    phase = 0
    options = (
        Option(
            "mode",
            str,
            "scale",
            "mode=scale multiplies the inputs by scale, mode=shuffle permutes the labels",
            choices=("scale", "shuffle"),
        ),
        Option("scale", float, 1e3, "scale multiplies the inputs: give scale > 0", above=0.0),
        P,
        AT,
    )

    def on_batch(self, step: int, x: Any, y: Any) -> tuple[Any, Any]:
        if not self.scheduled(step):
            return x, y
        if self.values["mode"] == "shuffle":
            if not torch.is_tensor(y) or y.dim() == 0:
                raise ConfigError(
                    f"poison:mode=shuffle needs the labels as a tensor with a batch dimension, "
                    f"got {type(y).__name__}"
                )
            n = y.shape[0]
            gen = torch.Generator().manual_seed(int(uniform(self.seed, self.name, step, 2) * 2**31))
            perm = torch.randperm(n, generator=gen)
            if n > 1 and torch.equal(perm, torch.arange(n)):
                perm = perm.roll(1)  # a shuffle that moves nothing would be no fault at all
            self._record(step, "labels", mode="shuffle")
            return x, y[perm.to(y.device)]
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ConfigError(
                "poison:mode=scale multiplies floating-point inputs, got "
                f"{getattr(x, 'dtype', type(x).__name__)}; use poison:mode=shuffle for token inputs"
            )
        scale = self.values["scale"]
        self._record(step, "inputs", mode="scale", scale=scale)
        return x * scale, y


@register
class LrBurst(Fault):
    """Every param group's LR multiplied by ``factor`` (default 100) for ``steps`` (default 10)
    steps from ``at`` (required; ``at=200|500`` for two bursts): a mis-set schedule or warmup.
    The LR is restored after each step, exactly."""

    name = "lr_burst"
    phase = 2
    needs_at = True
    options = (
        Option(
            "factor",
            float,
            100.0,
            "factor multiplies every group's LR: give factor > 0",
            above=0.0,
        ),
        Option("steps", int, 10, "steps is how long each burst lasts: give steps >= 1", min=1),
        Option(
            "at",
            int,
            None,
            "at is the first step of the burst (or bursts: at=200|500), >= 0, "
            "e.g. lr_burst:factor=100,at=200",
            min=0,
            many=True,
        ),
    )

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._saved: list[tuple[dict, Any, Any]] | None = None  # (group, lr before, lr set)

    def scheduled(self, step: int) -> bool:
        n = self.values["steps"]
        return any(a <= step < a + n for a in self.values["at"])

    def on_optimizer(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        self._restore()  # a burst whose after_step was missed must not compound
        if not self.scheduled(step):
            return
        factor = self.values["factor"]
        saved = []
        for g in optimizer.param_groups:
            lr = g["lr"]
            if torch.is_tensor(lr):  # a tensor LR (capturable / compiled optimizers): in place
                before = lr.clone()
                lr.mul_(factor)
                saved.append((g, before, lr.clone()))
            else:
                g["lr"] = lr * factor
                saved.append((g, lr, g["lr"]))
        self._saved = saved
        self._record(step, "lr", factor=factor)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        self._restore()

    def _restore(self) -> None:
        """Put back the LR as it was before the burst, exactly. If something changed it since
        (a scheduler stepped between ``on_optimizer`` and ``after_step``), keep that change and
        undo only the factor (exact for the multiplicative schedulers torch's are)."""
        if self._saved is None:
            return
        factor = self.values["factor"]
        for g, before, burst in self._saved:
            now = g["lr"]
            if torch.is_tensor(now):
                if torch.equal(now, burst):
                    now.copy_(before)
                else:
                    now.div_(factor)
            else:
                g["lr"] = before if now == burst else now / factor
        self._saved = None


@register
class Fp16Overflow(_LayerFault):
    """An Inf in one (scaled) gradient, after backward and before ``GradScaler.unscale_`` (so
    before ``guard.step``, which unscales): what an fp16 overflow leaves, so the scaler finds it,
    skips the step and halves its scale. ``p=0.01`` per step unless ``at=``."""

    name = "fp16_overflow"
    options = (P, AT)

    def on_gradients(self, step: int, model: nn.Module) -> None:
        if not self.scheduled(step):
            return
        for name, grads in self._pick(step, model):
            g = next((g for g in grads if g.numel()), None)
            if g is not None:
                with torch.no_grad():
                    g[(0,) * g.dim()] = math.inf
                self._record(step, name, value=math.inf)


@register
class LogitDrift(Fault):
    """Every output logit moved by the same ``rate`` nats (0.5), down (or ``direction=up``), on
    each struck step (``p=1``: every step, a steady drift): the logits' common mode, which the
    softmax loss cannot see and so nothing pulls back. At scale Adam's per-coordinate steps walk
    it without weight decay: Wortsman et al. 2023's output-logit divergence, the logits "very
    negative", which costs precision in bf16 and which the z-loss prevents. The output layer is
    ``layer=`` (a module name) or the model's last ``nn.Linear``; its bias moves, or, without
    one, each row of its weight by the same vector along the layer's mean input of the last
    forward (the output embeddings' mean drifting); before the step, after backward."""

    name = "logit_drift"
    phase = 1
    options = (
        Option(
            "rate",
            float,
            0.5,
            "rate is the nats each strike moves every logit: give rate > 0",
            above=0.0,
        ),
        Option(
            "direction",
            str,
            "down",
            "direction=down moves the logits down (toward very negative), direction=up up",
            choices=("down", "up"),
        ),
        P,
        AT,
        Option(
            "layer",
            str,
            None,
            "layer is the output layer's module name (default: the model's last nn.Linear)",
            glob=True,
        ),
    )

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._hooked: tuple[nn.Module, Any] | None = None
        self._mean_input: torch.Tensor | None = None

    def _layer(self, model: nn.Module) -> tuple[str, nn.Linear]:
        pattern = self.values.get("layer")
        linears = [(n or "(root)", m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if pattern is not None:
            linears = [(n, m) for n, m in linears if fnmatch.fnmatchcase(n, pattern)]
        if not linears:
            raise FaultSpecError(
                f"fault {self.name!r}: "
                + (
                    f"layer={pattern!r} matches no nn.Linear"
                    if pattern
                    else "the model has no nn.Linear"
                )
                + "; name the output layer with layer=NAME (an nn.Linear)"
            )
        return linears[-1]

    def _record_input(self, _m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        x = args[0] if args else None
        if torch.is_tensor(x) and x.is_floating_point() and x.numel():
            self._mean_input = x.detach().reshape(-1, x.shape[-1]).float().mean(0)

    def on_gradients(self, step: int, model: nn.Module) -> None:
        name, layer = self._layer(model)
        if layer.bias is None and (self._hooked is None or self._hooked[0] is not layer):
            # the next forwards' mean input gives the direction a bias-free layer's rows move in
            if self._hooked is not None:
                self._hooked[1].remove()
            self._hooked = (layer, layer.register_forward_hook(self._record_input))
            self._mean_input = None
        if not self.scheduled(step):
            return
        shift = -self.values["rate"] if self.values["direction"] == "down" else self.values["rate"]
        with torch.no_grad():
            if layer.bias is not None:
                layer.bias.add_(shift)
            else:
                h = self._mean_input
                if h is None or not bool(torch.isfinite(h).all()) or float(h.square().sum()) == 0:
                    return  # no forward seen yet (the hook came with this step) or no direction
                v = (shift * h / h.square().sum()).to(layer.weight.dtype)
                layer.weight.add_(v.to(layer.weight.device))  # each row: the same vector
        self._record(step, name, shift=shift)


CHECKPOINT_MODES = ("truncate", "garbage")


def corrupt_checkpoint(
    path: str | os.PathLike, mode: str = "truncate", seed: int = 0, *, step: int = 0
) -> Strike:
    """Damage a checkpoint file as a crash mid-write or a bad disk would, deterministically from
    ``seed``, so that loading it fails (for tests of checkpoint loading and recovery):

    - ``truncate``: cut the file at a point drawn in its first three quarters (a zip's directory
      sits at its end, a legacy file's tensors: either way the reader runs out);
    - ``garbage``: flip every byte of a run (1/8 of the file, at least 16 bytes) starting in the
      first four bytes, where every format keeps the magic number and first header a reader
      checks. (Scribbles inside tensor data are not caught by ``torch.load``: no checksum.)

    Returns the :class:`Strike` (``where`` the path; ``detail`` the mode, offset and length);
    ``step`` is the training step it stands for.
    """
    if mode not in CHECKPOINT_MODES:
        raise FaultSpecError(
            f"corrupt_checkpoint: mode={mode!r} is not one of {', '.join(CHECKPOINT_MODES)}"
        )
    seed = check_seed(seed)
    p = Path(path)
    data = bytearray(p.read_bytes())
    size = len(data)
    if not size:
        raise FaultSpecError(f"corrupt_checkpoint: {p} is empty: nothing to corrupt")
    rng = np.random.default_rng([seed, zlib.crc32(b"corrupt_checkpoint")])
    if mode == "truncate":
        cut = int(rng.integers(1, max(2, size * 3 // 4))) if size > 1 else 0
        p.write_bytes(bytes(data[:cut]))
        offset, length = cut, size - cut
    else:
        length = min(size, max(16, size // 8))
        offset = int(rng.integers(0, min(3, size - length) + 1))
        noise = rng.integers(1, 256, size=length, dtype=np.uint8)  # never 0: every byte changes
        run = np.frombuffer(bytes(data[offset : offset + length]), dtype=np.uint8)
        data[offset : offset + length] = (run ^ noise).tobytes()
        p.write_bytes(bytes(data))
    return Strike(
        step, "corrupt_checkpoint", str(p), {"mode": mode, "offset": offset, "length": length}
    )
