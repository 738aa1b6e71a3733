"""Event detection on the step records of a run: non-finite gradients and losses, gradient spikes
(global, and single layers against their own history), vanishing layers, loss spikes, fp16
overflows. It runs on host floats the telemetry already has, every step, before any downsampling.

Spikes are z-scores of ``log(norm)`` against an exponential moving average of its mean and variance
(after a warmup that seeds them from the first steps' mean and variance), as ZClip does on the
norm itself (Kumar et al. 2025); the log makes a x10 jump the same event at any scale. A spike must
also be a real multiple of the typical value (``ratio``), so a very steady run does not flag noise.
Spike steps do not update the statistics (a spike must not teach the detector that spikes are
normal), unless ``persist`` steps in a row are "spikes": then the level has moved and is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard


def _finite(x: float | None) -> TypeGuard[float]:
    return x is not None and math.isfinite(x)


@dataclass
class _Ema:
    """Mean and variance of a series by an EMA, seeded from a warmup window."""

    alpha: float
    warmup: int
    seen: list[float] = field(default_factory=list)
    mean: float = 0.0
    var: float = 0.0
    ready: bool = False
    streak: int = 0  # consecutive outliers

    def z(self, x: float) -> float:
        if not self.ready:
            return 0.0
        return (x - self.mean) / math.sqrt(self.var + 1e-12)

    def update(self, x: float) -> None:
        if not self.ready:
            self.seen.append(x)
            if len(self.seen) >= self.warmup:
                n = len(self.seen)
                self.mean = sum(self.seen) / n
                self.var = sum((v - self.mean) ** 2 for v in self.seen) / n
                self.ready = True
                self.seen = []
            return
        a = self.alpha
        self.mean = a * self.mean + (1 - a) * x
        self.var = a * self.var + (1 - a) * (x - self.mean) ** 2


def action_of(record: dict[str, Any]) -> str:
    """What the Guard did on a step: ``rolled_back``, ``skipped``, ``clipped`` or ``none``."""
    if record.get("rolled_back"):
        return "rolled_back"
    if record.get("skipped"):
        return "skipped"
    if record.get("clipped"):
        return "clipped"
    return "none"


class EventDetector:
    """Turns step records into event records (see ``records.py``), one ``observe`` per step.

    Args:
        layers: layer names (the order of the records' per-layer lists).
        forward_order: layer indices input side first (a NaN made in backward reaches every layer
            before it, so non-finite layers are listed last-in-forward-order first).
        warmup: steps that seed the statistics before anything is called a spike.
        z: z-score of ``log(norm)`` above which a global norm or loss is a spike.
        ratio: a spike must also be this many times the typical value (``exp`` of the mean log).
        layer_z: z-score for a single layer to spike when the global norm does not.
        vanish: a layer vanishes when its norm stays below ``vanish`` x its warmup level ...
        vanish_steps: ... for this many steps in a row.
        alpha: EMA factor (0.95: a memory of about 20 steps).
        persist: after this many spike steps in a row the new level is accepted.
    """

    def __init__(
        self,
        layers: Sequence[str],
        forward_order: Sequence[int] = (),
        *,
        warmup: int = 20,
        z: float = 4.0,
        ratio: float = 3.0,
        layer_z: float = 6.0,
        vanish: float = 1e-3,
        vanish_steps: int = 20,
        alpha: float = 0.95,
        persist: int = 10,
    ):
        self.layers = list(layers)
        order = [i for i in forward_order if 0 <= i < len(self.layers)]
        self.backward_order = list(
            reversed(order + [i for i in range(len(layers)) if i not in set(order)])
        )
        self.z_thresh, self.ratio, self.layer_z = z, ratio, layer_z
        self.vanish, self.vanish_steps, self.persist = vanish, vanish_steps, persist
        self.norm = _Ema(alpha, warmup)
        self.loss = _Ema(alpha, warmup)
        self.layer = [_Ema(alpha, warmup) for _ in self.layers]
        self.layer_ref: list[float | None] = [None] * len(
            self.layers
        )  # warmup level, for vanishing
        self._ref_seen: list[list[float]] = [[] for _ in self.layers]
        self._low = [0] * len(self.layers)
        self._vanished = [False] * len(self.layers)
        self.warmup = warmup

    # ----- helpers ------------------------------------------------------------------------------
    def _event(self, rec: dict[str, Any], kind: str, layers: list[str], **detail: Any) -> dict:
        return {
            "type": "event",
            "step": rec["step"],
            "kind": kind,
            "layers": layers,
            "action": action_of(rec),
            "detail": detail,
        }

    def _spiky(self, ema: _Ema, x: float) -> tuple[bool, float]:
        """Whether ``log x`` spikes against ``ema``, and its z-score; updates ``ema``."""
        lx = math.log(max(x, 1e-30))
        z = ema.z(lx)
        spike = ema.ready and z > self.z_thresh and lx - ema.mean > math.log(self.ratio)
        if spike:
            ema.streak += 1
            if ema.streak >= self.persist:  # a new level, not a spike: start from it
                ema.streak = 0
                ema.mean = lx
                spike = False
        else:
            ema.streak = 0
            ema.update(lx)
        return spike, z

    # ----- the step -----------------------------------------------------------------------------
    def observe(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if rec.get("skip_reason") == "amp_overflow":
            out.append(self._event(rec, "amp_overflow", [], scale=rec.get("amp_scale")))
            return out  # the scaler's normal operation: not data for the statistics
        loss = rec.get("loss")
        if loss is not None and not _finite(loss):
            out.append(self._event(rec, "nonfinite_loss", [], loss=loss))
        norm = rec.get("grad_norm")
        layer_norms = rec.get("layer_norms") or []
        if not _finite(norm):
            bad = set(rec.get("nonfinite_layers") or [])
            names = [self.layers[i] for i in self.backward_order if i in bad]
            out.append(self._event(rec, "nonfinite_grad", names, grad_norm=norm, count=len(names)))
            return out
        if _finite(loss) and loss > 0:
            spike, z = self._spiky(self.loss, loss)
            if spike:
                out.append(
                    self._event(
                        rec,
                        "loss_spike",
                        [],
                        loss=loss,
                        z=round(z, 2),
                        typical=math.exp(self.loss.mean),
                    )
                )
        # Per-layer z-scores first (against each layer's own history), then the global norm.
        zs, layer_spikes = self._layer_zs(layer_norms)
        g_spike, g_z = self._spiky(self.norm, norm) if norm > 0 else (False, 0.0)
        if g_spike or layer_spikes:
            out.append(self._norm_spike(rec, norm, layer_norms, zs, layer_spikes, g_spike, g_z))
        out.extend(self._vanishing(rec, layer_norms))
        return out

    def _layer_zs(self, layer_norms: Sequence[float]) -> tuple[list[float], list[int]]:
        """Each layer's z-score against its own history (0 for a zero or non-finite norm), and
        the layers that spiked above ``layer_z``; updates each layer's statistics."""
        zs: list[float] = []
        layer_spikes: list[int] = []
        for i, v in enumerate(layer_norms):
            if not _finite(v) or v <= 0:
                zs.append(0.0)
                continue
            spike, z = self._spiky(self.layer[i], v)
            zs.append(z)
            if spike and z > self.layer_z:
                layer_spikes.append(i)
        return zs, layer_spikes

    def _norm_spike(
        self,
        rec: dict[str, Any],
        norm: float,
        layer_norms: Sequence[float],
        zs: list[float],
        layer_spikes: list[int],
        g_spike: bool,
        g_z: float,
    ) -> dict:
        """A ``grad_spike`` event (the global norm spiked: the five top layers ranked) or else a
        ``layer_spike`` (only layers did: those layers)."""
        total = max(norm, 1e-30) ** 2
        ranked = sorted(
            range(len(layer_norms)),
            key=lambda i: (zs[i], layer_norms[i] or 0.0),
            reverse=True,
        )
        top = ranked[:5] if g_spike else sorted(layer_spikes, key=lambda i: -zs[i])
        detail_layers: list[dict[str, Any]] = [
            {
                "name": self.layers[i],
                "z": round(zs[i], 2),
                "share": round((layer_norms[i] or 0.0) ** 2 / total, 4),
                "norm": layer_norms[i],
            }
            for i in top
        ]
        names = [d["name"] for d in detail_layers]
        if g_spike:
            return self._event(
                rec,
                "grad_spike",
                names,
                grad_norm=norm,
                z=round(g_z, 2),
                typical=math.exp(self.norm.mean),
                ranked=detail_layers,
            )
        return self._event(rec, "layer_spike", names, grad_norm=norm, ranked=detail_layers)

    def _vanishing(self, rec: dict[str, Any], layer_norms: Sequence[float]) -> list[dict]:
        out = []
        for i, v in enumerate(layer_norms):
            if not _finite(v):
                continue
            ref = self.layer_ref[i]
            if ref is None:
                seen = self._ref_seen[i]
                seen.append(v)
                if len(seen) >= self.warmup:
                    ordered = sorted(seen)
                    self.layer_ref[i] = ordered[len(ordered) // 2]
                    self._ref_seen[i] = []
                continue
            if ref <= 0:
                continue  # a layer that never had a gradient (frozen, unused) does not vanish
            if v < self.vanish * ref:
                self._low[i] += 1
                if self._low[i] >= self.vanish_steps and not self._vanished[i]:
                    self._vanished[i] = True
                    out.append(
                        self._event(
                            rec,
                            "vanishing",
                            [self.layers[i]],
                            norm=v,
                            reference=ref,
                            steps=self._low[i],
                        )
                    )
            else:
                self._low[i] = 0
                if v > 10 * self.vanish * ref:
                    self._vanished[i] = False  # recovered: may be reported again
        return out
