"""One fused pass over the gradients per step: global, per-parameter and per-layer norms, and the
non-finite flag derived from them.

Norms are computed with ``torch._foreach_norm`` on gradients grouped by (device, dtype, layout), as
``torch.nn.utils.clip_grad_norm_`` does: float32, float64 and complex gradients in their own
precision (bit-identical to torch), fp16/bf16 accumulated in float32 so they neither overflow nor
lose the norm. Sparse gradients are coalesced once and measured through their values. Finiteness is
read off the global norm (a NaN or Inf anywhere makes it non-finite) instead of a separate
``isfinite`` scan over every element, which costs ~20x a norm. A norm can also be infinite while
every element is finite (float32 squares overflow above ~1.8e19): when the Guard sees a non-finite
norm it calls :meth:`GradStats.rescue_`, which re-measures exactly (max-abs, then scaled float64
norms) and keeps the statistics finite where the gradients are. That costs nothing on normal steps.

The in-place operations on the gradients (`scale_`, `scale_params_`, `clamp_`) live here too, so
that after a policy acts the running per-parameter norms stay exact without another pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from ._lazy import torch
from .errors import ConfigError
from .layout import ParamLayout

if TYPE_CHECKING:
    from torch import Tensor
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor


@functools.cache
def _dtensor_type() -> type[DTensor] | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


class Sharding:
    """Gradients sharded across ranks as DTensors (FSDP2's ``fully_shard``, tensor parallelism).

    Each rank holds a shard; the true norm of a parameter's gradient is the square root of the sum
    of its shards' squared norms over the ranks. The statistics are taken on the local shards and
    the per-parameter squared norms are summed with ONE all-reduce (per mesh dimension), so every
    rank sees the same global, per-parameter and per-layer norms and takes the same decisions.
    A replicated placement holds the whole tensor on every rank of that mesh dimension: its share
    is divided by the number of replicas so the sum counts it once. Plain tensors beside DTensors
    are taken to be replicated on every rank of the mesh (as DDP-averaged gradients are). The
    in-place mitigations act on the local shards, which is exact for per-tensor and elementwise
    factors.
    """

    def __init__(self, mesh: DeviceMesh, weights: list[float]) -> None:
        self.mesh = mesh
        self.weights = weights
        self._weights_t: dict[torch.device, Tensor] = {}

    @staticmethod
    def split(tensors: list[Tensor]) -> tuple[list[Tensor], Sharding | None]:
        """(local tensors, sharding) of a list that may hold DTensors; (same list, None) if none."""
        dt = _dtensor_type()
        if dt is None or not any(isinstance(t, dt) for t in tensors):
            return tensors, None
        mesh: DeviceMesh | None = None
        local: list[Tensor] = []
        weights: list[float | None] = []
        for t in tensors:
            if not isinstance(t, dt):
                local.append(t)
                weights.append(None)  # replicated everywhere: filled in below
                continue
            if mesh is None:
                mesh = t.device_mesh
            elif t.device_mesh != mesh:
                raise ConfigError(
                    "gradients live on different device meshes; gradguard sums shards over one mesh: "
                    "guard each mesh's parameters with their own Guard"
                )
            replicas = 1
            for dim, placement in enumerate(t.placements):
                if placement.is_partial():
                    raise ConfigError(
                        "a gradient is a Partial DTensor (not reduced yet): call guard.step() after "
                        "the gradient reduction (FSDP2 does it at the end of backward)"
                    )
                if placement.is_replicate():
                    replicas *= mesh.size(dim)
            local.append(t.to_local())
            weights.append(1.0 / replicas)
        assert mesh is not None  # any() above found a DTensor
        size = mesh.size()
        return local, Sharding(mesh, [1.0 / size if w is None else w for w in weights])

    def all_reduce_sq(self, sq: Tensor, weights: list[float] | None = None) -> Tensor:
        """Sum per-tensor squared norms over the mesh (counting replicated tensors once)."""
        import torch.distributed as dist

        w = self._weights(sq.device) if weights is None else torch.tensor(weights, device=sq.device)
        out = sq * w
        for dim in range(self.mesh.ndim):
            dist.all_reduce(out, group=self.mesh.get_group(dim))
        return out

    def all_reduce_max(self, t: Tensor) -> Tensor:
        """Elementwise max of ``t`` over the mesh (a copy)."""
        import torch.distributed as dist

        out = t.clone()
        for dim in range(self.mesh.ndim):
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.mesh.get_group(dim))
        return out

    def _weights(self, device: torch.device) -> Tensor:
        t = self._weights_t.get(device)
        if t is None:
            t = self._weights_t[device] = torch.tensor(self.weights, device=device)
        return t


class _Group:
    __slots__ = ("device", "grads", "index")

    def __init__(self, device: torch.device, grads: list[Tensor], index: list[int]):
        self.device = device
        self.grads = grads
        self.index = index  # positions of these grads in GradStats.grads


def _foreach_ok(device: torch.device) -> bool:
    return (
        device.type in ("cpu", "cuda", "xpu", "mps")
        or device.type == torch._C._get_privateuse1_backend_name()
    )


def _low_precision() -> tuple[torch.dtype, ...]:
    return (torch.float16, torch.bfloat16)


def _wide() -> tuple[torch.dtype, ...]:
    return (torch.float64, torch.complex128)


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a norm of a ``dtype`` tensor is held in: float64 for float64/complex128, float32
    otherwise (fp16/bf16 norms accumulate in float32: an fp16 sum of squares overflows at 256)."""
    return torch.float64 if dtype in _wide() else torch.float32


def _norm_of_sparse(t: Tensor, ord: float) -> Tensor:
    # A COO tensor may hold an index more than once: its values add up before they are squared.
    values = (t.coalesce() if t.layout == torch.sparse_coo else t).values()
    dt = torch.float32 if t.dtype in _low_precision() else None
    return cast("Tensor", torch.linalg.vector_norm(values, ord, dtype=dt))


def _group_norms(tensors: list[Tensor], ord: float) -> list[Tensor]:
    """Norms of tensors that share one device, dtype and layout."""
    t0 = tensors[0]
    if ord == math.inf and any(t.numel() == 0 for t in tensors):
        # torch refuses the max of nothing; the max-abs of an empty gradient is 0.
        full = [t for t in tensors if t.numel()]
        norms = iter(_group_norms(full, ord) if full else [])
        zero = torch.zeros((), device=t0.device, dtype=norm_dtype(t0.dtype))
        return [next(norms) if t.numel() else zero for t in tensors]
    if t0.layout != torch.strided:
        return [_norm_of_sparse(t, ord) for t in tensors]
    dt = torch.float32 if t0.dtype in _low_precision() else None
    if _foreach_ok(t0.device):
        if dt is None:
            return list(torch._foreach_norm(tensors, ord))
        return list(torch._foreach_norm(tensors, ord, dtype=dt))
    return [torch.linalg.vector_norm(t, ord, dtype=dt) for t in tensors]


def group_by_kind(tensors: Sequence[Tensor]) -> dict[tuple[Any, ...], list[int]]:
    """Positions of ``tensors`` grouped by (device, dtype, layout): one foreach kernel a group."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype, t.layout), []).append(k)
    return groups


def foreach_norms(tensors: Sequence[Tensor], ord: float = 2.0) -> list[Tensor]:
    """Per-tensor norms in input order, one kernel per (device, dtype, layout) group.

    Each norm is held in :func:`norm_dtype` of its tensor, on that tensor's device. Any mix of
    devices, dtypes (fp16, bf16, float32, float64, complex) and sparse layouts is measured.
    """
    out: list[Tensor | None] = [None] * len(tensors)
    for idx in group_by_kind(tensors).values():
        for k, n in zip(idx, _group_norms([tensors[k] for k in idx], ord), strict=True):
            out[k] = n
    return cast("list[Tensor]", out)  # every position was filled: each is in one group


def stacked_norms(
    tensors: Sequence[Tensor], device: torch.device, dtype: torch.dtype, ord: float = 2.0
) -> Tensor:
    """:func:`foreach_norms` as one 1-D tensor on ``device`` (empty for no tensors)."""
    if not tensors:
        return torch.zeros(0, device=device, dtype=dtype)
    return torch.stack(
        [n.to(device=device, dtype=dtype, non_blocking=True) for n in foreach_norms(tensors, ord)]
    )


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite (a host read).

    One fused L2 pass decides the common case: all norms finite means all elements are (a
    max-abs pass would be exact too, but torch's inf-norm kernels are ~100x slower on CPU). Only a
    tensor whose norm is not finite, which an overflowing sum of squares can also cause, is then
    checked element by element.
    """
    if not tensors:
        return True
    per = foreach_norms(tensors)
    dev = tensors[0].device
    if all(n.device == dev and n.dtype == per[0].dtype for n in per):
        norms = torch.stack(per)
    else:
        norms = torch.stack([n.to(dev, torch.float64) for n in per])
    if bool(torch.isfinite(norms).all()):
        return True
    bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
    for k in bad:
        t = tensors[k]
        v = (t.coalesce() if t.layout == torch.sparse_coo else t).values() if t.is_sparse else t
        if not bool(torch.isfinite(v).all()):
            return False
    return True


def exact_norms(tensors: Sequence[Tensor], device: torch.device, ord: float = 2.0) -> Tensor:
    """Overflow-free L2 norms in float64: ``m * ||t / m||`` with ``m`` the max-abs of ``t``.

    A slow path (it copies each tensor to float64) for the rare step whose plain norm overflowed;
    the result is infinite only where the true norm exceeds float64's range or an element is
    non-finite.
    """
    out = []
    for t in tensors:
        v = (t.coalesce() if t.layout == torch.sparse_coo else t).values() if t.is_sparse else t
        if v.is_complex():
            v = torch.view_as_real(v)
        v = v.detach().to(torch.float64)
        m = v.abs().max() if v.numel() else torch.zeros((), dtype=torch.float64, device=v.device)
        if not bool(torch.isfinite(m)) or float(m) == 0.0:
            out.append(m.reshape(()))
            continue
        out.append(torch.linalg.vector_norm(v / m, ord) * m)
    if not out:
        return torch.zeros(0, device=device, dtype=torch.float64)
    return torch.stack([n.to(device) for n in out])


class NormSummary:
    """The norms of one step, kept by its report: small tensors only, never the gradients (a list
    of reports must not keep every step's gradients alive). Derived values are computed on read."""

    __slots__ = ("_layout", "_param_index", "_param_norms", "_scale", "norm", "raw_param_norms")

    def __init__(self, stats: GradStats):
        self.norm = stats.norm
        self.raw_param_norms = stats.raw_param_norms
        self._param_norms = stats._param_norms
        self._scale = stats._scale
        self._layout = stats.layout
        self._param_index = stats.param_index

    def norm_after(self) -> Tensor:
        if self._param_norms is self.raw_param_norms and self._scale is None:
            return self.norm
        pn = self._param_norms if self._scale is None else self._param_norms * self._scale
        return cast("Tensor", torch.linalg.vector_norm(pn))

    def raw_layer_norms(self) -> Tensor:
        ids = _layer_ids(self._layout, self._param_index, self.norm.device)
        return layer_norms_from(self.raw_param_norms, ids, len(self._layout.layer_names))


def _layer_ids(layout: ParamLayout, param_index: list[int], device: torch.device) -> Tensor:
    lo = layout.layer_of
    ids = lo if len(param_index) == len(lo) else [lo[i] for i in param_index]
    return layout.index_tensor(ids, device)


def layer_norms_from(param_norms: Tensor, layer_ids: Tensor, num_layers: int) -> Tensor:
    """Per-layer L2 norms from per-parameter norms, in the norms' dtype, never overflowing.

    float32 norms are squared in float64 (no float32 norm's square overflows it); float64 norms
    are scaled by their layer's largest norm first. A layer is non-finite exactly when one of its
    parameters' norms is.
    """
    if param_norms.dtype != torch.float64:
        sq = torch.zeros(num_layers, device=param_norms.device, dtype=torch.float64)
        sq.index_add_(0, layer_ids, param_norms.to(torch.float64).square())
        return sq.sqrt().to(param_norms.dtype)
    top = torch.zeros(num_layers, device=param_norms.device, dtype=torch.float64)
    top.index_reduce_(0, layer_ids, param_norms, "amax", include_self=False)
    scale = top.index_select(0, layer_ids)
    ok = torch.isfinite(scale) & (scale > 0)
    ratio = torch.where(ok, param_norms / torch.where(ok, scale, 1.0), 0.0)
    sq = torch.zeros_like(top).index_add_(0, layer_ids, ratio.square())
    return torch.where(torch.isfinite(top) & (top > 0), sq.sqrt() * top, top)


def scaled_l2(norms: Tensor, ord: float = 2.0) -> Tensor:
    """The ``ord``-norm of a 1-D tensor of norms, scaled by its largest entry (no overflow)."""
    if norms.numel() == 0:
        return torch.zeros((), device=norms.device, dtype=norms.dtype)
    top = norms.abs().amax()
    if not bool(torch.isfinite(top)) or float(top) == 0.0:
        return top
    return cast("Tensor", torch.linalg.vector_norm(norms / top, ord) * top)


class GradStats:
    """Gradient statistics of one optimizer step.

    Attributes (float32 tensors on the device of the first gradient; nothing here syncs):
        raw_param_norms: L2 norm of each gradient before any mitigation, in ``grads`` order.
        norm: global L2 norm before mitigation (as ``clip_grad_norm_`` returns it).
        param_norms: per-gradient norms after the mitigations applied so far (kept exact by the
            in-place ops; a global scale is folded in lazily, so unread it costs nothing).
        finite: 0-dim bool, False if any gradient holds a NaN or Inf (computed on first read).
        modified: whether any policy has changed the gradients yet.
    """

    def __init__(self, layout: ParamLayout, grads: list[Tensor], param_index: list[int]):
        self.layout = layout
        # Sharded (DTensor) gradients are measured and mitigated through their local shards.
        grads, self.sharding = Sharding.split(grads)
        self.grads = grads
        self.param_index = param_index  # grads[k] belongs to layout.params[param_index[k]]
        self.groups = [
            _Group(grads[idx[0]].device, [grads[k] for k in idx], idx)
            for idx in group_by_kind(grads).values()
        ]
        self.device = grads[0].device if grads else torch.device("cpu")
        #: The dtype every norm of this step is held in: float64 if any gradient is float64.
        self.dtype = (
            torch.float64
            if any(grp.grads[0].dtype in _wide() for grp in self.groups)
            else torch.float32
        )

        if len(self.groups) == 1:
            norms = _group_norms(self.groups[0].grads, 2.0)
        else:
            norms = [torch.empty((), device=self.device)] * len(grads)
            for grp in self.groups:
                for k, n in zip(grp.index, _group_norms(grp.grads, 2.0), strict=True):
                    norms[k] = n.to(self.device, self.dtype, non_blocking=True)
        self.raw_param_norms = (
            torch.stack(norms) if norms else torch.zeros(0, device=self.device, dtype=self.dtype)
        )
        if self.sharding is not None:
            self.raw_param_norms = self.sharding.all_reduce_sq(self.raw_param_norms.square()).sqrt()
        self.norm: Tensor = torch.linalg.vector_norm(self.raw_param_norms)
        self._param_norms = self.raw_param_norms
        self._scale: Tensor | float | None = (
            None  # a global factor not yet folded into _param_norms
        )
        self.modified = False
        #: Whether :meth:`rescue_` re-measured this step (its norms overflowed float32).
        self.rescued = False
        self._finite: Tensor | None = None
        self._layer_ids: Tensor | None = None
        self._weight_norms: Tensor | None = None
        self._norm_after: Tensor | None = None

    # ----- derived views ------------------------------------------------------------------------
    @property
    def finite(self) -> Tensor:
        # A global norm that overflows float32 (> 1.8e19) counts as non-finite as well.
        if self._finite is None:
            self._finite = torch.isfinite(self.norm)
        return self._finite

    def rescue_(self) -> bool:
        """Re-measure a step whose norm read non-finite; True if every gradient is finite after all.

        A float32 (or bf16/fp16) sum of squares overflows for norms above ~1.8e19 although every
        element is finite. The Guard calls this only when the norm it read is non-finite (a rare
        step, so the extra passes cost nothing on normal steps): one max-abs pass decides
        finiteness exactly, and if the gradients are finite their norms are re-measured in float64
        without overflow and replace this step's statistics (held in float64 from then on).
        """
        if not self.grads:
            return False
        finite = all_finite(self.grads)
        if self.sharding is not None:
            flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
            finite = not bool(self.sharding.all_reduce_max(flag).item())
        if not finite:
            return False
        pn = exact_norms(self.grads, self.device)
        if self.sharding is not None:
            top = self.sharding.all_reduce_max(pn.amax().reshape(1)).clamp(min=1e-300)
            pn = self.sharding.all_reduce_sq((pn / top).square()).sqrt() * top
        self.dtype = torch.float64
        self.rescued = True
        self.raw_param_norms = self._param_norms = pn
        self.norm = scaled_l2(pn)
        self._scale = None
        self._finite = None
        self._layer_ids = None
        self._norm_after = None
        return True

    @property
    def param_norms(self) -> Tensor:
        if self._scale is not None:
            self._param_norms = self._param_norms * self._scale
            self._scale = None
        return self._param_norms

    @property
    def num_layers(self) -> int:
        return len(self.layout.layer_names)

    @property
    def layer_ids(self) -> Tensor:
        """Layer index of each gradient (long tensor, on the stats device; cached)."""
        if self._layer_ids is None:
            self._layer_ids = _layer_ids(self.layout, self.param_index, self.device)
        return self._layer_ids

    def layer_norms(self, param_norms: Tensor | None = None) -> Tensor:
        """Per-layer L2 norms (a layer = the params one module owns); 0 for layers without grads."""
        pn = self.param_norms if param_norms is None else param_norms
        return layer_norms_from(pn, self.layer_ids, self.num_layers)

    @property
    def raw_layer_norms(self) -> Tensor:
        return self.layer_norms(self.raw_param_norms)

    @property
    def norm_after(self) -> Tensor:
        """Global L2 norm after the mitigations applied so far."""
        if not self.modified:
            return self.norm
        if self._norm_after is None:
            self._norm_after = torch.linalg.vector_norm(self.param_norms)
        return self._norm_after

    def summary(self) -> NormSummary:
        return NormSummary(self)

    @property
    def weight_norms(self) -> Tensor:
        """L2 norm of each parameter (the weights, not the gradients), computed once on demand."""
        if self._weight_norms is None:
            params, sharding = Sharding.split(
                [self.layout.params[i].detach() for i in self.param_index]
            )
            self._weight_norms = stacked_norms(params, self.device, self.dtype)
            if sharding is not None:
                self._weight_norms = sharding.all_reduce_sq(self._weight_norms.square()).sqrt()
        return self._weight_norms

    # ----- in-place mitigations -----------------------------------------------------------------
    def scale_(self, factor: Tensor | float) -> None:
        """Multiply every gradient by one factor: a 0-dim tensor (no host sync) or a float."""
        for grp in self.groups:
            f = (
                factor.to(grp.device, non_blocking=True)
                if isinstance(factor, torch.Tensor)
                else factor
            )
            torch._foreach_mul_(grp.grads, f)
        self._scale = factor if self._scale is None else self._scale * factor
        self.modified = True
        self._norm_after = None

    def scale_params_(self, factors: Tensor) -> None:
        """Multiply gradient ``k`` by ``factors[k]`` (one factor per gradient)."""
        for grp in self.groups:
            fs = factors.to(grp.device, non_blocking=True)
            if len(self.groups) > 1:
                fs = fs.index_select(0, self.layout.index_tensor(grp.index, grp.device))
            g0 = grp.grads[0]
            fdt = g0.real.dtype if g0.is_complex() else g0.dtype
            torch._foreach_mul_(grp.grads, list(fs.to(fdt).unbind()))
        self.set_param_norms(self.param_norms * factors.to(self.dtype))

    def clamp_(self, limit: float) -> None:
        """Clamp every gradient element to [-limit, limit]; the norms are re-measured (an elementwise
        clamp changes them in a way no summary statistic predicts). Sparse gradients (coalesced by
        :func:`collect_grads`) are clamped through their values."""
        for grp in self.groups:
            if grp.grads[0].is_sparse:
                for g in grp.grads:
                    g._values().clamp_(-limit, limit)
                continue
            torch._foreach_clamp_min_(grp.grads, -limit)
            torch._foreach_clamp_max_(grp.grads, limit)
        if self.grads:
            self.set_param_norms(stacked_norms(self.grads, self.device, self.dtype))

    def replace_entries_(self, entries: Mapping[int, tuple[Tensor, Tensor]]) -> None:
        """Where ``mask`` holds, set gradient ``k``'s entries to ``value`` (both shaped like it),
        for each ``k -> (mask, value)`` (``k`` a position in ``grads``; dense gradients); the
        norms are re-measured (``spam_clip``'s element clip)."""
        if not entries:
            return
        for k, (mask, value) in entries.items():
            g = self.grads[k]
            g.copy_(torch.where(mask, value, g))
        self.set_param_norms(stacked_norms(self.grads, self.device, self.dtype))

    def scale_units_(self, factors: dict[int, Tensor], unit_norms: dict[int, Tensor]) -> None:
        """Multiply each row (output unit) of gradient ``k`` by ``factors[k]``, one factor per
        row (one for a tensor of ndim <= 1), ``k`` a position in ``grads``; ``unit_norms[k]``:
        that gradient's row norms before (:func:`unit_norms`), from which its new norm is exact.
        Sparse gradients are scaled through the rows they hold."""
        ks = list(factors)
        sq = self.param_norms.square()
        for k in ks:
            scale_units_(self.grads[k], factors[k])
        new_sq = torch.stack([(unit_norms[k] * factors[k]).square().sum() for k in ks])
        idx = self.layout.index_tensor(ks, self.device)
        self.set_param_norms(sq.index_put((idx,), new_sq.to(self.device, sq.dtype)).sqrt())

    def set_param_norms(self, norms: Tensor) -> None:
        """For policies that changed gradients themselves and know the resulting norms exactly."""
        self._param_norms = norms
        self._scale = None
        self.modified = True
        self._norm_after = None


def unit_norms(t: Tensor) -> Tensor:
    """Norm per output unit (row): reduce over every dim but 0; tensors of ndim <= 1 as a whole.

    Held in :func:`~gradguard.stats.norm_dtype` (float64 for float64 tensors). A sparse COO
    tensor (coalesced) is reduced over the entries of each row it holds; rows it does not hold
    have norm 0.
    """
    dt = norm_dtype(t.dtype)
    if t.is_sparse:
        vals = t._values()
        sq = vals.abs().to(dt).square().reshape(vals.shape[0], -1).sum(1)
        rows = torch.zeros(t.shape[0], dtype=dt, device=t.device)
        return rows.index_add_(0, t._indices()[0], sq).sqrt()
    if t.ndim <= 1:
        return cast(
            "Tensor",
            torch.linalg.vector_norm(t, dtype=None if t.is_complex() else dt).reshape(1).to(dt),
        )
    return cast(
        "Tensor",
        torch.linalg.vector_norm(
            t, dim=tuple(range(1, t.ndim)), dtype=None if t.is_complex() else dt
        ).to(dt),
    )


def scale_units_(g: Tensor, factor: Tensor) -> None:
    """``g[row] *= factor[row]`` in place (one factor for a tensor of ndim <= 1)."""
    fdt = g.real.dtype if g.is_complex() else g.dtype
    if g.is_sparse:
        vals = g._values()
        f = factor.to(fdt).index_select(0, g._indices()[0])
        vals.mul_(f.reshape((-1,) + (1,) * (vals.ndim - 1)))
    elif g.ndim > 1:
        g.mul_(factor.to(fdt).reshape((-1,) + (1,) * (g.ndim - 1)))
    else:
        g.mul_(factor[0].to(fdt))


def collect_grads(layout: ParamLayout) -> tuple[list[Tensor], list[int]]:
    """The parameters' gradients in layout order (and their layout positions), sparse COO
    gradients coalesced in place."""
    grads: list[Tensor] = []
    index: list[int] = []
    for i, p in enumerate(layout.params):
        g = p.grad
        if g is not None:
            if g.layout == torch.sparse_coo and not g.is_coalesced():
                # Coalesced once here, so norms, clamps and row scalings see each index once.
                g = p.grad = g.coalesce()
            grads.append(g)
            index.append(i)
    return grads, index


def compute_grad_stats(layout: ParamLayout) -> GradStats:
    """Measure the current gradients of the layout's parameters (one fused pass)."""
    grads, index = collect_grads(layout)
    return GradStats(layout, grads, index)
