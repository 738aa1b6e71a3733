"""Rerun one failing step: where its NaN/Inf starts, and whether the failure reproduces.

``replay(model, closure)``
    Re-runs one step's computation with hooks armed for that call only, and names the first
    module whose *output* went non-finite (phase ``forward``) or, when the loss is finite, the
    first module that turned a finite gradient into a non-finite one (phase ``backward``). The
    model is left exactly as it was: buffers, gradients, train/eval flags and the RNG state are
    restored and every hook is removed, also when the closure raises.

``attribute(trigger, norm, loss, rerun)``
    Classifies the failing step from that rerun: ``"reproducible"`` (the data or the model) or
    ``"transient"`` (hardware, nondeterminism).

The Guard runs both on a failing step given ``replay=`` (its ``ctx.rerun`` feeds the policies, so
this is part of the core and imports nothing from :mod:`gradguard.diagnose`);
:mod:`gradguard.diagnose.localize` re-exports them beside the static localization it adds.

Replay and randomness (:data:`REPLAY_NOTE`): dropout and other random layers draw fresh masks on the
replay unless the closure seeds them, so a fault that depends on one mask may not recur. The RNG
state is restored afterwards, so replaying does not change the training run's random stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .stats import exact_norms, scaled_l2

#: Names used where the origin is not a module.
INPUT = "(input)"  # the batch itself held NaN/Inf
LOSS = "(loss)"  # the loss function (outside the model) made it
ROOT = "(root)"  # the model's own forward code (ParamLayout names the root the same way)

#: Longest ``path`` kept in a record (a NaN reaches every module on its way to the input).
PATH_LIMIT = 64

REPLAY_NOTE = (
    "replay re-runs the step: dropout and other random layers draw new masks unless the closure "
    "seeds them (call torch.manual_seed(seed) inside the closure, before the forward), so a fault "
    "that depends on one mask may not recur"
)


# ----- replay: re-run the step with hooks ---------------------------------------------------------


@dataclass
class Localization:
    """Where a replayed step first went non-finite.

    ``origin``: a module name (``named_modules``; ``(root)`` for the model's own forward code),
    ``(input)`` (the batch), ``(loss)`` (the loss function), or ``""`` when nothing was.
    ``phase``: ``forward`` (an activation or the loss), ``backward`` (a gradient) or ``none``.
    ``path``: modules in the order the fault spread (forward: execution order; backward: the
    order the backward pass reached them), the origin first.
    """

    origin: str
    phase: str
    path: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    def as_record(self, step: int) -> dict[str, Any]:
        return {
            "type": "localization",
            "step": int(step),
            "origin": self.origin,
            "phase": self.phase,
            "path": list(self.path[:PATH_LIMIT]),
            "method": "replay",
            "detail": dict(self.detail),
        }


def _tensors(obj: Any, depth: int = 0) -> Iterator[Tensor]:
    """Every tensor in a module's inputs or outputs (nested tuples, lists, dicts; a
    ``PackedSequence`` is a tuple)."""
    if isinstance(obj, Tensor):
        yield obj
    elif depth < 8 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, depth + 1)
    elif depth < 8 and isinstance(obj, Mapping):
        for x in obj.values():
            yield from _tensors(x, depth + 1)


def _checkable(t: Tensor) -> bool:
    return (
        (t.is_floating_point() or t.is_complex())
        and t.layout == torch.strided
        and t.device.type != "meta"
        and t.numel() > 0
    )


def _nonfinite(t: Tensor | None) -> bool:
    # One host read per tensor: replay is a diagnosis run on a failed step, not the training loop.
    return t is not None and _checkable(t) and not bool(torch.isfinite(t).all())


def _describe(t: Tensor) -> dict[str, Any]:
    t = t.detach()
    return {
        "nan": int(torch.isnan(t).sum()),
        "inf": int(torch.isinf(t).sum()),
        "numel": t.numel(),
        "shape": list(t.shape),
    }


@dataclass
class _Call:
    """One call of a module during the replayed forward, and what its backward saw."""

    index: int
    name: str
    gout_bad_seq: int | None = None  # when a gradient w.r.t. one of its outputs came non-finite
    gout_seen: bool = False
    gin_bad_seq: int | None = None  # when its own contribution to an input gradient did
    parent: _Call | None = None  # the call running when this one started
    inner_bad_seq: int | None = None  # when a call inside it first received a non-finite one


def _inside(name: str, ancestor: str) -> bool:
    return name != ancestor and (ancestor == ROOT or name.startswith(ancestor + "."))


def _innermost_maker(makers: dict[str, int]) -> str:
    """The earliest maker; every module enclosing a maker made it too, by the same test: the
    innermost of those is named."""
    origin = min(makers, key=lambda n: makers[n])
    while True:
        inner = [n for n in makers if _inside(n, origin)]
        if not inner:
            break
        origin = min(inner, key=lambda n: makers[n])
    return origin


class _Replay:
    def __init__(self, model: nn.Module, activations: bool):
        self.model = model
        self.activations = activations
        self.modules = [(n or ROOT, m) for n, m in model.named_modules()]
        self.handles: list[Any] = []
        self.stack: list[_Call] = []
        self.calls: list[_Call] = []
        self.forward_first: dict[str, Any] | None = None
        self.forward_path: dict[str, None] = {}
        self.seq = 0
        self.param_bad: dict[int, int] = {}  # param index -> seq its gradient came non-finite
        self.owners: dict[int, list[str]] = {}  # param index -> owning module names
        self.unhooked: list[str] = []

    # --- forward ---
    def _pre(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self.activations and self.forward_first is None:
                bad = next((t for t in _tensors((args, kwargs)) if _nonfinite(t)), None)
                if bad is not None:
                    # The input was non-finite before this module ran and no submodule's output
                    # was: the enclosing module's own code made it, or the batch itself.
                    origin = self.stack[-1].name if self.stack else INPUT
                    self.forward_first = {
                        "origin": origin,
                        "seen_at": name,
                        "seen_in": "input",
                        "module_type": type(module).__name__,
                        **_describe(bad),
                    }
                    self.forward_path[origin] = None
            call = _Call(len(self.calls), name, parent=self.stack[-1] if self.stack else None)
            self.calls.append(call)
            self.stack.append(call)
            if not torch.is_grad_enabled():
                return None
            # Alias each input by a view: the gradient w.r.t. the view is this module's own
            # contribution, where a hook on the input itself would see the sum over all its
            # consumers (a residual branch, a shared input). A view (unlike a full backward
            # hook's custom Function) may be modified in place, as ReLU(inplace=True) does.
            memo: dict[int, Tensor] = {}
            new_args = self._alias(args, memo, call)
            new_kwargs = self._alias(kwargs, memo, call)
            return (new_args, new_kwargs) if memo else None

        return hook

    def _alias(self, obj: Any, memo: dict[int, Tensor], call: _Call) -> Any:
        if isinstance(obj, Tensor):
            if not (obj.requires_grad and (obj.is_floating_point() or obj.is_complex())):
                return obj
            if id(obj) not in memo:  # the same tensor twice stays one tensor (MHA's `q is k`)
                view = obj.view_as(obj)
                self.handles.append(view.register_hook(self._grad_hook(call, "in")))
                memo[id(obj)] = view
            return memo[id(obj)]
        if type(obj) is tuple:
            return tuple(self._alias(x, memo, call) for x in obj)
        if type(obj) is list:
            return [self._alias(x, memo, call) for x in obj]
        if type(obj) is dict:
            return {k: self._alias(v, memo, call) for k, v in obj.items()}
        return obj

    def _post(self, name: str):
        def hook(module: nn.Module, _args: tuple, output: Any):
            call = self.stack.pop() if self.stack else _Call(len(self.calls), name)
            outs = list(_tensors(output))
            if self.activations:
                bad = next((t for t in outs if _nonfinite(t)), None)
                if bad is not None:
                    if self.forward_first is None:
                        self.forward_first = {
                            "origin": name,
                            "seen_at": name,
                            "seen_in": "output",
                            "module_type": type(module).__name__,
                            **_describe(bad),
                        }
                    self.forward_path[name] = None
            if torch.is_grad_enabled():
                seen: set[int] = set()
                for t in outs:
                    if t.requires_grad and id(t) not in seen:
                        seen.add(id(t))
                        # A tensor hook sees the gradient w.r.t. the value at registration, even
                        # if a later op modifies the tensor in place.
                        self.handles.append(t.register_hook(self._grad_hook(call, "out")))

        return hook

    # --- backward ---
    def _grad_hook(self, call: _Call, side: str):
        def hook(grad: Tensor) -> None:
            self.seq += 1
            if side == "out":
                call.gout_seen = True
                if call.gout_bad_seq is None and _nonfinite(grad):
                    call.gout_bad_seq = self.seq
            elif call.gin_bad_seq is None and _nonfinite(grad):
                call.gin_bad_seq = self.seq

        return hook

    def _param_hook(self, index: int):
        def hook(grad: Tensor) -> None:
            self.seq += 1
            if index not in self.param_bad and _nonfinite(grad):
                self.param_bad[index] = self.seq

        return hook

    def arm(self) -> None:
        for name, module in self.modules:
            try:
                pre = module.register_forward_pre_hook(self._pre(name), with_kwargs=True)
            except (RuntimeError, TypeError, AttributeError):  # a scripted module takes no hooks
                self.unhooked.append(name)
                continue
            self.handles.append(pre)
            self.handles.append(module.register_forward_hook(self._post(name)))
        ids: dict[int, int] = {}
        for name, module in self.modules:
            for p in module.parameters(recurse=False):
                if id(p) not in ids:
                    ids[id(p)] = len(ids)
                    if p.requires_grad:
                        self.handles.append(p.register_hook(self._param_hook(ids[id(p)])))
                self.owners.setdefault(ids[id(p)], []).append(name)
        self.param_names = {ids[id(p)]: n for n, p in self.model.named_parameters() if id(p) in ids}

    def disarm(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def backward_origin(self) -> tuple[str, list[str], dict[str, Any]] | None:
        """The module that turned a finite gradient non-finite (the deepest such, earliest)."""
        by_module = self._calls_by_module()
        bad_params = self._bad_params_by_owner()
        makers = self._makers(by_module, bad_params)
        path = self._backward_path()
        if not makers:
            return self._origin_without_maker(by_module, path)
        origin = _innermost_maker(makers)
        detail = self._maker_detail(origin, by_module[origin], bad_params)
        return origin, [origin, *[p for p in path if p != origin]], detail

    def _calls_by_module(self) -> dict[str, list[_Call]]:
        """Each module's calls; on the way, marks every call enclosing one that received a
        non-finite output gradient (``inner_bad_seq``)."""
        by_module: dict[str, list[_Call]] = {}
        for c in self.calls:
            by_module.setdefault(c.name, []).append(c)
            if c.gout_bad_seq is not None:
                up = c.parent
                while up is not None:
                    if up.inner_bad_seq is None or c.gout_bad_seq < up.inner_bad_seq:
                        up.inner_bad_seq = c.gout_bad_seq
                    up = up.parent
        return by_module

    def _bad_params_by_owner(self) -> dict[str, list[tuple[int, int]]]:
        """Module name -> (seq, param index) of each of its parameters whose gradient went
        non-finite."""
        bad_params: dict[str, list[tuple[int, int]]] = {}
        for i, seq in self.param_bad.items():
            for owner in self.owners.get(i, []):
                bad_params.setdefault(owner, []).append((seq, i))
        return bad_params

    @staticmethod
    def _makers(
        by_module: dict[str, list[_Call]], bad_params: dict[str, list[tuple[int, int]]]
    ) -> dict[str, int]:
        """Module -> seq of the first non-finite gradient it made."""
        makers: dict[str, int] = {}
        for name, calls in by_module.items():
            # A call that received only finite output gradients, yet its own input gradient, or
            # the output gradient of a call inside it, came non-finite: the NaN was made inside.
            seqs = [
                min(s for s in (c.gin_bad_seq, c.inner_bad_seq) if s is not None)
                for c in calls
                if c.gout_bad_seq is None and (c.gin_bad_seq, c.inner_bad_seq) != (None, None)
            ]
            # Its parameters' gradients went non-finite while every gradient it received was
            # finite: it made them (its weight-gradient computation, or a hook on it).
            if name in bad_params and all(c.gout_bad_seq is None for c in calls):
                seqs.append(min(s for s, _ in bad_params[name]))
            if seqs:
                makers[name] = min(seqs)
        return makers

    def _origin_without_maker(
        self, by_module: dict[str, list[_Call]], path: list[str]
    ) -> tuple[str, list[str], dict[str, Any]] | None:
        """The origin when no module made a non-finite gradient itself: the loss, a parameter's
        owner, or None when nothing was non-finite."""
        if not self.param_bad and not path:
            return None
        root_calls = by_module.get(ROOT, [])
        if root_calls and any(c.gout_bad_seq is not None for c in root_calls):
            # Non-finite already at the model's output: the loss's backward made it.
            return (
                LOSS,
                path,
                {"note": "the gradient of the loss w.r.t. the model's output is non-finite"},
            )
        _seq, i = min((s, i) for i, s in self.param_bad.items())
        origin = self.owners.get(i, [f"param.{i}"])[0]
        return (
            origin,
            [origin, *[p for p in path if p != origin]],
            {
                "note": "only parameter gradients were seen non-finite; no module call was",
                "param": self.param_names.get(i, f"param.{i}"),
            },
        )

    def _maker_detail(
        self, origin: str, calls: list[_Call], bad_params: dict[str, list[tuple[int, int]]]
    ) -> dict[str, Any]:
        """What the backward saw around the module that made the non-finite gradient."""
        module = dict(self.modules)[origin]
        detail: dict[str, Any] = {
            "module_type": type(module).__name__,
            "calls": len(calls),
            "grad_output_finite": all(c.gout_bad_seq is None for c in calls),
            "grad_input_finite": all(c.gin_bad_seq is None for c in calls),
            "param_grads_finite": origin not in bad_params,
        }
        if origin in bad_params:
            detail["bad_params"] = sorted(
                self.param_names.get(i, f"param.{i}") for _, i in bad_params[origin]
            )
        # Which submodule's output first received the non-finite gradient: the fault sits between
        # that submodule and the origin's own output (the origin's own code, when it has children).
        inner_bad = sorted(
            (c.gout_bad_seq, c.name)
            for c in self.calls
            if c.gout_bad_seq is not None and _inside(c.name, origin)
        )
        if inner_bad:
            detail["first_bad_grad_output"] = inner_bad[0][1]
        return detail

    def _backward_path(self) -> list[str]:
        events = sorted((c.gout_bad_seq, c.name) for c in self.calls if c.gout_bad_seq is not None)
        return list(dict.fromkeys(n for _, n in events))


def _stochastic(model: nn.Module) -> list[str]:
    out = []
    for n, m in model.named_modules():
        drop = isinstance(m, nn.modules.dropout._DropoutNd) or (
            isinstance(m, nn.RNNBase) and m.dropout > 0
        )
        if drop and m.training:
            out.append(n or ROOT)
    return out


def _grad_norm(params: Sequence[Tensor]) -> float:
    """The global L2 norm of the replay's gradients of ``params`` (float64, overflow-free:
    exact enough to compare with the step's own norm; inf/NaN when a gradient is non-finite)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(scaled_l2(exact_norms(grads, torch.device("cpu"))))


