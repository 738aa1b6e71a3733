"""The Guard's policies in ``keras.ops``: the same algorithms, spec names, parameters and defaults
as :mod:`gradguard.policies`, for Keras 3 on any backend (TensorFlow, JAX, torch).

Each class here names its torch twin in ``reference``: constructing one constructs the twin, so the
spec grammar, the defaults and every parameter check are the torch registry's own (one source of
truth), and ``spec()`` prints the same string. What differs is only how the step is computed: every
decision is a tensor (``ops.where``), never a Python ``if`` on a value, so a policy runs inside a
``tf.function``, under XLA and under ``jax.jit``; and state lives in ``keras.Variable``s the
:class:`~gradguard.keras.GuardedOptimizer` owns, so it is saved with the optimizer.

The arithmetic is not written here: each policy's rule is written once in its torch module against
an array namespace (:mod:`gradguard.policies.xp`) and called here with ``keras.ops``
(:data:`gradguard.keras.xp.KERAS`). A :class:`~gradguard.policies.rule.RulePolicy` (zclip,
adaptive_clip, clip_layerwise, skip_spike, lr_backoff) needs nothing in this module:
:class:`RuleAdapter` builds its variables from its fields and applies its decision. The classes still written here keep only the state layout Keras
needs where the torch one differs (AutoClip's growing history and host-side reservoir draw) and the gradient plumbing (AGC's unit axes,
clip_value, clip_norm's p-norms).

Some policies are not portable (or not ported) and are refused with a
:class:`~gradguard.errors.ConfigError` that says why: the reason each gives itself
(``Policy.keras_refusal``), collected in ``REFUSED``; a policy that is not a rule and has no
class here is refused with a generic reason, so adding a policy touches nothing in this package.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import keras
from keras import ops

from ..errors import ConfigError, SpecError
from ..policies import Policy, parse_spec, policy_class
from ..policies import agc as _agc
from ..policies import autoclip as _autoclip
from ..policies import available_policies as _torch_policies
from ..policies import clip_norm as _clip_norm
from ..policies import clip_value as _clip_value
from ..policies import skip_nonfinite as _skip_nonfinite
from ..policies.agc import unit_factors
from ..policies.autoclip import autoclip_factor, percentile_sorted, sorted_insert, sorted_remove
from ..policies.clip import NORM_EPS
from ..policies.registry import NAMED_CHAINS
from ..policies.rule import RulePolicy
from ..specgrammar import split_chain, split_term
from .xp import KERAS

if TYPE_CHECKING:
    from .optimizer import GuardedOptimizer

#: Skip reasons, stored as an int code in a variable (index into this tuple; 0 = not skipped).
SKIP_REASONS = (None, "nonfinite_grad", "spike_grad_norm")


# ----- where the variables live ---------------------------------------------------------------
@dataclass(frozen=True)
class VarLayout:
    """The guarded variables in the optimizer's order, with paths and layers.

    A variable's layer is its path without the last component (``"dense_1/kernel"`` -> layer
    ``"dense_1"``); a model-name prefix shared by every layer (``"sequential/dense_1"``) is dropped.
    """

    paths: tuple[str, ...]
    layer_names: tuple[str, ...]
    layer_of: tuple[int, ...]
    sizes: tuple[int, ...]

    @classmethod
    def build(cls, variables: Sequence[Any]) -> VarLayout:
        paths = tuple(
            str(getattr(v, "path", None) or getattr(v, "name", f"var.{i}"))
            for i, v in enumerate(variables)
        )
        owners = [p.rpartition("/")[0] or p for p in paths]
        heads = {o.partition("/")[0] for o in owners}
        if len(heads) == 1 and all("/" in o for o in owners):
            owners = [o.partition("/")[2] for o in owners]
        layer_names: list[str] = []
        index: dict[str, int] = {}
        layer_of = []
        for o in owners:
            if o not in index:
                index[o] = len(layer_names)
                layer_names.append(o)
            layer_of.append(index[o])
        sizes = tuple(int(math.prod(tuple(v.shape))) for v in variables)
        return cls(paths, tuple(layer_names), tuple(layer_of), sizes)

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, patterns: Iterable[str]) -> list[int]:
        """Indices of the variables whose path or layer name matches any glob pattern."""
        import fnmatch

        pats = list(patterns)
        return [
            i
            for i, (p, li) in enumerate(zip(self.paths, self.layer_of, strict=True))
            if any(
                fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(self.layer_names[li], pat)
                for pat in pats
            )
        ]

    def head_layer(self) -> int | None:
        """The output layer: the layer of the last variable (a Sequential or functional model
        lists its variables in layer order; a subclassed model in the order it created them, so
        there pass ``agc:exclude=...`` instead)."""
        return self.layer_of[-1] if self.layer_of else None


# ----- one step ---------------------------------------------------------------------------------
def _f32(x: Any) -> Any:
    return ops.cast(x, "float32")


def _norm(g: Any) -> Any:
    """L2 norm in float32 whatever the gradient dtype (as torch's ``_foreach_norm(dtype=float32)``)."""
    return ops.sqrt(ops.sum(ops.square(_f32(g))))


class KerasStep:
    """One step's gradients, statistics and decisions: the Keras twin of ``StepContext`` +
    ``GradStats``. Every flag and number is a tensor; nothing here reads a value to the host.

    ``grads`` are the non-empty gradients, ``index[k]`` the layout position of ``grads[k]``.
    ``gate`` (set by the optimizer around each clipping policy) is False once the step is
    cancelled: a gated policy neither changes the gradients nor learns from the step, as in the
    torch Guard, where clipping policies do not run on a skipped step.
    """

    def __init__(
        self, grads: list[Any], index: list[int], variables: list[Any], layout: VarLayout, step: Any
    ):
        self.grads = list(grads)
        self.index = list(index)
        self.positions = list(range(len(grads)))  # where each gradient sits in the caller's list
        self.variables = list(variables)
        self.layout = layout
        self.step = step
        self.raw_norms = ops.stack([_norm(g) for g in grads]) if grads else ops.zeros((0,))
        self.norms = self.raw_norms
        self.norm = ops.sqrt(ops.sum(ops.square(self.raw_norms)))
        self.skip = ops.convert_to_tensor(False)
        #: A finite spike a policy mitigated: an incident for lr_backoff (StepContext.anomaly).
        self.anomaly = ops.convert_to_tensor(False)
        self.skip_code = ops.convert_to_tensor(0, "int32")
        self.lr_scale = ops.convert_to_tensor(1.0, "float32")
        self.acted: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.gate: Any = None
        self.modified = False

    # ----- statistics -------------------------------------------------------------------------------
    @property
    def norm_after(self) -> Any:
        """Global L2 norm after the mitigations applied so far."""
        if not self.modified:
            return self.norm
        return ops.sqrt(ops.sum(ops.square(self.norms)))

    @property
    def layer_ids(self) -> list[int]:
        return [self.layout.layer_of[i] for i in self.index]

    def layer_norms(self, norms: Any = None) -> Any:
        """Per-layer L2 norms over the layout's layers (0 for a layer without gradients). Summed
        per layer in Python, not by a one-hot matmul, where an Inf times 0 would be NaN."""
        norms = self.norms if norms is None else norms
        sq = ops.square(norms)
        ids = self.layer_ids
        out = []
        for li in range(len(self.layout.layer_names)):
            members = [k for k, lid in enumerate(ids) if lid == li]
            out.append(ops.sum(ops.stack([sq[k] for k in members])) if members else ops.zeros(()))
        return ops.sqrt(ops.stack(out))

    # ----- changing the gradients -----------------------------------------------------------------
    def _gated(self, value: Any, otherwise: Any) -> Any:
        return value if self.gate is None else ops.where(self.gate, value, otherwise)

    def scale(self, coef: Any) -> None:
        """Multiply every gradient by one float32 scalar."""
        coef = self._gated(_f32(coef), 1.0)
        self.grads = [g * ops.cast(coef, g.dtype) for g in self.grads]
        self.norms = self.norms * coef
        self.modified = True

    def scale_each(self, coefs: Any) -> None:
        """Multiply gradient ``k`` by ``coefs[k]`` (a float32 vector)."""
        coefs = self._gated(_f32(coefs), ops.ones_like(coefs))
        self.grads = [g * ops.cast(coefs[k], g.dtype) for k, g in enumerate(self.grads)]
        self.norms = self.norms * coefs
        self.modified = True

    def replace(self, grads: list[Any], norms: Any) -> None:
        """Policies that changed the gradients themselves (and know the resulting norms)."""
        if self.gate is not None:
            grads = [ops.where(self.gate, n, o) for n, o in zip(grads, self.grads, strict=True)]
            norms = ops.where(self.gate, norms, self.norms)
        self.grads = list(grads)
        self.norms = norms
        self.modified = True

    # ----- decisions and state -----------------------------------------------------------------
    def record(self, policy: str, acted: Any) -> None:
        acted = ops.convert_to_tensor(acted)
        if self.gate is not None:
            acted = ops.logical_and(acted, self.gate)
        prev = self.acted.get(policy)
        self.acted[policy] = acted if prev is None else ops.logical_or(prev, acted)

    def metric(self, name: str, value: Any) -> None:
        """A named number for telemetry; NaN on a step the policy sat out (gated)."""
        self.metrics[name] = self._gated(_f32(value), math.nan)

    def request_skip(self, cond: Any, reason: str) -> None:
        """Cancel the step where ``cond`` holds; the first reason given is kept."""
        cond = ops.convert_to_tensor(cond)
        code = ops.convert_to_tensor(SKIP_REASONS.index(reason), "int32")
        self.skip_code = ops.where(self.skip, self.skip_code, ops.where(cond, code, 0))
        self.skip = ops.logical_or(self.skip, cond)

    def assign(self, variable: Any, value: Any) -> None:
        """Update a state variable, unless this policy is gated off for the step."""
        value = ops.cast(value, variable.dtype)
        variable.assign(self._gated(value, variable))


# ----- the policies ---------------------------------------------------------------------------------
class KerasPolicy:
    """Base class: a policy whose parameters, defaults and checks are its torch twin's.

    Subclasses set ``reference`` (the torch class), may declare ``metrics`` (names of the numbers
    they report), create their state in ``build`` with ``optimizer.add_variable`` and implement
    ``apply``.
    """

    reference: ClassVar[type[Policy]]
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "clip"
    metrics: ClassVar[tuple[str, ...]] = ()
    twin: Policy  # the torch policy of the same name (a subclass names its class)

    if TYPE_CHECKING:
        # __init__ sets the twin's parameters as attributes (``self.max_norm``, ``self.window``).
        def __getattr__(self, name: str) -> Any: ...

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "reference" not in vars(cls):  # an abstract base (RuleAdapter)
            return
        cls.name = cls.reference.name
        cls.kind = cls.reference.kind
        # The constructor's signature is the twin's, for help() and introspection.
        import inspect

        sig = inspect.signature(cls.reference.__init__)
        cls.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # type: ignore[attr-defined]

    def __init__(self, *args: Any, **params: Any):
        try:
            self.twin = self.reference(*args, **params)  # validates, fills in the defaults
        except SpecError as e:
            raise ConfigError(f"{self.name}: {e}") from None
        for k, v in self.twin.params().items():
            setattr(self, k, v)

    def params(self) -> dict[str, Any]:
        return self.twin.params()

    def spec(self) -> str:
        """The spec string that rebuilds this policy (the torch twin's)."""
        return self.twin.spec()

    def build(self, optimizer: GuardedOptimizer, layout: VarLayout) -> None:
        """Create the state variables (called once, from the optimizer's ``build``)."""

    def apply(self, ctx: KerasStep) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"keras.{type(self).__name__}({args})"


def _var(
    opt: GuardedOptimizer,
    name: str,
    shape: tuple[int, ...] = (),
    dtype: str = "float32",
    value: float | int = 0,
) -> Any:
    init = "zeros" if value == 0 else keras.initializers.Constant(value)
    return opt.add_variable(shape=shape, initializer=init, dtype=dtype, name=name)


# ----- policies written once: the generic adapter ---------------------------------------------------
_VAR_DTYPES = {"float": "float32", "int": "int32", "bool": "int32"}


class KerasInputs:
    """A :class:`KerasStep` seen as a rule's inputs (:class:`~gradguard.policies.rule.RuleInputs`)."""

    def __init__(self, ctx: KerasStep):
        self.ctx = ctx

    @cached_property
    def norm(self) -> Any:
        return self.ctx.norm_after

    @property
    def raw_norm(self) -> Any:
        return self.ctx.norm

    @property
    def step(self) -> Any:
        return ops.cast(self.ctx.step, "int32")

    @property
    def incident(self) -> Any:
        return self.ctx.skip  # Keras has no rollback and no update bound: a skip is the one

    @property
    def anomaly(self) -> Any:
        return self.ctx.anomaly

    #: A Keras optimizer never sees the loss (:attr:`RulePolicy.given_loss`).
    loss = None

    @cached_property
    def layer_norms(self) -> Any:
        return self.ctx.layer_norms()

    @cached_property
    def layer_present(self) -> Any:
        ids = set(self.ctx.layer_ids)
        return ops.convert_to_tensor([li in ids for li in range(len(self.ctx.layout.layer_names))])


class RuleAdapter(KerasPolicy):
    """Any :class:`~gradguard.policies.rule.RulePolicy` in Keras, with no code of its own: one
    variable per state field (``<policy>_<field>``, also this object's attribute ``<field>``), and
    each step the torch twin's ``decide`` on ``keras.ops``, whose decision is applied here. Made
    for every registered rule policy that has no hand-written Keras class (``KERAS_POLICIES``)."""

    reference: ClassVar[type[RulePolicy]]
    twin: RulePolicy

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "reference" in vars(cls):
            cls.metrics = tuple(cls.reference.metrics)

    def __init__(self, *args: Any, **params: Any):
        super().__init__(*args, **params)
        why = self.twin.without_loss()
        if why is not None:
            raise ConfigError(
                f"{self.name}: not available in Keras as configured, since a Keras optimizer "
                f"never sees the loss: {why}"
            )
        self.twin.given_loss = False  # no state kept for a loss that never comes

    def build(self, optimizer: GuardedOptimizer, layout: VarLayout) -> None:
        self._fields = self.twin.fields(len(layout.layer_names))
        self.state_vars = {
            k: _var(optimizer, f"{self.name}_{k}", f.shape, _VAR_DTYPES[f.kind], f.init)
            for k, f in self._fields.items()
        }
        for k, v in self.state_vars.items():
            if k not in vars(self):  # a parameter keeps its name
                setattr(self, k, v)

    def apply(self, ctx: KerasStep) -> None:
        if not ctx.grads:
            return
        state = {}
        for k, f in self._fields.items():
            v = ops.convert_to_tensor(self.state_vars[k])
            state[k] = v > 0 if f.kind == "bool" else v
        new, decision = self.twin.decide(KERAS, state, KerasInputs(ctx))
        for k, v in self.state_vars.items():
            ctx.assign(v, new[k])
        if decision.skip is not False:
            ctx.request_skip(decision.skip, decision.skip_reason or self.name)
        if decision.scale is not None:
            ctx.scale(decision.scale)
        if decision.layer_scale is not None:
            coef = decision.layer_scale
            ctx.scale_each(ops.stack([coef[li] for li in ctx.layer_ids]))
        if decision.lr_scale is not None:
            ctx.lr_scale = ctx.lr_scale * ops.cast(decision.lr_scale, "float32")
        ctx.record(self.name, decision.acted)
        if decision.anomaly is not False:
            ctx.anomaly = ops.logical_or(ctx.anomaly, ctx._gated(decision.anomaly, False))
        for m in self.metrics:
            ctx.metric(m, decision.metrics[m])


def _adapters(written: Iterable[str]) -> list[type[KerasPolicy]]:
    """A :class:`RuleAdapter` for each registered rule policy without a class in ``written``."""
    out: list[type[KerasPolicy]] = []
    for name in _torch_policies():
        cls = policy_class(name)
        if issubclass(cls, RulePolicy) and name not in written and name not in REFUSED:
            doc = (cls.__doc__ or "").strip().split("\n\n")[0]
            ns = {
                "reference": cls,
                "__doc__": f"{doc} (see the torch twin)",
                "__module__": __name__,
            }
            out.append(type(name, (RuleAdapter,), ns))
    return out


class clip_norm(KerasPolicy):
    """Clip by global norm: ``g <- g * min(1, max_norm / (||g|| + 1e-6))`` (see the torch twin)."""

    reference = _clip_norm

    def apply(self, ctx: KerasStep) -> None:
        if not ctx.grads:
            return
        if self.norm_type == 2.0:
            total = ctx.norm_after
        elif self.norm_type == math.inf:
            total = ops.max(ops.stack([ops.max(ops.abs(_f32(g))) for g in ctx.grads]))
        else:
            p = self.norm_type
            per = ops.stack(
                [ops.power(ops.sum(ops.power(ops.abs(_f32(g)), p)), 1.0 / p) for g in ctx.grads]
            )
            total = ops.power(ops.sum(ops.power(per, p)), 1.0 / p)
        coef = ops.minimum(self.max_norm / (total + NORM_EPS), 1.0)
        ctx.scale(coef)
        ctx.record(self.name, coef < 1.0)


class clip_value(KerasPolicy):
    """Clip every gradient element to ``[-limit, limit]``; the norms are re-measured."""

    reference = _clip_value

    def apply(self, ctx: KerasStep) -> None:
        if not ctx.grads:
            return
        before = ctx.norms
        grads = [ops.clip(g, -self.limit, self.limit) for g in ctx.grads]
        after = ops.stack([_norm(g) for g in grads])
        ctx.replace(grads, after)
        ctx.record(self.name, ops.any(after < before))


def unit_norms(t: Any) -> Any:
    """Norm per output unit: Keras keeps the output axis LAST (a Dense kernel is ``(in, out)``, a
    Conv2D kernel ``(h, w, in, out)``), so reduce over every axis but the last; tensors of
    ``ndim <= 1`` as a whole. (torch keeps it first; the units are the same.)"""
    t = _f32(t)
    if len(t.shape) <= 1:
        return ops.reshape(ops.sqrt(ops.sum(ops.square(t))), (1,))
    return ops.sqrt(ops.sum(ops.square(t), axis=tuple(range(len(t.shape) - 1))))


class agc(KerasPolicy):
    """Unit-wise adaptive gradient clipping (Brock et al. 2021): where ``||g||_unit >
    clipping * max(||W||_unit, eps)``, scale the unit down to it. The output layer (the layer of
    the last variable) is left alone unless ``exclude_head=false``; ``exclude`` adds globs over
    variable paths and layer names."""

    reference = _agc
    twin: _agc

    def build(self, optimizer: GuardedOptimizer, layout: VarLayout) -> None:
        excluded = set(layout.select(self.exclude)) if self.exclude else set()
        head = layout.head_layer() if self.exclude_head else None
        if head is not None:
            excluded |= {i for i, li in enumerate(layout.layer_of) if li == head}
        self.excluded = excluded

    def apply(self, ctx: KerasStep) -> None:
        if not ctx.grads:
            return
        grads, sq, acted = list(ctx.grads), [], []
        for k, (g, i, w) in enumerate(zip(ctx.grads, ctx.index, ctx.variables, strict=True)):
            if i in self.excluded:
                sq.append(ops.square(ctx.norms[k]))
                continue
            g_norm = unit_norms(g)
            factor, clip = unit_factors(KERAS, self.twin, unit_norms(w), g_norm)
            grads[k] = g * ops.cast(factor if len(g.shape) > 1 else factor[0], g.dtype)
            sq.append(ops.sum(ops.square(g_norm * factor)))
            acted.append(ops.any(clip))
        if not acted:
            return
        ctx.replace(grads, ops.sqrt(ops.stack(sq)))
        ctx.record(self.name, ops.any(ops.stack(acted)))


def reservoir_slot(count: Any, capacity: int) -> tuple[Any, Any]:
    """(slot, drawn) for the ``count``-th norm (0-based) of a reservoir sample (Algorithm R).

    The draw is an integer hash of ``count`` (multiply-xorshift, all in int64 without overflow:
    every product stays below 2**63), so a resumed run draws what the uninterrupted one would.
    It is not the torch policy's splitmix64 (Keras has no unsigned 64-bit arithmetic on every
    backend), so past ``max_history`` norms the two keep different, equally uniform, samples.
    """
    c = ops.cast(count, "int64")
    h = ops.mod(c * 2654435761, 2**32)
    h = ops.bitwise_xor(h, ops.right_shift(h, 16))
    h = ops.mod(h * 0x45D9F3B, 2**32)
    h = ops.bitwise_xor(h, ops.right_shift(h, 16))
    j = ops.mod(h, c + 1)
    slot = ops.where(c < capacity, c, j)
    return ops.cast(slot, "int32"), slot < capacity


class autoclip(KerasPolicy):
    """Clip to the ``percentile``-th percentile of the history of global norms, the current one
    included (Seetharaman et al. 2020). ``history=N``: the last N steps; ``history=None``: every
    norm up to ``max_history``, then a reservoir sample. The history is one sorted, +inf-padded
    float32 variable of ``capacity + 1`` slots plus a ring of the same norms by slot."""

    reference = _autoclip
    metrics = ("autoclip.threshold",)

    @property
    def capacity(self) -> int:
        return self.history if self.history is not None else self.max_history

    def build(self, optimizer: GuardedOptimizer, layout: VarLayout) -> None:
        cap = self.capacity
        self.sorted = _var(optimizer, "autoclip_sorted", (cap + 1,), value=math.inf)
        self.ring = _var(optimizer, "autoclip_ring", (cap,), value=math.inf)
        self.n_valid = _var(optimizer, "autoclip_n_valid", dtype="int32")
        self.count = _var(optimizer, "autoclip_count", dtype="int32")

    def apply(self, ctx: KerasStep) -> None:
        if not ctx.grads:
            return
        x = ctx.norm_after
        cap = self.capacity
        count = ops.convert_to_tensor(self.count)
        if self.history is not None:
            slot, drawn = ops.mod(count, cap), ops.convert_to_tensor(True)
        else:
            slot, drawn = reservoir_slot(count, cap)
        evict = count >= cap  # the slot holds an older norm (the ring is full)
        finite = ops.isfinite(x)
        xin = ops.where(finite, x, math.inf)
        ring = ops.convert_to_tensor(self.ring)
        buf = ops.convert_to_tensor(self.sorted)
        n_valid = ops.convert_to_tensor(self.n_valid)
        at_slot = ops.arange(cap, dtype="int32") == slot
        old = ops.sum(
            ops.where(at_slot, ring, 0.0)
        )  # ring[slot], gathered without indexing by a tensor
        old = ops.where(ops.isfinite(old), old, math.inf)
        removed = ops.where(evict, sorted_remove(KERAS, buf, old), buf)
        n_left = n_valid - ops.cast(ops.logical_and(evict, ops.isfinite(old)), "int32")
        new_buf = ops.where(drawn, sorted_insert(KERAS, removed, xin), buf)
        new_ring = ops.where(ops.logical_and(drawn, at_slot), xin, ring)
        new_n = ops.where(drawn, n_left + ops.cast(finite, "int32"), n_valid)
        ctx.assign(self.sorted, new_buf)
        ctx.assign(self.ring, new_ring)
        ctx.assign(self.n_valid, new_n)
        ctx.assign(self.count, count + 1)
        thr = percentile_sorted(KERAS, new_buf, new_n, self.percentile)
        coef = autoclip_factor(KERAS, x, thr)
        ctx.scale(coef)
        ctx.record(self.name, coef < 1.0)
        ctx.metric("autoclip.threshold", thr)


class skip_nonfinite(KerasPolicy):
    """Skip the step when any gradient holds a NaN or Inf (the global norm is then non-finite).
    The weights, the inner optimizer's slots and its iteration count stay untouched."""

    reference = _skip_nonfinite

    def apply(self, ctx: KerasStep) -> None:
        bad = ops.logical_not(ops.isfinite(ctx.norm))
        ctx.request_skip(bad, "nonfinite_grad")
        ctx.record(self.name, bad)


_WRITTEN: tuple[type[KerasPolicy], ...] = (
    agc,
    autoclip,
    clip_norm,
    clip_value,
    skip_nonfinite,
)
_WRITTEN_NAMES = frozenset(c.name for c in _WRITTEN)


def _refusals() -> dict[str, str]:
    """Each torch policy with no Keras twin, and why: the reason it gives itself
    (``Policy.keras_refusal``), or, for a policy that is not a rule (written once against the
    array namespace) and has no class here, that it is not."""
    out: dict[str, str] = {}
    for name in _torch_policies():
        cls = policy_class(name)
        if cls.keras_refusal:
            out[name] = cls.keras_refusal
        elif not issubclass(cls, RulePolicy) and name not in _WRITTEN_NAMES:
            out[name] = (
                "it acts through the torch model or optimizer rather than deciding from the "
                "gradient statistics (it is not a rule policy), so it has no Keras twin"
            )
    return out


#: Policies with no Keras version, and why (the policies say so themselves: nothing here names
#: them).
REFUSED: dict[str, str] = _refusals()

#: Every Keras policy by spec name: the classes written here, and an adapter for every other rule
#: policy (:class:`RuleAdapter`).
KERAS_POLICIES: dict[str, type[KerasPolicy]] = {
    cls.name: cls for cls in _WRITTEN + tuple(_adapters(c.reference.name for c in _WRITTEN))
}


def available_policies() -> list[str]:
    """Names of the policies available in Keras, sorted."""
    return sorted(KERAS_POLICIES)


def _unsupported(name: str) -> ConfigError:
    valid = ", ".join(available_policies())
    refusals = _refusals()  # read now: a policy registered after this import is named too
    if name in refusals:
        return ConfigError(
            f"policy {name!r} is not available in Keras: {refusals[name]}. Policies available in "
            f"Keras: {valid}"
        )
    refused = ", ".join(sorted(refusals))
    return ConfigError(
        f"unknown policy {name!r}; valid policies in Keras: {valid} (or 'default', 'none'); "
        f"not available in Keras: {refused}"
    )


def to_keras(policy: Policy | KerasPolicy) -> KerasPolicy:
    """The Keras twin of a torch policy object (same parameters), or the Keras policy itself."""
    if isinstance(policy, KerasPolicy):
        return policy
    cls = KERAS_POLICIES.get(policy.name)
    if cls is None:
        raise _unsupported(policy.name)
    return cls(**policy.params())


#: The default chain in Keras: the torch default without ``update_clip`` (see ``REFUSED``).
KERAS_DEFAULT_SPEC = "skip_nonfinite+adaptive_clip+lr_backoff"


def parse_keras_spec(spec: Any) -> list[KerasPolicy]:
    """A spec string (the torch grammar: ``"skip_nonfinite+zclip+clip_norm:1.0"``, ``"default"``,
    ``"none"``), a policy (Keras or torch), or a list of them, as fresh Keras policies.
    Any problem raises :class:`ConfigError` naming the policies Keras has."""
    if isinstance(spec, KerasPolicy):
        return [spec]
    if isinstance(spec, Policy):
        return [to_keras(spec)]
    if isinstance(spec, str):
        # The torch default's update_clip has no Keras twin (see REFUSED): Keras's own default.
        parts = [KERAS_DEFAULT_SPEC if p.strip() == "default" else p for p in split_chain(spec)]
        spec = "+".join(parts) if parts else spec
        for part in split_chain(spec):
            name = split_term(part).name
            if name and name not in NAMED_CHAINS and name != "none" and name not in KERAS_POLICIES:
                # Checked before the torch parser, so the message lists what Keras has.
                raise _unsupported(name)
        try:
            return [to_keras(p) for p in parse_spec(spec)]
        except SpecError as e:
            raise ConfigError(f"policy {spec!r}: {e}") from None
    if spec is None:
        return parse_keras_spec("default")
    try:
        items = list(spec)
    except TypeError:
        raise ConfigError(
            f"policy must be a spec string, a policy or a list of them, not {type(spec).__name__}"
        ) from None
    out: list[KerasPolicy] = []
    for item in items:
        if not isinstance(item, (str, Policy, KerasPolicy)):
            raise ConfigError(
                f"policy list items must be spec strings or policies, not {type(item).__name__}"
            )
        out.extend(parse_keras_spec(item))
    return out
