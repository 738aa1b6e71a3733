"""The statistics of the optimizer's update: how far one step moved each layer, relative to its
weights, measured from the weights themselves, so for any torch optimizer.

Two ways to measure, chosen step by step by the policies that read them:

- ``"exact"``: the weights are copied before the step (one buffer the size of the parameters,
  kept between steps) and subtracted after it. The update is known element by element, so it can
  also be scaled back per layer (:meth:`UpdateProbe.scale_layers_`). Costs a copy and a subtraction
  of the parameters, about one optimizer step.
- ``"sample"``: a strided sample of at most ``samples`` elements of each tensor is copied and
  compared instead. The per-layer ratio ``||update|| / ||weights||`` is estimated from the sample
  (exact for tensors no larger than it); the update is known only there, so it cannot be scaled.
  Costs almost nothing; a policy uses it to notice that it should measure exactly.

After the step the probe also measures every weight's norm (one fused pass), which is the Guard's
post-step finiteness check and the next step's pre-step weight norms (reused while no in-place
write has touched the weights since, as told by their version counters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

from ._lazy import np, torch
from .integrity import FIRST_MOMENTS
from .layout import ParamLayout
from .stats import Sharding, all_finite, foreach_norms, group_by_kind

if TYPE_CHECKING:
    from torch import Tensor

Mode = Literal["exact", "sample"]
#: Elements of each tensor a sampled measurement looks at, at most.
DEFAULT_SAMPLES = 1024
#: A layer whose weights' RMS is below this is treated as zero: a ratio to nothing is undefined.
ZERO_RMS = 1e-6


@dataclass
class UpdateStats:
    """One step's update, per layer (host values, one read).

    ``ratio[l]``: ``||update_l|| / ||weights_l||`` before the step (NaN for a layer whose weights
    were ~zero, or that has no guarded tensor); ``exact``: measured exactly (else estimated from a
    sample); ``finite``: every weight is finite after the step.
    """

    ratio: np.ndarray
    exact: bool
    finite: bool


def _flat_view(p: Tensor) -> Tensor | None:
    """A 1-D view of ``p``'s elements in memory order (None if its strides do not allow one)."""
    t = p.detach()
    if t.is_contiguous():
        return t.view(-1)
    # stride()[d], not stride(d): mypy types the lambda against stride's no-argument overload
    order = sorted(range(t.dim()), key=lambda d: -t.stride()[d])
    q = t.permute(order)
    return q.view(-1) if q.is_contiguous() else None


def _device_sq(norms: list[Tensor]) -> Tensor:
    """Squared norms as one float64 tensor on the first norm's device (no host read)."""
    if not norms:
        return torch.zeros(0, dtype=torch.float64)
    dev, dtype = norms[0].device, norms[0].dtype
    if all(n.device == dev and n.dtype == dtype for n in norms):
        # One stack, then one cast: the same values as casting each (the usual case).
        return torch.stack(norms).to(torch.float64).square()
    return torch.stack([n.to(dev, torch.float64, non_blocking=True) for n in norms]).square()