def replay(
    model: nn.Module,
    closure: Callable[[], Tensor],
    *,
    activations: bool = True,
    measure: Sequence[Tensor] | None = None,
) -> Localization:
    """Re-run one step's computation and find the module where a NaN/Inf starts.

    ``closure()`` recomputes the step's loss from the same batch and returns it (a scalar tensor),
    e.g. ``lambda: loss_fn(model(x), y)``; it must not call ``backward()`` or step an optimizer:
    replay calls ``backward()`` itself. Hooks are armed on every submodule for this call only:

    * forward (``activations=True``): the first module, in execution order, whose output holds a
      NaN/Inf is the origin (phase ``forward``); if a module's *input* is already non-finite when
      it starts, the enclosing module's own code made it (``(input)``: the batch). A finite
      forward with a non-finite loss gives ``(loss)``. ``activations=False`` skips these checks
      (one host read per module output) and looks at the loss and the backward only.
    * backward (only when the loss is finite): each module's gradient w.r.t. its outputs, its own
      contribution to the gradient w.r.t. its inputs (through a view of each input; full backward
      hooks are not used: they break on in-place ops such as ``ReLU(inplace=True)``) and its
      parameters' gradients. The origin is the innermost module that received finite output
      gradients and produced a non-finite input or parameter gradient (phase ``backward``);
      ``(loss)`` when the gradient is non-finite already at the model's output. A module called
      several times (a shared activation, an RNN cell in a loop) is judged per call.

    When a forward activation is non-finite but the loss is finite (a masked Inf), the phase is
    still ``forward``; the backward result, if any, is in ``detail["backward"]``.

    ``detail["loss"]`` is the replay's loss and ``detail["grad_norm"]`` the global L2 norm of the
    replay's gradients of ``measure`` (default: every parameter of the model; the Guard passes the
    parameters it guards), or None when the backward did not run (a non-finite loss): what the
    Guard's rerun attribution compares with the step's own (:func:`attribute`).

    The model is left as it was: every buffer (BatchNorm running stats, ``num_batches_tracked``)
    is restored, each parameter's ``.grad`` is the same tensor as before (``None`` stays ``None``),
    train/eval flags and the RNG state are restored, and every hook is removed, also when the
    closure raises (the exception propagates). Parameters are not touched: nothing steps.

    Caveats: modules run without ``__call__`` (``module.forward(x)``, or a weight used
    functionally) are invisible; activation checkpointing re-runs forwards during backward, which
    adds calls; and :data:`REPLAY_NOTE`: random layers draw new masks unless the closure seeds
    them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replay needs the nn.Module being trained, got {type(model).__name__}")
    params = list(model.parameters())
    saved = _SavedState.of(model, params)
    stochastic = _stochastic(model)
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    run = _Replay(model, activations)
    try:
        with torch.random.fork_rng(devices=cuda):
            step = _rerun_step(run, closure, params, measure)
    finally:
        run.disarm()
        saved.restore()
    return _localize_replay(run, step, stochastic)


@dataclass
class _SavedState:
    """What a replay changes on the model, to put back: gradients, buffers, train/eval flags."""

    grads: list[tuple[nn.Parameter, Tensor | None]]
    buffers: list[tuple[nn.Module, str, Tensor | None, Tensor | None]]
    modes: list[tuple[nn.Module, bool]]

    @classmethod
    def of(cls, model: nn.Module, params: list[nn.Parameter]) -> _SavedState:
        return cls(
            grads=[(p, p.grad) for p in params],
            buffers=[
                (m, name, b, None if b is None else b.detach().clone())
                for m in model.modules()
                for name, b in m._buffers.items()
            ],
            modes=[(m, m.training) for m in model.modules()],
        )

    def restore(self) -> None:
        with torch.no_grad():
            for m, name, b, copy in self.buffers:
                m._buffers[name] = b
                if b is not None and copy is not None:
                    b.copy_(copy)
        for p, g in self.grads:
            p.grad = g
        for m, mode in self.modes:
            m.training = mode


@dataclass
class _RerunStep:
    """What the replayed step computed: its loss, and the backward's origin and gradient norm
    (None when the backward did not run)."""

    loss: Tensor
    loss_value: float
    backward: tuple[str, list[str], dict[str, Any]] | None
    grad_norm: float | None


def _rerun_step(
    run: _Replay,
    closure: Callable[[], Tensor],
    params: list[nn.Parameter],
    measure: Sequence[Tensor] | None,
) -> _RerunStep:
    """Arm the hooks, run the closure and, when its loss is finite, the backward."""
    for p in params:
        p.grad = None  # the replay's gradients must not add to the step's
    run.arm()
    loss = closure()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(
            "replay's closure must return the loss as a scalar tensor, got "
            f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else list(loss.shape)}"
        )
    loss_value = float(loss.detach().float())
    backward = None
    rerun_norm = None
    if math.isfinite(loss_value) and loss.requires_grad:
        loss.backward()
        backward = run.backward_origin()
        mine = {id(p) for p in params}
        rerun_norm = _grad_norm(
            [p for p in (params if measure is None else measure) if id(p) in mine]
        )
    return _RerunStep(loss, loss_value, backward, rerun_norm)


def _localize_replay(run: _Replay, step: _RerunStep, stochastic: list[str]) -> Localization:
    """The replay's result: the forward's origin, else the loss, else the backward's."""
    detail = _replay_detail(run, step, stochastic)
    first = run.forward_first
    backward = step.backward
    if first is not None:
        origin = first.pop("origin")
        detail.update(first)
        if backward is not None:
            detail["backward"] = {"origin": backward[0], "path": backward[1][:8]}
        path = [origin, *[n for n in run.forward_path if n != origin]]
        return Localization(origin, "forward", path[:PATH_LIMIT], detail)
    if not math.isfinite(step.loss_value):
        detail["note_loss"] = (
            "every module output was finite; the loss function made the non-finite value"
            if run.activations
            else "the loss is non-finite; replay with activations=True to find the module"
        )
        return Localization(LOSS, "forward", [LOSS], detail)
    if backward is not None:
        origin, path, more = backward
        detail.update(more)
        return Localization(origin, "backward", path[:PATH_LIMIT], detail)
    return Localization("", "none", [], detail)


