"""One fused pass over the gradients per step: global, per-parameter and per-layer norms, and the
non-finite flag derived from them.

Norms are computed with ``torch._foreach_norm`` on gradients grouped by (device, dtype), as
``torch.nn.utils.clip_grad_norm_`` does, accumulated in float32 so fp16/bf16 gradients neither
overflow nor lose the norm. Finiteness is read off the global norm (a NaN or Inf anywhere makes it
non-finite) instead of a separate ``isfinite`` scan over every element, which costs ~20x a norm.

The in-place operations on the gradients (`scale_`, `scale_params_`, `clamp_`) live here too, so
that after a policy acts the running per-parameter norms stay exact without another pass.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .errors import ConfigError
from .layout import ParamLayout


@functools.cache
def _dtensor_type() -> type | None:
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

    def __init__(self, mesh, weights: list[float]):
        self.mesh = mesh
        self.weights = weights
        self._weights_t: dict[torch.device, Tensor] = {}

    @staticmethod
    def split(tensors: list[Tensor]) -> tuple[list[Tensor], Sharding | None]:
        """(local tensors, sharding) of a list that may hold DTensors; (same list, None) if none."""
        dt = _dtensor_type()
        if dt is None or not any(isinstance(t, dt) for t in tensors):
            return tensors, None
        mesh = None
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


def foreach_norms(tensors: list[Tensor], ord: float = 2.0) -> list[Tensor]:
    """Per-tensor norms in float32, one kernel per (device, dtype) group where foreach is supported."""
    if not tensors:
        return []
    if _foreach_ok(tensors[0].device) and all(not t.is_sparse for t in tensors):
        return list(torch._foreach_norm(tensors, ord, dtype=torch.float32))
    return [torch.linalg.vector_norm(t, ord, dtype=torch.float32) for t in tensors]


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
        return torch.linalg.vector_norm(pn)

    def raw_layer_norms(self) -> Tensor:
        ids = _layer_ids(self._layout, self._param_index, self.norm.device)
        return _layer_norms(self.raw_param_norms, ids, len(self._layout.layer_names))


def _layer_ids(layout: ParamLayout, param_index: list[int], device: torch.device) -> Tensor:
    lo = layout.layer_of
    ids = lo if len(param_index) == len(lo) else [lo[i] for i in param_index]
    return layout.index_tensor(ids, device)


def _layer_norms(param_norms: Tensor, layer_ids: Tensor, num_layers: int) -> Tensor:
    sq = torch.zeros(num_layers, device=param_norms.device, dtype=torch.float32)
    sq.index_add_(0, layer_ids, param_norms.square())
    return sq.sqrt()


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
        groups: dict[tuple[torch.device, torch.dtype], _Group] = {}
        for k, g in enumerate(grads):
            key = (g.device, g.dtype)
            grp = groups.get(key)
            if grp is None:
                groups[key] = grp = _Group(g.device, [], [])
            grp.grads.append(g)
            grp.index.append(k)
        self.groups = list(groups.values())
        self.device = grads[0].device if grads else torch.device("cpu")

        if len(self.groups) == 1:
            norms = foreach_norms(self.groups[0].grads)
        else:
            norms = [torch.empty((), device=self.device)] * len(grads)
            for grp in self.groups:
                for k, n in zip(grp.index, foreach_norms(grp.grads), strict=True):
                    norms[k] = n.to(self.device, non_blocking=True)
        self.raw_param_norms = torch.stack(norms) if norms else torch.zeros(0, device=self.device)
        if self.sharding is not None:
            self.raw_param_norms = self.sharding.all_reduce_sq(self.raw_param_norms.square()).sqrt()
        self.norm = torch.linalg.vector_norm(self.raw_param_norms)
        self._param_norms = self.raw_param_norms
        self._scale: Tensor | float | None = (
            None  # a global factor not yet folded into _param_norms
        )
        self.modified = False
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
        return _layer_norms(pn, self.layer_ids, self.num_layers)

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
            out = [torch.empty((), device=self.device)] * len(params)
            for grp in self.groups:
                ws = [params[k] for k in grp.index]
                for k, n in zip(grp.index, foreach_norms(ws), strict=True):
                    out[k] = n.to(self.device, non_blocking=True)
            self._weight_norms = torch.stack(out) if out else torch.zeros(0, device=self.device)
            if sharding is not None:
                self._weight_norms = sharding.all_reduce_sq(self._weight_norms.square()).sqrt()
        return self._weight_norms

    # ----- in-place mitigations -----------------------------------------------------------------
    def scale_(self, factor: Tensor | float) -> None:
        """Multiply every gradient by one factor: a 0-dim tensor (no host sync) or a float."""
        for grp in self.groups:
            f = factor.to(grp.device, non_blocking=True) if isinstance(factor, Tensor) else factor
            torch._foreach_mul_(grp.grads, f)
        self._scale = factor if self._scale is None else self._scale * factor
        self.modified = True
        self._norm_after = None

    def scale_params_(self, factors: Tensor) -> None:
        """Multiply gradient ``k`` by ``factors[k]`` (one factor per gradient, float32 tensor)."""
        for grp in self.groups:
            fs = factors.to(grp.device, non_blocking=True)
            if len(self.groups) > 1:
                fs = fs.index_select(0, self.layout.index_tensor(grp.index, grp.device))
            torch._foreach_mul_(grp.grads, list(fs.to(grp.grads[0].dtype).unbind()))
        self.set_param_norms(self.param_norms * factors)

    def clamp_(self, limit: float) -> None:
        """Clamp every gradient element to [-limit, limit]; the norms are re-measured (an elementwise
        clamp changes them in a way no summary statistic predicts)."""
        for grp in self.groups:
            torch._foreach_clamp_min_(grp.grads, -limit)
            torch._foreach_clamp_max_(grp.grads, limit)
        norms = [torch.empty((), device=self.device)] * len(self.grads)
        for grp in self.groups:
            for k, n in zip(grp.index, foreach_norms(grp.grads), strict=True):
                norms[k] = n.to(self.device, non_blocking=True)
        if norms:
            self.set_param_norms(torch.stack(norms))

    def set_param_norms(self, norms: Tensor) -> None:
        """For policies that changed gradients themselves and know the resulting norms exactly."""
        self._param_norms = norms
        self._scale = None
        self.modified = True
        self._norm_after = None


def collect_grads(layout: ParamLayout) -> tuple[list[Tensor], list[int]]:
    grads: list[Tensor] = []
    index: list[int] = []
    for i, p in enumerate(layout.params):
        g = p.grad
        if g is not None:
            grads.append(g)
            index.append(i)
    return grads, index


def compute_grad_stats(layout: ParamLayout) -> GradStats:
    """Measure the current gradients of the layout's parameters (one fused pass)."""
    grads, index = collect_grads(layout)
    return GradStats(layout, grads, index)
