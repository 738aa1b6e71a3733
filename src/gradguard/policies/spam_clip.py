"""SPAM's element-wise spike clip ("SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
Training", arXiv 2501.06842), as ``pytorch-optimizer``'s ``SPAM`` optimizer (v4.1.0,
``pytorch_optimizer/optimizer/spam.py``) clips its gradients, for any Adam-family optimizer: each
gradient entry is held to ``sqrt(theta * v)``, ``v`` the optimizer's own second moment."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import torch
from ..errors import ConfigError, SpecError
from .base import Policy, StepContext
from .registry import register

if TYPE_CHECKING:
    from ..layout import ParamLayout


def _torch_with_v() -> tuple[type, ...]:
    """torch optimizers that keep Adam's second moment ``exp_avg_sq`` (and a per-parameter
    ``step``)."""
    return (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)


@register
class spam_clip(Policy):
    """Clip gradient spikes element-wise against the optimizer's second moment (SPAM).

    Per parameter with Adam's second-moment buffer ``v`` (``exp_avg_sq``, as the optimizer holds
    it before this step: raw, not bias-corrected, as SPAM reads it), every entry with
    ``g^2 > theta * v`` becomes ``sign(g) * sqrt(theta * v)``; the others are untouched. As in
    SPAM the clip waits for ``v`` to hold some history: it acts on a parameter from its
    ``warmup``-th optimizer step on (the optimizer's ``step`` count >= ``warmup - 1`` before this
    step; SPAM's ``grad_accu_steps``), never on its first step (no ``v`` yet).

    Defaults are pytorch-optimizer's (``theta=5000`` = SPAM's ``threshold``, ``warmup=20`` =
    ``grad_accu_steps``). ``Guard(model, torch.optim.Adam(..., eps=0), "spam_clip")`` takes the
    same steps as ``pytorch_optimizer.SPAM(..., eps=0, weight_decay=0)`` with ``update_proj_gap``
    longer than the run (no momentum reset). Tested against the package
    (``tests/policies/test_spam_clip.py``), and the clip alone against SPAM's on the same inputs.
    Where they differ:

    - An entry whose ``v`` is exactly 0 is never clipped. SPAM clips it to
      ``sign(g) * 0 = 0``, and since a zero then enters ``v``, that entry never moves again (an
      embedding row first used after the warmup, an entry right after a momentum reset).
    - The warmup is counted per parameter, from the optimizer's own ``step`` (torch's Adam family
      keeps one per parameter), so it restarts whenever that count does: after
      ``reset_moments``' resets with its default ``reset_step=True`` (periodic, ``every=N``,
      SPAM's schedule, or spike-triggered) the clip pauses for ``warmup - 1`` steps, the reset
      step included. SPAM counts one global step and pauses ``warmup`` steps after each periodic
      reset, one more (it does not pause again where a step count restarts without a reset). With
      ``reset_moments:reset_step=False`` the count does not restart and the clip resumes on the
      step after the reset, against a ``v`` that holds one gradient (bound ``sqrt(theta *
      (1 - beta2)) |g_prev|``): keep the default ``reset_step=True``. Put ``reset_moments`` first
      in the spec (``reset_moments:every=500+spam_clip``) so that the clip sees the reset ``v``;
      after it, the clip on a reset step still reads the old ``v``.
    - Only the clip: SPAM's Adam update differs from torch's where ``eps > 0`` (SPAM adds ``eps``
      to the raw ``sqrt(v)`` and scales the step by ``sqrt(1 - beta2^t)``, torch adds it to the
      bias-corrected ``sqrt(v)``; equal with ``eps=0``), its weight decay multiplies the weights
      after the update (``AdamW`` before it), its LR ramp after each reset (``warmup_epoch``) and
      its sparse update masks (``density < 1``) are not here.
    - ``theta`` must be > 0 (SPAM's ``threshold=0`` turns the clip off: leave ``spam_clip`` out).
    - With ``amsgrad=True`` the clip still reads ``exp_avg_sq``, not ``max_exp_avg_sq``.

    Refused with a :class:`~gradguard.errors.ConfigError`: an optimizer without ``exp_avg_sq``
    (SGD, RMSprop, Adagrad, Adamax: at construction; another one as soon as its state shows it
    has none, before the clip), complex or sparse gradients. An optimizer without a per-parameter
    ``step`` is clipped from its second step on (no warmup can be counted).

    Per step: a few ``torch._foreach`` ops per (device, dtype) group and one ``where`` per
    tensor, on the parameters past their warmup; the norms are re-measured (one more pass). No
    host sync (a ``step`` kept on the device, as fused/capturable Adam keeps it, is compared
    there). Stateless: what it reads is the optimizer's state.
    Metric: ``spam_clip.clipped``, how many entries were clipped this step (a 0-dim tensor).
    """

    name = "spam_clip"
    keras_refusal = (
        "it clips each gradient entry against the optimizer's own second moment (Adam's "
        "exp_avg_sq), which a Keras optimizer keeps under its own names and layout, and it counts "
        "its warmup from the per-parameter step torch's Adam keeps (Keras shares one iteration "
        "counter); in Keras clip globally with adaptive_clip or element-wise with clip_value"
    )

    def __init__(self, theta: float = 5000.0, warmup: int = 20):
        super().__init__()
        if (
            not isinstance(theta, (int, float))
            or isinstance(theta, bool)
            or not theta > 0
            or theta == float("inf")
        ):
            raise SpecError(
                f"theta must be a finite number > 0, got {theta!r} (e.g. spam_clip:theta=5000)"
            )
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise SpecError(
                f"warmup must be an integer >= 0, got {warmup!r} (e.g. spam_clip:warmup=20)"
            )
        self.theta = float(theta)
        self.warmup = warmup

    def bind(self, layout: ParamLayout, optimizer: torch.optim.Optimizer) -> None:
        complex_ = [n for n, p in zip(layout.names, layout.params, strict=True) if p.is_complex()]
        if complex_:
            raise ConfigError(
                f"spam_clip cannot clip complex gradients ({', '.join(complex_[:3])}): the sign of "
                "a complex entry is undefined (SPAM refuses complex parameters too); use clip_norm"
            )
        if any("exp_avg_sq" in s for s in optimizer.state.values()):
            return
        if isinstance(optimizer, _torch_with_v()):
            return
        kind = type(optimizer)
        if kind.__module__.startswith("torch.optim") or "betas" not in optimizer.defaults:
            raise self._refusal(kind.__name__)

    @staticmethod
    def _refusal(kind: str) -> ConfigError:
        return ConfigError(
            f"spam_clip needs Adam's second moment (the optimizer state 'exp_avg_sq'), which "
            f"{kind} does not keep: the clip bounds each gradient entry by sqrt(theta * v). Use an "
            "Adam-family optimizer (torch.optim.Adam, AdamW, NAdam, RAdam), or an element-wise "
            "clip that needs no moment (clip_value:limit=...) or a norm clip (zclip, clip_norm)"
        )

    def apply(self, ctx: StepContext) -> None:
        stats = ctx.stats
        if not stats.grads:
            return
        opt_state = ctx.optimizer.state
        params = stats.layout.params
        lo = self.warmup - 1  # the optimizer's step count (before this step) from which it clips
        clipped: list[torch.Tensor] = []
        entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for grp in stats.groups:
            gs, vs, gates, ks = [], [], [], []
            for g, k in zip(grp.grads, grp.index, strict=True):
                st = opt_state.get(params[stats.param_index[k]])
                if not st:
                    continue  # its first step: no second moment yet
                v = st.get("exp_avg_sq")
                if not isinstance(v, torch.Tensor):
                    raise self._refusal(type(ctx.optimizer).__name__)
                step = st.get("step")
                gate = None
                if isinstance(step, torch.Tensor) and step.device.type != "cpu":
                    gate = step >= lo  # kept on the device: no sync
                elif step is not None and float(step) < lo:
                    continue
                if g.is_sparse:
                    raise ConfigError(
                        "spam_clip cannot clip sparse gradients: it works entry by entry against "
                        "a dense second moment (torch's Adam refuses sparse gradients too; "
                        "SparseAdam's moments are not read here)"
                    )
                gs.append(g)
                vs.append(v.to(g.dtype) if v.dtype != g.dtype else v)
                gates.append(gate)
                ks.append(k)
            if not gs:
                continue
            limits = torch._foreach_mul(vs, self.theta)  # theta * v, as SPAM computes it
            bounds = torch._foreach_sqrt(limits)
            squares = torch._foreach_mul(gs, gs)
            torch._foreach_mul_(bounds, torch._foreach_sign(gs))  # sign(g) * sqrt(theta * v)
            for k, v, lim, sq, b, gate in zip(ks, vs, limits, squares, bounds, gates, strict=True):
                hit = (sq > lim) & (v > 0)
                if gate is not None:
                    hit &= gate
                entries[k] = (hit, b)
                clipped.append(hit.sum())
        if not clipped:
            ctx.metrics["spam_clip.clipped"] = 0.0
            return
        before = stats.param_norms
        stats.replace_entries_(
            entries
        )  # the clipped entries set to their bounds, norms re-measured
        changed = stats.param_norms < before
        ctx.record(self.name, changed.any(), stats.layer_norms(changed.float()) > 0)
        ctx.metrics["spam_clip.clipped"] = torch.stack([c.to(stats.device) for c in clipped]).sum()