def _replay_detail(run: _Replay, step: _RerunStep, stochastic: list[str]) -> dict[str, Any]:
    """The detail every replay result carries: loss, gradient norm, and what was not checked."""
    detail: dict[str, Any] = {
        "loss": step.loss_value,
        "grad_norm": step.grad_norm,
        "modules": len(run.modules),
    }
    if run.unhooked:
        detail["unhooked"] = run.unhooked[:PATH_LIMIT]
    if stochastic:
        detail["stochastic"] = stochastic[:PATH_LIMIT]
        detail["note"] = REPLAY_NOTE
    if not step.loss.requires_grad:
        detail["backward"] = "skipped: the loss does not require grad"
    return detail


# ----- rerun attribution: transient or reproducible -------------------------------------------------

TRANSIENT = "transient"  # the rerun did not reproduce it: hardware, nondeterminism
REPRODUCIBLE = "reproducible"  # the rerun did: the data or the model

#: How close a rerun's gradient norm (and loss) must be to the step's own for a finite spike to
#: count as reproduced: relative 1e-2. Megatron-LM's ``validate_result`` takes a tolerance on the
#: relative difference too (0 by default, for deterministic kernels); 1e-2 absorbs the
#: nondeterminism of reduction order on accelerators (~1e-6) with a wide margin, and is far below
#: the factor of a spike (skip_spike's 6 sigma, ZClip's z-score of 2.5).
RERUN_RTOL = 1e-2


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(abs(a), abs(b))