class UpdateProbe:
    """Measures the update of each optimizer step (see the module docstring). Built by the Guard
    when a policy in its chain reads updates."""

    def __init__(self, layout: ParamLayout, samples: int = DEFAULT_SAMPLES):
        self.layout = layout
        self.params = list(layout.params)
        local, self._sharding = Sharding.split([p.detach() for p in self.params])
        self._local = local
        self.num_layers = len(layout.layer_names)
        self._layer_of = np.asarray(layout.layer_of, dtype=np.int64)
        self._layer_numel = np.bincount(
            self._layer_of,
            weights=np.asarray([float(p.numel()) for p in self.params]),
            minlength=self.num_layers,
        )
        # Sampled views: every ``stride``-th element of each local tensor.
        self._views: list[Tensor] = []
        self._weights: list[float] = []  # numel / sampled count: scales a sample's squares
        for t in local:
            flat = _flat_view(t)
            n = t.numel()
            if flat is None or n == 0:
                flat = t.reshape(-1)  # a copy: sampled mode re-reads it after the step anyway
            stride = max(1, math.ceil(n / samples)) if n else 1
            # Coprime with the row length, so the sample visits every column, not a few.
            row = min((t.shape[d] for d in range(t.dim()) if t.stride(d) == 1), default=1)
            while stride > 1 and math.gcd(stride, row) != 1:
                stride += 1
            view = flat[::stride]
            self._views.append(view)
            self._weights.append(n / view.numel() if view.numel() else 0.0)
        dev = local[0].device if local else torch.device("cpu")
        self._weights_t = torch.tensor(self._weights, dtype=torch.float64, device=dev)
        # One flat sample for the common case (one device, real dtypes): a handful of kernels a
        # step however many tensors, instead of a few per tensor.
        self._fused = bool(local) and all(
            t.device == dev and not t.is_complex() and t.numel() for t in local
        )
        if self._fused:
            wide = any(t.dtype == torch.float64 for t in local)
            self._sample_dtype = torch.float64 if wide else torch.float32
            # Every tensor already in the sample's dtype (the usual case): one cat, no casts.
            self._cast_views = any(t.dtype != self._sample_dtype for t in local)
            counts = torch.tensor([v.numel() for v in self._views], device=dev)
            self._segments = torch.repeat_interleave(torch.arange(len(local), device=dev), counts)
        self._sample_before: Tensor | list[Tensor] | None = None
        self._old: list[Tensor] | None = None
        self._mode: Mode | None = None
        self._check = True
        self._pre_norms: Tensor | None = None
        self._pre_versions: list[int] | None = None

    # ----- before the step --------------------------------------------------------------------------
    def before(self, mode: Mode, check: bool = True) -> None:
        """Record what the step is measured against (a copy or a sample of the weights, and their
        norms). ``check``: :meth:`after` will also read every weight's norm (the integrity check),
        which then serves as the next step's pre-step norms; without it a sampled step estimates
        the weights' norms from its sample too, and costs nothing on the full parameters."""
        self._mode, self._check = mode, check
        if (mode == "exact" or check) and (
            self._pre_norms is None or self._versions() != self._pre_versions
        ):
            self._pre_norms = self._param_norms_sq()
        if mode == "exact":
            if self._old is None:
                self._old = [t.detach().clone() for t in self._local]
            else:
                for idx in group_by_kind(self._local).values():
                    torch._foreach_copy_([self._old[k] for k in idx], [self._local[k] for k in idx])
        else:
            self._sample_before = self._take_sample()

    def _take_sample(self) -> Tensor | list[Tensor]:
        if self._fused:
            if not self._cast_views:
                return torch.cat(self._views)
            return torch.cat([v.to(self._sample_dtype) for v in self._views])
        return [v.clone() for v in self._views]

    def _segment_sq(self, flat: Tensor) -> Tensor:
        """Per-tensor sums of squares of a flat sample (float64)."""
        sq = flat.double().square()
        out = torch.zeros(len(self._views), dtype=torch.float64, device=flat.device)
        return out.index_add_(0, self._segments, sq)

    def _versions(self) -> list[int]:
        return [p._version for p in self.params]

    def _param_norms_sq(self) -> Tensor:
        """Squared norm of each parameter (all ranks' shards summed), float64, on the device."""
        sq = _device_sq(foreach_norms(self._local) if self._local else [])
        if self._sharding is not None:
            sq = self._sharding.all_reduce_sq(sq)
        return sq

    # ----- after the step ---------------------------------------------------------------------------
    def after(self) -> UpdateStats:
        """Measure the step just taken (and every weight's finiteness) with one host read."""
        assert self._mode is not None, "UpdateProbe.after() without before()"
        n = len(self.params)
        full = self._check or self._mode == "exact"
        post = self._param_norms_sq() if self._check else None
        if self._mode == "exact":
            upd, sample_w = self._exact_update_sq(), None
        else:
            upd, sample_w = self._sampled_update_sq(full)
        if self._sharding is not None:
            upd = self._sharding.all_reduce_sq(upd)
        if sample_w is not None and self._sharding is not None:
            sample_w = self._sharding.all_reduce_sq(sample_w)
        pre = self._pre_norms if full else sample_w
        assert pre is not None
        # The one read: this step's update norms, the pre-step weight norms, and (checking) every
        # weight's norm now.
        parts = [upd, pre.to(upd.device)] + ([] if post is None else [post.to(upd.device)])
        host = torch.cat(parts).cpu().numpy()
        upd_h, pre_h = host[:n], host[n : 2 * n]
        # A norm that overflowed while every element is finite is looked at exactly (on one
        # process; sharded, the ranks agree on the reduced norms alone). Unchecked: not known.
        finite = (
            post is None
            or bool(np.isfinite(host[2 * n :]).all())
            or (self._sharding is None and all_finite(self._local))
        )
        ratio = self._layer_ratio(upd_h, pre_h)
        # The post-step norms are the next step's pre-step norms, while nothing writes the weights.
        if post is not None:
            self._pre_norms, self._pre_versions = post, self._versions()
        else:
            self._pre_norms = None
        exact = self._mode == "exact"
        self._mode = None
        return UpdateStats(ratio=ratio, exact=exact, finite=finite)

    def _exact_update_sq(self) -> Tensor:
        """Squared norm of each tensor's update, from the copy taken before the step (local)."""
        assert self._old is not None
        for idx in group_by_kind(self._local).values():
            # old <- old - new = -update: kept for scale_layers_
            torch._foreach_sub_([self._old[k] for k in idx], [self._local[k] for k in idx])
        return _device_sq(foreach_norms(self._old) if self._old else [])

    def _sampled_update_sq(self, full: bool) -> tuple[Tensor, Tensor | None]:
        """Each tensor's squared update norm estimated from the sample (local), and, unless
        ``full`` norms are measured, its squared weight norm estimated from the sample too."""
        assert self._sample_before is not None
        before = self._sample_before
        w = self._weights_t
        sample_w = None
        if self._fused:
            assert isinstance(before, torch.Tensor)
            d = cast("Tensor", self._take_sample()) - before  # fused: one flat tensor
            upd = self._segment_sq(d) * w
            if not full:
                sample_w = self._segment_sq(before) * w
        else:
            assert isinstance(before, list)
            diffs = list(torch._foreach_sub(self._views, before))
            upd = _device_sq(foreach_norms(diffs) if diffs else [])
            w = w.to(upd.device)
            upd = upd * w
            if not full:
                sample_w = _device_sq(foreach_norms(before)) * w
        self._sample_before = None
        return upd, sample_w

    def _layer_ratio(self, upd_sq: np.ndarray, pre_sq: np.ndarray) -> np.ndarray:
        """``||update_l|| / ||weights_l||`` per layer from per-tensor squared norms (NaN where
        the weights are ~zero)."""
        layer_upd = np.bincount(self._layer_of, weights=upd_sq, minlength=self.num_layers)
        layer_w = np.bincount(self._layer_of, weights=pre_sq, minlength=self.num_layers)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.sqrt(layer_upd) / np.sqrt(layer_w)
        ratio[layer_w <= (ZERO_RMS**2) * self._layer_numel] = np.nan
        return ratio

    def scale_layers_(self, layer_scale: list[float]) -> None:
        """Scale the update just measured (exactly) by ``layer_scale[l]`` in layer ``l``:
        ``w <- w_new + (1 - s) * (w_old - w_new)``; layers with a scale of 1 are not touched."""
        assert self._old is not None, "scale_layers_ needs an exact measurement"
        lo = self.layout.layer_of
        with torch.no_grad():
            for k, t in enumerate(self._local):
                s = layer_scale[lo[k]]
                if s < 1.0:
                    t.add_(self._old[k], alpha=1.0 - s)
        # The weights changed: their norms are re-measured before the next step.
        self._pre_norms = None

    def scale_moments_(self, optimizer: torch.optim.Optimizer, layer_scale: list[float]) -> None:
        """Scale the first-moment buffers (:data:`~gradguard.integrity.FIRST_MOMENTS`) of layer
        ``l``'s parameters by ``layer_scale[l]``, with the update (:meth:`scale_layers_`).

        Without it a bounded momentum or Adam step leaves the optimizer holding the direction it
        proposed: the next step adds to the full buffer, and a run that needs every step bounded
        keeps accelerating against the bound. Optimizers without such a buffer (plain SGD,
        Adagrad) are untouched; a buffer shaped unlike its parameter is left alone.
        """
        lo = self.layout.layer_of
        with torch.no_grad():
            for k, p in enumerate(self.params):
                s = layer_scale[lo[k]]
                if s >= 1.0:
                    continue
                state = optimizer.state.get(p)
                if not state:
                    continue
                for key in FIRST_MOMENTS:
                    buf = state.get(key)
                    if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
                        buf.mul_(s)

    def drop_copy(self) -> None:
        """Release the exact-mode buffer (the size of the parameters) until it is needed again."""
        self._old = None
