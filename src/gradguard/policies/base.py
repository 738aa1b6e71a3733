"""What a policy is: state plus one ``apply`` per optimizer step.

A policy reads the step's :class:`~gradguard.stats.GradStats` (and, when it declares
``needs_host``, the few host-side values the Guard reads in its single sync), changes the gradients
only through the stats' in-place operations, and records its decision on the :class:`StepContext`:
whether it acted (a bool or a 0-dim bool tensor, so clipping stays sync-free), the layers involved,
a few named metrics, and requests to skip the step, roll back, scale the LR, load a snapshot, reset
moments or drop gradients. It never changes the model or the optimizer itself: the Guard carries
out its requests right after it (:mod:`gradguard.actions`).

Policies compose in a chain, in order: each sees the gradients as the previous ones left them.
State is plain data (floats, ints, tensors, lists) and round-trips through ``state_dict``; a saved
state is validated by ``check_state`` before anything is loaded.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from .._lazy import np, torch
from ..errors import ConfigError
from ..layout import ParamLayout
from ..specgrammar import format_value as _fmt
from ..stats import GradStats
from ..updates import UpdateStats

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class HostView:
    """Values read to the host once per step (the Guard's single sync), before any policy runs."""

    norm: float
    finite: bool
    loss: float | None
    param_norms: list[float] | None = None


@dataclass
class StepContext:
    """Everything one step's policies read and decide."""

    step: int
    stats: GradStats
    optimizer: torch.optim.Optimizer
    loss: Tensor | None = None
    host: HostView | None = None
    skip: bool = False
    skip_reason: str | None = None
    #: fp16 overflow seen by the GradScaler: its skip, not an incident of the Guard's.
    amp_overflow: bool = False
    rollback: bool = False
    #: A policy saw a finite anomaly it mitigated (a clip far above the run's own level): an
    #: incident for the reacting policies (``lr_backoff``), though the step is taken.
    anomaly: bool = False
    #: A policy's own evidence (already tested against the loss) says the LR is above what the
    #: model tolerates: an incident the reacting policies count as it is, with no test of their
    #: own (``update_clip``'s persistently binding bound).
    unstable: bool = False
    #: Why a policy asked ``rollback`` to go back to its last trusted snapshot (None: nobody did).
    rollback_request: str | None = None
    #: Rerun attribution (``guard.step(replay=...)``): ``"transient"`` (the rerun did not reproduce
    #: the failure: hardware, nondeterminism), ``"reproducible"`` (it did: the data or the model),
    #: or None (no rerun). Set as soon as the step is known to fail: before every policy for a
    #: non-finite step, right after the policy that flagged a spike otherwise; the policies after
    #: that point read it (``rollback:on=reproducible``).
    rerun: str | None = None
    #: What made the Guard rerun the step: ``"nonfinite"`` or ``"spike"`` (None: no rerun).
    rerun_trigger: str | None = None
    lr_scale: float = 1.0
    #: ``Guard(sync_free=True)``: no host read this step; a skip is decided on the device, as
    #: ``skip_flag`` (a 0-dim bool tensor the Guard hands to the optimizer's fused step), with
    #: ``flag_reasons`` ``(flag, reason)`` saying why, read only when the report is.
    device_skip: bool = False
    skip_flag: Tensor | None = None
    flag_reasons: list[tuple[Tensor, str]] = field(default_factory=list)
    #: What the Guard does to the model and the optimizer right after the policy that asked (a
    #: policy decides, the Guard acts): a validated snapshot to load (``rollback``), the
    #: parameters (layout indices) whose optimizer moments to zero and whether their step counts
    #: restart too, the gradients (positions in ``stats.grads``) to drop for this step
    #: (``reset_moments``). The Guard empties each once it is done.
    restore: dict[str, Any] | None = None
    reset: list[int] = field(default_factory=list)
    reset_step: bool = True
    drop: list[int] = field(default_factory=list)
    acted: dict[str, Tensor | bool] = field(default_factory=dict)
    layers: dict[str, Tensor | list[int]] = field(default_factory=dict)
    metrics: dict[str, Tensor | float] = field(default_factory=dict)

    def record(
        self, policy: str, acted: Tensor | bool, layers: Tensor | list[int] | None = None
    ) -> None:
        """Note that ``policy`` acted (or may have: a tensor flag is read lazily, never synced here).

        ``layers`` is either a list of layer indices or a bool mask over layers.
        """
        prev = self.acted.get(policy)
        if prev is None:
            self.acted[policy] = acted
        elif isinstance(prev, torch.Tensor) or isinstance(acted, torch.Tensor):
            self.acted[policy] = torch.as_tensor(prev) | torch.as_tensor(acted)
        else:
            self.acted[policy] = prev or acted
        if layers is not None:
            self.layers[policy] = layers

    def request_skip(self, reason: str) -> None:
        if not self.skip:
            self.skip, self.skip_reason = True, reason

    def request_rollback(self, reason: str) -> None:
        """Ask the chain's ``rollback`` to treat this step as the end of a finite runaway: go back
        to its last trusted snapshot (one taken before the trouble began), skip the step, record
        the undone steps as skipped data and cut the LR, exactly as when the loss runs away.

        For a policy that sees trouble the loss does not show yet (e.g. an update/weight ratio far
        above its history). ``reason`` (short, e.g. ``"update_ratio"``) becomes the step's skip
        reason. The first request of a step wins. ``rollback`` honours it before this step's
        update wherever the requesting policy sits in the chain; a chain without ``rollback``
        ignores it (request a skip as well if the step must not be applied then)."""
        if self.rollback_request is None:
            self.rollback_request = reason

    def request_restore(self, snapshot: dict[str, Any]) -> None:
        """Ask the Guard to load ``snapshot`` (validated whole: :func:`gradguard.snapshot.content_problem`)
        into the model and the optimizer before anything else happens to this step."""
        self.restore = snapshot

    def request_reset(self, params: Iterable[int], *, step: bool = True) -> None:
        """Ask the Guard to zero the optimizer's moment buffers of ``params`` (layout indices)
        and, with ``step``, their step counts (:func:`gradguard.actions.reset_param_state_`)."""
        self.reset.extend(params)
        self.reset_step = step

    def request_drop(self, positions: Iterable[int]) -> None:
        """Ask the Guard to leave the gradients at ``positions`` (in ``stats.grads``) out of this
        step: dropped (``None``), so every torch optimizer leaves those parameters, their state
        and their step counts alone, and counted as zero in the norms the later policies read."""
        self.drop.extend(positions)

    def request_skip_if(self, flag: Tensor, reason: str) -> None:
        """On a ``device_skip`` step: skip where the 0-dim bool ``flag`` holds, decided on the
        device (the Guard passes the flags, or-ed, to the optimizer's fused step)."""
        self.skip_flag = flag if self.skip_flag is None else self.skip_flag | flag
        self.flag_reasons.append((flag, reason))

    @property
    def hard_incident(self) -> bool:
        """A rollback, a skip or an instability: an incident whatever the loss shows (an AMP
        overflow is the scaler's normal operation, not one)."""
        return self.rollback or self.unstable or (self.skip and self.skip_reason != "amp_overflow")

    @property
    def event(self) -> bool:
        """Whether this step already counts as an incident: a hard one (:attr:`hard_incident`) or
        a finite anomaly a policy mitigated."""
        return self.hard_incident or self.anomaly


@dataclass(eq=False)
class RowScale:
    """Multiply the rows (first dimension) of ``param`` by ``factors`` after the step, in place:
    ``param[i] *= factors[i]``. ``factors`` is a 1-D tensor of ``param.shape[0]`` values (float32,
    or float64 for a float64 parameter), on any device; a factor of exactly 1.0 leaves its row
    bit-identical, so a decision that binds nowhere needs no host read to be a no-op."""

    param: Tensor
    factors: Tensor


@dataclass
class UpdateDecision:
    """What an update policy decided about the step just taken; the Guard applies it.

    ``layer_scale``: one factor per layer (1.0: untouched) to scale the update by, exactly
    (``w <- w_old + s * (w_new - w_old)``; only after an exact measurement); ``scale_moments``:
    also scale those layers' first-moment buffers (momentum, Adam's ``exp_avg``) by ``s``, so the
    optimizer remembers the step it was let take, not the one it proposed; ``row_scale``: weights
    to rescale row by row (:class:`RowScale`; ``qk_clip``: a head's query and key rows), applied
    under ``torch.no_grad`` after ``layer_scale``; ``acted``: whether it acted (a bool, or a 0-dim
    bool tensor read lazily); ``metrics``: named numbers (floats or 1-element device tensors)
    for telemetry.
    """

    layer_scale: list[float] | None = None
    scale_moments: bool = False
    row_scale: list[RowScale] = field(default_factory=list)
    acted: bool | Tensor = False
    metrics: dict[str, float | Tensor] = field(default_factory=dict)


class Policy:
    """Base class of every mitigation policy.

    Subclasses set ``name`` (the registry and spec name), may set the ``needs_*`` flags, keep their
    mutable state in ``self.state`` (a dict of plain data and tensors), and implement ``apply``.
    Constructor arguments are the spec parameters; the first one is what ``name:value`` sets.
    """

    name: ClassVar[str] = ""
    #: Needs host-side values (global norm, finiteness, loss) this step: costs the Guard's one sync.
    needs_host: ClassVar[bool] = False
    #: Also needs each parameter's gradient norm on the host (read in the same transfer).
    needs_host_param_norms: ClassVar[bool] = False
    #: Reads the loss: ``guard.step(loss=...)`` must be given.
    needs_loss: ClassVar[bool] = False
    #: "clip": changes gradients; "reset": changes optimizer state before the step; "skip": may
    #: cancel the step; "react": responds to the incidents of the policies before it; "update":
    #: decides after the step the optimizer took (:meth:`decide_update`), on its measured update
    #: (:meth:`update_mode`) or on what the forward showed (``qk_clip``).
    kind: ClassVar[str] = "clip"
    #: State keys whose values (every element of a list or tensor) are never negative: norms,
    #: variances, EMAs, histories, counts. ``check_state`` refuses a negative one.
    nonnegative: ClassVar[frozenset[str]] = frozenset()
    #: Why the Keras optimizer has no twin of this policy, or None (a rule policy is adapted to
    #: Keras automatically; a policy that is not one is refused there in any case).
    keras_refusal: ClassVar[str | None] = None

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def bind(self, layout: ParamLayout, optimizer: torch.optim.Optimizer) -> None:
        """Called once by the Guard before the first step: see the parameters and optimizer."""

    def apply(self, ctx: StepContext) -> None:
        raise NotImplementedError

    def spiked(self, ctx: StepContext) -> bool:
        """Right after :meth:`apply`: whether this policy flagged this step's gradient norm or
        loss as a finite spike, read from what it recorded (host values only: never a sync). With
        ``guard.step(replay=...)`` the Guard then reruns the step for its attribution
        (``StepContext.rerun``). False by default; the spike detectors (``skip_spike``, ``zclip``,
        ``adaptive_clip``) say when they did."""
        return False

    def after_step(self, ctx: StepContext, stepped: bool) -> None:
        """Called after the optimizer step (or the skip): e.g. to take a snapshot."""

    def update_mode(self, ctx: StepContext) -> str | None:
        """Before a step the optimizer takes: how this policy wants its update measured
        (``"exact"``, ``"sample"``; None: not at all). See :mod:`gradguard.updates`."""
        return None

    def decide_update(self, ctx: StepContext, update: UpdateStats | None) -> UpdateDecision | None:
        """After a step the optimizer took (never after a skip): the decision (None: nothing to
        do). ``update`` is the measured update, or None when no policy of the chain asked for a
        measurement this step (:meth:`update_mode`)."""
        return None

    def close(self) -> None:
        """Called by :meth:`Guard.close`: release what the policy holds (files, folders).
        Idempotent."""

    # ----- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
            for k, v in self.state.items()
        }

    def check_state(self, state: Any) -> None:
        """Raise :class:`~gradguard.errors.ConfigError` if ``state`` cannot be loaded into this
        policy as it is now (after bind); change nothing.

        The Guard calls it on every policy before it loads any, so a bad state leaves the whole
        Guard as it was. The default compares ``state`` with this policy's own ``state_dict()``:
        the same keys, the same kind of value under each (number, bool, string, tensor, list),
        tensors of the same shape, every number finite, and none negative under a key listed in
        :attr:`nonnegative`. A policy whose state has another form overrides it (the helpers
        :func:`check_keys`, :func:`check_number`, :func:`check_numbers`, :func:`check_tensor`
        name the policy, the key, the bad value and the fix in their message).
        """
        check_like(self.name, self.state_dict(), state, self.nonnegative)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`; :meth:`check_state` it first."""
        missing = set(self.state) - set(state)
        if missing:
            raise KeyError(
                f"{self.name}: state is missing {sorted(missing)}; was it saved by another policy?"
            )
        for k, v in state.items():
            cur = self.state.get(k)
            if isinstance(cur, torch.Tensor) and isinstance(v, torch.Tensor):
                self.state[k] = v.to(device=cur.device, dtype=cur.dtype).clone()
            else:
                self.state[k] = copy.deepcopy(v)

    # ----- description ----------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        sig = inspect.signature(type(self).__init__)
        return {n: getattr(self, n) for n in sig.parameters if n != "self" and hasattr(self, n)}

    def spec(self) -> str:
        """The spec string that rebuilds this policy (``name:key=value,...``)."""
        args = ",".join(f"{k}={_fmt(v)}" for k, v in self.params().items())
        return f"{self.name}:{args}" if args else self.name

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


# ----- state validation ------------------------------------------------------------------------------
#: What a refused state's message tells the user to do, unless the check knows better.
STATE_FIX = (
    "load the state this policy saved (Guard.state_dict() of a run with the same chain, the same "
    "policy parameters and the same model), or build the Guard afresh without loading it"
)


def _show(value: Any) -> str:
    """A short description of a state value for an error message."""
    if isinstance(value, torch.Tensor):
        return (
            f"tensor(shape={tuple(value.shape)}, dtype={str(value.dtype).removeprefix('torch.')})"
        )
    if isinstance(value, np.ndarray):
        return f"array(shape={value.shape}, dtype={value.dtype})"
    if isinstance(value, (list, tuple)) and len(value) > 6:
        inner = ", ".join(repr(v) for v in value[:3])
        return f"[{inner}, ...] ({len(value)} items)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def refuse_state(policy: str, key: str, value: Any, problem: str, fix: str = STATE_FIX) -> NoReturn:
    """Raise the ConfigError of a state that cannot be loaded: names the policy, the key, the
    value, what is wrong with it and the fix."""
    raise ConfigError(
        f"{policy}: cannot load the saved state {key}={_show(value)}: {problem}; {fix}"
    )


def check_keys(
    policy: str, state: Any, keys: Iterable[str], optional: Iterable[str] = ()
) -> Mapping[str, Any]:
    """``state`` must be a dict holding exactly ``keys`` (plus any of ``optional``)."""
    keys, optional = list(keys), set(optional)
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"{policy}: the saved state is {_show(state)}, not a dict of {', '.join(keys) or 'nothing'}; "
            f"{STATE_FIX}"
        )
    missing = [k for k in keys if k not in state and k not in optional]
    if missing:
        raise ConfigError(
            f"{policy}: the saved state has no {', '.join(missing)} (it holds "
            f"{', '.join(map(str, state)) or 'nothing'}): was it saved by another policy or "
            f"version? {STATE_FIX}"
        )
    extra = [k for k in state if k not in keys and k not in optional]
    if extra:
        raise ConfigError(
            f"{policy}: the saved state holds {', '.join(map(str, extra))}, which this policy does "
            f"not keep (it keeps {', '.join(keys) or 'nothing'}): was it saved by another policy or "
            f"version? {STATE_FIX}"
        )
    return state


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def check_number(
    policy: str,
    key: str,
    value: Any,
    *,
    integer: bool = False,
    nonneg: bool = False,
    nullable: bool = False,
) -> None:
    """A finite number (an integer with ``integer``), >= 0 with ``nonneg``; None with ``nullable``."""
    if value is None and nullable:
        return
    if not (_is_int(value) if integer else _is_real(value)):
        what = "an integer" if integer else "a number"
        refuse_state(policy, key, value, f"it must be {what}" + (" or None" if nullable else ""))
    if not math.isfinite(value):
        refuse_state(policy, key, value, "it must be a finite number")
    if nonneg and value < 0:
        refuse_state(policy, key, value, "it must be >= 0")


def check_numbers(
    policy: str,
    key: str,
    values: Any,
    *,
    integer: bool = False,
    nonneg: bool = False,
    length: int | None = None,
    max_length: int | None = None,
) -> None:
    """A list (tuple, 1-D array) of finite numbers: ``length`` of them, or at most ``max_length``."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            refuse_state(policy, key, values, "it must be a flat list of numbers")
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        refuse_state(policy, key, values, "it must be a list of numbers")
    if length is not None and len(values) != length:
        refuse_state(
            policy, key, values, f"it holds {len(values)} values where this Guard keeps {length}"
        )
    if max_length is not None and len(values) > max_length:
        refuse_state(
            policy, key, values, f"it holds {len(values)} values, more than the {max_length} kept"
        )
    for i, v in enumerate(values):
        ok = _is_int(v) if integer else _is_real(v)
        if not ok or not math.isfinite(v) or (nonneg and v < 0):
            need = "an integer" if integer else "a finite number"
            problem = f"item {i} is {v!r}; each must be {need}" + (" >= 0" if nonneg else "")
            refuse_state(policy, key, values, problem)


def check_tensor(
    policy: str,
    key: str,
    value: Any,
    *,
    like: Tensor | None = None,
    shape: tuple[int, ...] | None = None,
    nonneg: bool = False,
    allow_inf: bool = False,
) -> None:
    """A tensor shaped like ``like`` (or ``shape``), of the same kind of dtype (floating, integer,
    bool), every element finite (``allow_inf``: +inf allowed, never NaN or -inf), >= 0 with
    ``nonneg``."""
    if not isinstance(value, torch.Tensor):
        refuse_state(policy, key, value, "it must be a tensor")
    if like is not None:
        shape = tuple(like.shape)
        if _dtype_kind(like.dtype) != _dtype_kind(value.dtype):
            refuse_state(
                policy,
                key,
                value,
                f"it must hold {_dtype_kind(like.dtype)} values like "
                f"{str(like.dtype).removeprefix('torch.')}",
            )
    if shape is not None and tuple(value.shape) != tuple(shape):
        refuse_state(
            policy, key, value, f"its shape must be {tuple(shape)}, the shape this Guard keeps"
        )
    t = value.detach()
    if t.is_floating_point() or t.is_complex():
        bad = torch.isnan(t) if allow_inf else ~torch.isfinite(t)
        if allow_inf and not t.is_complex():
            bad = bad | (t == -math.inf)
        if bool(bad.any()):
            first = int(bad.reshape(-1).nonzero()[0])
            refuse_state(
                policy,
                key,
                value,
                f"element {first} is {t.reshape(-1)[first].item()!r}; every element must be "
                + ("a number or +inf" if allow_inf else "finite"),
            )
    if (
        nonneg
        and not t.is_complex()
        and t.dtype != torch.bool
        and t.numel()
        and bool((t < 0).any())
    ):
        first = int((t < 0).reshape(-1).nonzero()[0])
        refuse_state(
            policy,
            key,
            value,
            f"element {first} is {t.reshape(-1)[first].item()!r}; it must be >= 0",
        )


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point:
        return "floating-point"
    if dtype.is_complex:
        return "complex"
    return "integer"


def _value_kind(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if _is_int(v):
        return "int"
    if _is_real(v):
        return "float"
    if isinstance(v, torch.Tensor):
        return "tensor"
    if isinstance(v, (list, tuple, np.ndarray)):
        return "list"
    if isinstance(v, str):
        return "str"
    if v is None:
        return "none"
    if isinstance(v, Mapping):
        return "dict"
    return type(v).__name__


def check_like(policy: str, ref: Mapping[str, Any], state: Any, nonneg: Iterable[str] = ()) -> None:
    """``state`` has the form of ``ref`` (a policy's own ``state_dict()``): the same keys; under
    each, a value of the same kind (an int where ref holds an int; a float or an int where a
    float; a tensor of the same shape and dtype kind; a list of finite numbers; anything plain
    where ref holds None, i.e. not yet made); every number finite; >= 0 under ``nonneg``."""
    nonneg = set(nonneg)
    check_keys(policy, state, ref)
    for key, want in ref.items():
        v = state[key]
        pos = key in nonneg
        kind, vkind = _value_kind(want), _value_kind(v)
        if kind == "none":
            if vkind in ("int", "float"):
                check_number(policy, key, v, nonneg=pos)
            elif vkind == "tensor":
                check_tensor(policy, key, v, nonneg=pos)
            elif vkind == "list":
                check_numbers(policy, key, v, nonneg=pos)
            elif vkind not in ("none", "bool", "str"):
                refuse_state(policy, key, v, "it must be a number, a tensor, a list or None")
        elif kind in ("int", "float"):
            check_number(policy, key, v, integer=kind == "int", nonneg=pos)
        elif kind == "tensor":
            check_tensor(policy, key, v, like=want, nonneg=pos)
        elif kind == "list":
            integer = len(want) > 0 and all(
                _is_int(x) for x in np.asarray(want).reshape(-1).tolist()
            )
            check_numbers(policy, key, v, integer=integer, nonneg=pos)
        elif kind == "dict":
            if not isinstance(v, Mapping):
                refuse_state(policy, key, v, "it must be a dict")
            check_like(policy, want, v, nonneg=set(want) if pos else ())
        elif kind != vkind:
            refuse_state(policy, key, v, f"it must be a {kind}, like the {_show(want)} kept now")
