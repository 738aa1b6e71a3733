"""``GuardedOptimizer``: a Keras 3 optimizer that wraps another and guards its step.

    model.compile(
        optimizer=GuardedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), policy="default"),
        loss=..., metrics=[...],
    )
    model.fit(x, y)                                     # or: optimizer.apply(grads, variables)

Modelled on ``keras.optimizers.LossScaleOptimizer``: it measures the gradients once (per-variable
and global L2 norms, in float32), runs the policy chain on them, then either calls the inner
optimizer's ``apply`` with the mitigated gradients or skips the step, with ``ops.cond`` (the
stateful path: TensorFlow, torch) or ``ops.where`` over the new values (``stateless_apply``: JAX).
A skipped step leaves the weights, the inner optimizer's slots and its iteration count untouched.

Everything the policies learn (ZClip's EMA and warmup buffer, AutoClip's history, ...), the
counters and the last step's norms are ``keras.Variable``s of this optimizer: they are saved with
the model, restored on load, and updated inside ``tf.function``/XLA/``jax.jit``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from ..errors import ConfigError
from ..policies.registry import order_chain
from .policies import SKIP_REASONS, KerasPolicy, KerasStep, VarLayout, parse_keras_spec

_BASE_ARGS = (
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)


def _no_autograph(fn: Any) -> Any:
    """Keep TensorFlow's AutoGraph out of the Guard's code when a ``tf.function`` traces it (as
    it stays out of Keras's own): the code has no Python branch on a tensor to convert."""
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    return tf.autograph.experimental.do_not_convert(fn)


def build_chain(policy: Any, check_finite: bool) -> list[KerasPolicy]:
    """The chain as the torch Guard builds it: parsed, ``skip_nonfinite`` first when
    ``check_finite`` and absent, no duplicates, reacting policies (``lr_backoff``) last."""
    chain = parse_keras_spec(policy)
    if check_finite and not any(p.name == "skip_nonfinite" for p in chain):
        from .policies import skip_nonfinite

        chain.insert(0, skip_nonfinite())
    return order_chain(chain)


@keras.saving.register_keras_serializable(package="gradguard")
class GuardedOptimizer(keras.optimizers.Optimizer):
    """Guard a Keras optimizer's steps against exploding and non-finite gradients.

    Args:
        optimizer: the ``keras.optimizers.Optimizer`` that takes the steps (SGD, Adam, ...).
            Its ``loss_scale_factor`` moves to this optimizer (the policies measure unscaled
            gradients). For fp16 loss scaling wrap the other way round:
            ``LossScaleOptimizer(GuardedOptimizer(opt))`` (what ``mixed_float16`` does).
        policy: a spec string as for the torch Guard (``"default"`` =
            ``skip_nonfinite+adaptive_clip+lr_backoff``, the torch default without
            ``update_clip``; ``"zclip"``, ``"agc:0.01"``, ``"none"``),
            a policy (``gradguard.keras.policies`` or torch), or a list of them. ``rollback``,
            ``reset_moments``, ``adagc``, ``spam_clip`` and ``qk_clip`` are not available (see
            ``gradguard.keras.policies.REFUSED``).
        check_finite: add ``skip_nonfinite`` to the chain if it is not there, so that no NaN/Inf
            gradient ever reaches the weights (as the torch Guard does).
        name: the optimizer's name.

    After each step, ``last_step()`` gives that step's norms and decisions (read by
    :class:`~gradguard.keras.GuardTelemetry`) and ``counters`` the totals. With
    ``steps_per_execution > 1`` these describe the last step of each execution.
    """

    built: bool  # Keras's flag (its Optimizer has no types)

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        policy: Any = "default",
        *,
        check_finite: bool = True,
        name: str | None = None,
        **kwargs: Any,
    ):
        if isinstance(optimizer, GuardedOptimizer):
            raise ConfigError("the optimizer is already a GuardedOptimizer; wrap it once")
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise ConfigError(
                "wrap the other way round: LossScaleOptimizer(GuardedOptimizer(opt)), so that the "
                "Guard measures unscaled gradients and an fp16 overflow stays the loss scaler's "
                "to handle (Keras's mixed_float16 policy wraps this way by itself)"
            )
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ConfigError(
                "GuardedOptimizer needs a keras.optimizers.Optimizer as its first argument, got "
                f"{type(optimizer).__name__}; e.g. GuardedOptimizer(keras.optimizers.SGD(0.1), "
                'policy="default")'
            )
        if optimizer.gradient_accumulation_steps:
            raise ConfigError(
                "the inner optimizer accumulates gradients (gradient_accumulation_steps="
                f"{optimizer.gradient_accumulation_steps}); the Guard would judge each micro-batch "
                "instead of the accumulated step. Accumulate before calling apply, or use larger "
                "batches"
            )
        if not isinstance(check_finite, bool):
            raise ConfigError(f"check_finite must be True or False, got {check_finite!r}")
        if kwargs:
            where = (
                "set it on the inner optimizer"
                if set(kwargs) <= set(_BASE_ARGS)
                else "it takes optimizer, policy, check_finite and name"
            )
            raise ConfigError(
                f"GuardedOptimizer got argument(s) {', '.join(sorted(kwargs))}: {where}"
            )
        chain = build_chain(policy, check_finite)
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self.check_finite = check_finite
        self._chain = tuple(chain)
        self.loss_scale_factor = optimizer.loss_scale_factor
        optimizer.loss_scale_factor = None  # unscaled here, before the policies measure
        self.layout: VarLayout | None = None

    # ----- description ------------------------------------------------------------------------------
    @property
    def policies(self) -> tuple[KerasPolicy, ...]:
        return self._chain

    @property
    def spec(self) -> str:
        """The spec string of the chain as it runs (including the implicit ``skip_nonfinite``)."""
        return "+".join(p.spec() for p in self._chain) or "none"

    def __repr__(self) -> str:
        return f"GuardedOptimizer({self.inner_optimizer.__class__.__name__}, policy={self.spec!r})"

    # ----- building -------------------------------------------------------------------------------
    def build(self, var_list: Sequence[Any]) -> None:
        var_list = list(var_list)
        self.layout = layout = VarLayout.build(var_list)
        n, n_pol = len(var_list), max(len(self._chain), 1)
        metrics = [m for p in self._chain for m in p.metrics]
        self._metric_names = tuple(metrics)

        def var(name: str, shape: tuple = (), dtype: str = "float32") -> Any:
            return self.add_variable(shape=shape, initializer="zeros", dtype=dtype, name=name)

        self.guard_steps = var("guard_steps", dtype="int32")
        self.guard_skipped = var("guard_skipped", dtype="int32")
        self.guard_clipped = var("guard_clipped", dtype="int32")
        self.acted_counts = var("acted_counts", (n_pol,), "int32")
        self.last_norm = var("last_norm")
        self.last_norm_after = var("last_norm_after")
        self.last_var_norms = var("last_var_norms", (n,))
        self.last_var_norms_after = var("last_var_norms_after", (n,))
        self.last_skip_code = var("last_skip_code", dtype="int32")
        self.last_acted = var("last_acted", (n_pol,))
        self.last_lr = var("last_lr")
        self.last_lr_scale = var("last_lr_scale")
        self.last_metrics = var("last_metrics", (max(len(metrics), 1),))
        for p in self._chain:
            p.build(self, layout)
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self) -> list[Any]:
        return self._variables + self.inner_optimizer.variables

    # ----- the step -------------------------------------------------------------------------------
    @_no_autograph
    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        """Measure, mitigate, then apply the inner optimizer's step or skip it."""
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be "
                    "built on a list of variables. Call `optimizer.build(trainable_variables)` "
                    "first."
                )
            variables = list(self._trainable_variables)
        else:
            variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
                self.built = True
            self._check_variables_are_known(variables)
        if len(grads) != len(variables):
            raise ValueError(
                f"got {len(grads)} gradients for {len(variables)} variables; give one per variable"
            )
        self._refuse_merge_call()
        with keras.name_scope(self.name, caller=self):
            grads = self._unscale(grads)
            ctx = self._decide(grads, variables)
            lr = self._current_lr(ctx.lr_scale)
            new_grads = self._full_grads(ctx, grads)

            def step() -> None:
                with self._scaled_lr(ctx.lr_scale):
                    self.inner_optimizer.apply(new_grads, variables)

            def skip() -> None:
                return None

            # A cond, not a multiplication by 0/1: the skipped branch does not run at all, so the
            # inner optimizer's slots and iteration count stay exactly as they were.
            ops.cond(ctx.skip, skip, step)
            self._conclude(ctx, lr)

    @_no_autograph
    def stateless_apply(
        self,
        optimizer_variables: Sequence[Any],
        grads: Sequence[Any],
        trainable_variables: Sequence[Any],
    ) -> tuple[list[Any], list[Any]]:
        """The functional step (JAX's trainer uses it): new values of the trainable variables and
        of ``self.variables``. A skip selects the old values (``ops.where``) of the weights and of
        the inner optimizer's variables."""
        if not self.built:
            raise ValueError(
                f"To call `stateless_apply`, {self.__class__.__name__} must be built (i.e. its "
                "variables must have been created). You can build it via "
                "`optimizer.build(trainable_variables)`."
            )
        own = list(self._variables)
        optimizer_variables = list(optimizer_variables)
        trainable_variables = list(trainable_variables)
        mapping = list(zip(self._trainable_variables, trainable_variables, strict=True)) + list(
            zip(self.variables, optimizer_variables, strict=True)
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            grads = self._unscale(list(grads))
            ctx = self._decide(grads, list(self._trainable_variables))
            lr = self._current_lr(ctx.lr_scale)
            new_grads = self._full_grads(ctx, grads)
            self._conclude(ctx, lr)
        own_values = [scope.get_current_value(v) for v in own]
        inner_values = optimizer_variables[len(own) :]
        given_tv, given_inner = trainable_variables, inner_values
        if keras.backend.backend() == "torch":
            # torch's optimizers update the tensors they are given in place, even here: give
            # them copies, so the old values survive for a skipped step.
            given_tv = [ops.copy(t) for t in trainable_variables]
            given_inner = [ops.copy(t) for t in inner_values]
        with self._scaled_lr(ctx.lr_scale):
            new_tv, new_inner = self.inner_optimizer.stateless_apply(
                given_inner, new_grads, given_tv
            )
        skip = ctx.skip
        new_tv = [
            ops.where(skip, old, new) for old, new in zip(trainable_variables, new_tv, strict=True)
        ]
        new_inner = [
            ops.where(skip, old, new) for old, new in zip(inner_values, new_inner, strict=True)
        ]
        return new_tv, own_values + new_inner

    def _unscale(self, grads: list[Any]) -> list[Any]:
        if self.loss_scale_factor is None:
            return grads
        return [None if g is None else g / self.loss_scale_factor for g in grads]

    def _decide(self, grads: list[Any], variables: list[Any]) -> KerasStep:
        """Measure ``grads`` (already unscaled) and run the chain on them."""
        assert self.layout is not None
        kept, index, kept_vars, positions = [], [], [], []
        for pos, (g, v) in enumerate(zip(grads, variables, strict=True)):
            if g is None or self._overwrite_variable_with_gradient(v):
                continue
            kept.append(ops.convert_to_tensor(g))  # a TF IndexedSlices becomes dense here
            index.append(self._get_variable_index(v))
            kept_vars.append(v)
            positions.append(pos)
        ctx = KerasStep(
            kept, index, kept_vars, self.layout, ops.convert_to_tensor(self.guard_steps)
        )
        ctx.positions = positions
        for policy in self._chain:
            # Once the step is cancelled, clipping policies neither act on it nor learn from it;
            # skip and react policies still see it (incidents are their input).
            ctx.gate = ops.logical_not(ctx.skip) if policy.kind in ("clip", "reset") else None
            policy.apply(ctx)
        ctx.gate = None
        return ctx

    @staticmethod
    def _full_grads(ctx: KerasStep, grads: list[Any]) -> list[Any]:
        """The mitigated gradients in the caller's order (None and excluded ones as given)."""
        out = list(grads)
        for pos, g in zip(ctx.positions, ctx.grads, strict=True):
            out[pos] = g
        return out

    def _conclude(self, ctx: KerasStep, lr: Any) -> None:
        """Count, and keep the step's numbers in the ``last_*`` variables."""
        skip = ctx.skip
        stepped = ops.logical_not(skip)
        n = len(self._trainable_variables)
        self.guard_steps.assign_add(1)
        self.guard_skipped.assign_add(ops.cast(skip, "int32"))
        clip_flags = [
            ctx.acted[p.name] for p in self._chain if p.kind == "clip" and p.name in ctx.acted
        ]
        clipped = (
            ops.logical_and(stepped, ops.any(ops.stack(clip_flags)))
            if clip_flags
            else ops.convert_to_tensor(False)
        )
        self.guard_clipped.assign_add(ops.cast(clipped, "int32"))
        acted = [ops.cast(ctx.acted.get(p.name, False), "float32") for p in self._chain]
        acted_vec = ops.stack(acted) if acted else ops.zeros((1,))
        self.acted_counts.assign_add(ops.cast(acted_vec, "int32"))
        self.last_acted.assign(acted_vec)
        self.last_norm.assign(ctx.norm)
        self.last_norm_after.assign(ops.where(skip, 0.0, ctx.norm_after))
        self.last_var_norms.assign(self._scatter(ctx.raw_norms, ctx.index, n))
        self.last_var_norms_after.assign(self._scatter(ctx.norms, ctx.index, n))
        self.last_skip_code.assign(ctx.skip_code)
        self.last_lr.assign(lr)
        self.last_lr_scale.assign(ctx.lr_scale)
        if self._metric_names:
            self.last_metrics.assign(
                ops.stack([ctx.metrics.get(m, math.nan) for m in self._metric_names])
            )

    @staticmethod
    def _scatter(values: Any, index: list[int], n: int) -> Any:
        """A length-``n`` vector with ``values[k]`` at ``index[k]`` and 0 elsewhere (static index)."""
        at = {i: k for k, i in enumerate(index)}
        return ops.stack([values[at[i]] if i in at else ops.zeros(()) for i in range(n)])

    # ----- the learning rate ------------------------------------------------------------------------
    def _current_lr(self, scale: Any) -> Any:
        return ops.cast(self.inner_optimizer._get_current_learning_rate(), "float32") * scale

    @contextlib.contextmanager
    def _scaled_lr(self, scale: Any) -> Iterator[None]:
        """Scale the inner optimizer's LR for this step only (``lr_backoff``), whatever its kind
        (a variable, a schedule, a callable): the schedule and the variable are never changed."""
        if not any(p.kind == "react" for p in self._chain):
            yield
            return
        inner = self.inner_optimizer
        saved = inner._learning_rate  # Keras's own attribute (BaseOptimizer)

        def scaled() -> Any:
            if isinstance(saved, keras.optimizers.schedules.LearningRateSchedule):
                base = saved(inner._iterations)
            elif isinstance(saved, keras.Variable):
                base = saved
            elif callable(saved):
                base = saved()
            else:
                base = saved
            return ops.cast(base, "float32") * scale

        # object.__setattr__: past Keras's attribute tracking, which would treat the swap as state.
        object.__setattr__(inner, "_learning_rate", scaled)
        try:
            yield
        finally:
            object.__setattr__(inner, "_learning_rate", saved)

    def _refuse_merge_call(self) -> None:
        if keras.backend.backend() != "tensorflow":
            return
        import tensorflow as tf

        if tf.distribute.has_strategy() and not (
            tf.__internal__.distribute.strategy_supports_no_merge_call()
        ):
            raise ConfigError(
                "GuardedOptimizer does not support this tf.distribute strategy yet (its apply "
                "needs a merge call); train without the strategy or under one that needs none"
            )

    # ----- reading what happened ------------------------------------------------------------------
    def last_step(self) -> dict[str, Any] | None:
        """The last step's numbers on the host (eager; None before the first step): ``step``,
        ``grad_norm``, ``grad_norm_after`` (0 when skipped), ``var_norms`` and
        ``var_norms_after`` (numpy, one per variable of ``layout``), ``skipped``,
        ``skip_reason``, ``acted`` (policy names), ``clipped``, ``lr``, ``lr_scale``,
        ``metrics``."""
        if not self.built:
            return None
        steps = int(_np(self.guard_steps))
        if steps == 0:
            return None
        code = int(_np(self.last_skip_code))
        acted_flags = _np(self.last_acted)
        acted = [p.name for p, f in zip(self._chain, acted_flags, strict=False) if f > 0]
        skipped = code != 0
        clip_kinds = {p.name for p in self._chain if p.kind == "clip"}
        metrics = {
            m: float(v)
            for m, v in zip(self._metric_names, _np(self.last_metrics), strict=False)
            if not math.isnan(float(v))
        }
        return {
            "step": steps - 1,
            "grad_norm": float(_np(self.last_norm)),
            "grad_norm_after": float(_np(self.last_norm_after)),
            "var_norms": _np(self.last_var_norms).astype(np.float64),
            "var_norms_after": _np(self.last_var_norms_after).astype(np.float64),
            "skipped": skipped,
            "skip_reason": SKIP_REASONS[code] if 0 <= code < len(SKIP_REASONS) else "unknown",
            "acted": acted,
            "clipped": not skipped and any(a in clip_kinds for a in acted),
            "lr": float(_np(self.last_lr)),
            "lr_scale": float(_np(self.last_lr_scale)),
            "metrics": metrics,
        }

    @property
    def counters(self) -> dict[str, int]:
        """steps, skipped, clipped (+ rolled_back and amp_overflow, always 0 in Keras) and
        ``acted.<policy>`` counts, as the torch Guard's ``counters``."""
        if not self.built:
            return {"steps": 0, "skipped": 0, "rolled_back": 0, "amp_overflow": 0, "clipped": 0}
        out = {
            "steps": int(_np(self.guard_steps)),
            "skipped": int(_np(self.guard_skipped)),
            "rolled_back": 0,
            "amp_overflow": 0,
            "clipped": int(_np(self.guard_clipped)),
        }
        for p, c in zip(self._chain, _np(self.acted_counts), strict=False):
            out[f"acted.{p.name}"] = int(c)
        return out

    # ----- the inner optimizer's face -------------------------------------------------------------
    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    def finalize_variable_values(self, var_list: Sequence[Any]) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self) -> dict[str, Any]:
        # Not super().get_config(): the base arguments belong to the inner optimizer.
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "policy": self.spec,
            "check_finite": self.check_finite,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> GuardedOptimizer:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


def _np(v: Any) -> np.ndarray:
    """A variable's or tensor's value as numpy. TensorFlow's own ``.numpy()`` where it has one:
    ``ops.convert_to_numpy`` goes through ``np.array``, which numpy 2 warns about for TF tensors."""
    t = keras.ops.convert_to_tensor(v)
    if keras.backend.backend() == "tensorflow":
        return np.asarray(t.numpy())
    return np.asarray(keras.ops.convert_to_numpy(t))