def attribute(
    trigger: str,
    norm: float,
    loss: float | None,
    rerun: Localization,
    rtol: float = RERUN_RTOL,
) -> str:
    """Classify a failing step from its rerun, in the terms of Megatron-LM's rerun state machine
    (its rule; not tested against its code, which needs Megatron's training loop): the same
    result again is ``"reproducible"`` (the data or the model), a different one ``"transient"``
    (a hardware fault, nondeterminism).

    ``trigger``: ``"nonfinite"`` (the step's gradient or loss was NaN/Inf) or ``"spike"`` (a finite
    outlier a policy flagged); ``norm``, ``loss``: the step's own gradient norm (before mitigation)
    and loss; ``rerun``: :func:`replay`'s result. A non-finite step is reproducible when the rerun's
    loss or gradient norm is non-finite again. A spike is reproducible when the rerun is
    non-finite, or its gradient norm, and its loss when both are known, are within ``rtol``
    (relative) of the step's.
    """
    if trigger not in ("nonfinite", "spike"):
        raise ValueError(f"trigger must be 'nonfinite' or 'spike', got {trigger!r}")
    r_loss = rerun.detail.get("loss")
    r_norm = rerun.detail.get("grad_norm")
    bad = (r_loss is not None and not math.isfinite(r_loss)) or (
        r_norm is not None and not math.isfinite(r_norm)
    )
    if bad:
        return REPRODUCIBLE
    if trigger == "nonfinite" or r_norm is None:
        return TRANSIENT
    same = _close(norm, r_norm, rtol)
    if loss is not None and r_loss is not None:
        same = same and _close(loss, r_loss, rtol)
    return REPRODUCIBLE if same else TRANSIENT
