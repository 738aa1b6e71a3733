"""QK-Clip (MuonClip, Kimi K2, arXiv 2507.20534; Megatron-LM's ``clip_qk``): after each step,
scale each attention head's query and key weights down so that its largest pre-softmax logit of
the step would have been ``tau``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .._lazy import torch
from ..errors import ConfigError, SpecError
from .base import Policy, RowScale, StepContext, UpdateDecision
from .clip import _check_positive
from .registry import register

if TYPE_CHECKING:
    from ..attention import AttentionSite, LogitMeter
    from ..layout import ParamLayout
    from ..updates import UpdateStats

_FIX = (
    "qk_clip clips the query and key weights of attention heads it can find: "
    "nn.MultiheadAttention, a module with q_proj/k_proj Linear children and a head count "
    "(num_heads, num_attention_heads or config.num_attention_heads), or a fused qkv Linear laid "
    "out q|k|v with a head count (n_heads, num_heads). Declare any other attention with "
    "gradguard.register_attention(module, heads=..., q=..., k=...) before building the Guard, "
    "or drop qk_clip from the chain"
)


@register
class qk_clip(Policy):
    """Bound each attention head's max pre-softmax logit: after the step, per head ``h``,
    ``gamma_h = min(1, tau / S_max_h)`` with ``S_max_h`` the head's largest logit ``q.k * scale``
    in this step's forward (over the batch and the positions its mask allows; the max over the
    micro-batches when accumulating); the head's query weight rows are multiplied by
    ``gamma_h ** alpha`` and its key weight rows by ``gamma_h ** (1 - alpha)``, so that the same
    inputs would give a max logit of ``tau``. The QK-Clip of MuonClip (Kimi K2, arXiv 2507.20534)
    and of Megatron-LM's ``clip_qk`` (``megatron/core/transformer/attention.py``,
    ``SelfAttention.clip_qk``), whose defaults these are: ``tau=100`` (``qk_clip_threshold``),
    ``alpha=0.5`` (``qk_clip_alpha``). It targets attention-logit growth, which gradient
    clipping does not bound; unlike qk-layernorm it changes nothing in the model.

    As Megatron-LM: the weights are scaled, not their biases (``bias=True`` scales the q/k
    biases' rows too, which makes the bound exact for a biased projection); under grouped-query
    attention each key head and the query heads that share it are clipped as one, by the
    ``gamma`` of the group's largest logit; the optimizer's state is left as it is; heads at or
    below ``tau`` are multiplied by exactly 1.0 (bit-identical). A step the Guard skips or rolls
    back clips nothing. Under ``torch.distributed`` the maxima are reduced (max) over ranks first,
    so every replica scales alike. With a norm on q and k (qk-layernorm) the logit does not scale
    with the weights and the clip cannot bound it.

    The attention modules are found when the Guard is built (``nn.MultiheadAttention``; modules
    with ``q_proj``/``k_proj`` Linear children and a head count, grouped-query included; a fused
    ``qkv`` Linear laid out q|k|v; anything declared with
    :func:`gradguard.register_attention`); a chain with ``qk_clip`` and none raises
    :class:`~gradguard.errors.ConfigError`. The logits are measured exactly, inside each attention
    module's forward, from its call to ``F.scaled_dot_product_attention``,
    ``F.multi_head_attention_forward`` or its softmax (:mod:`gradguard.attention`), in forwards run
    with gradients enabled; the cost is one extra ``q @ k^T`` per attention call, in float32
    (measured by ``benchmarks/bench_qk_clip_overhead.py``). Torch only.

    State: ``max_logits`` (each query head's last measured max logit, attention modules in model
    order), ``clipped`` (how many steps each head was clipped), ``steps`` (steps measured). Metrics:
    ``qk_clip.max_logit`` (the step's largest), ``qk_clip.max_logit.<module>`` (per attention
    module), ``qk_clip.clipped`` (query heads scaled this step). No host read.
    """

    name = "qk_clip"
    keras_refusal = (
        "it reads each attention head's max logit inside the model's forward (hooks on the torch "
        "attention modules) and rescales the query and key weights after the step, which a Keras "
        "optimizer cannot reach from inside its compiled step; in Keras bound the logits in the "
        "model (a LayerNorm on the queries and keys)"
    )
    kind = "update"
    nonnegative = frozenset({"clipped", "steps"})

    def __init__(self, tau: float = 100.0, alpha: float = 0.5, bias: bool = False):
        super().__init__()
        _check_positive(self.name, "tau", tau)
        if (
            not isinstance(alpha, (int, float))
            or isinstance(alpha, bool)
            or not 0.0 <= alpha <= 1.0
        ):
            raise SpecError(
                f"alpha must be a number in [0, 1] (the query's share of the clip), got "
                f"{alpha!r} (e.g. qk_clip:alpha=0.5)"
            )
        if not isinstance(bias, bool):
            raise SpecError(f"bias must be true or false, got {bias!r}")
        self.tau = float(tau)
        self.alpha = float(alpha)
        self.bias = bias
        self.state = {
            "max_logits": torch.zeros(0),
            "clipped": torch.zeros(0, dtype=torch.long),
            "steps": 0,
        }
        self._meter: LogitMeter | None = None
        self._plan: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ----- finding the heads -------------------------------------------------------------------------
    def bind(self, layout: ParamLayout, optimizer: torch.optim.Optimizer) -> None:
        from ..attention import LogitMeter, find_attention  # torch's function modes: on use

        if self._meter is not None:
            self._meter.close()
            self._meter = None
        model = layout.module
        if model is None:
            raise ConfigError(f"qk_clip needs the model: Guard(model, optimizer, ...); {_FIX}")
        guarded = {id(p) for p in layout.params}
        sites = [s for s in find_attention(model) if id(s.q) in guarded and id(s.k) in guarded]
        if not sites:
            raise ConfigError(
                f"qk_clip: no attention module found in {type(model).__name__}; {_FIX}"
            )
        for s in sites:
            for w in (s.q, s.k):
                if type(w).__name__ == "DTensor":
                    raise ConfigError(
                        f"qk_clip: the q/k weights of {s.name} are sharded (DTensor); scaling "
                        "a head's rows of a sharded weight is not supported"
                    )
        self._sites = sites
        self._build_plan(sites)
        dev = sites[0].q.device
        n = sum(s.heads for s in sites)
        st = self.state
        if st["max_logits"].shape != (n,):
            st["max_logits"] = torch.zeros(n, device=dev)
            st["clipped"] = torch.zeros(n, dtype=torch.long, device=dev)
        self._meter = LogitMeter(sites)

    def _build_plan(self, sites: list[AttentionSite]) -> None:
        """For each weight (and bias, with ``bias=True``) holding q or k rows: the index of each
        row's factor in the step's factor vector ``[q heads..., kv groups..., 1.0]``."""
        n_q = sum(s.heads for s in sites)
        n_g = sum(s.kv_heads for s in sites)
        one = n_q + n_g
        index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def rows_of(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in index:
                index[id(t)] = (t, torch.full((t.shape[0],), one, dtype=torch.long))
            return index[id(t)][1]

        group_of: list[int] = []
        qo = go = 0
        for s in sites:
            per_group = s.heads // s.kv_heads
            pairs = [(s.q, s.k)] + ([(s.q_bias, s.k_bias)] if self.bias else [])
            for q, k in pairs:
                if q is not None:
                    idx = rows_of(q)
                    for h, r in enumerate(s.q_rows):
                        idx[r.start : r.stop] = qo + h
                if k is not None:
                    idx = rows_of(k)
                    for g, r in enumerate(s.k_rows):
                        idx[r.start : r.stop] = n_q + go + g
            group_of += [go + h // per_group for h in range(s.heads)]
            qo += s.heads
            go += s.kv_heads
        self._plan = [(t, idx.to(t.device)) for t, idx in index.values()]
        dev = sites[0].q.device
        self._group_of = torch.tensor(group_of, dtype=torch.long, device=dev)
        self._n_groups = n_g

    # ----- the step ------------------------------------------------------------------------------------
    def apply(self, ctx: StepContext) -> None:
        """Nothing before the step: the clip acts after it (:meth:`decide_update`)."""

    def decide_update(self, ctx: StepContext, update: UpdateStats | None) -> UpdateDecision | None:
        sites = self._sites
        for s in sites:
            if s.ran and s.max_logit is None:
                raise ConfigError(
                    f"qk_clip: {s.name} ran its forward but no attention logits were seen (it "
                    "calls neither F.scaled_dot_product_attention nor a softmax over (batch, "
                    "heads, queries, keys) scores); pass them from its forward with "
                    "gradguard.record_attention_logits(module, logits)"
                )
        if not any(s.max_logit is not None for s in sites):
            return None  # no forward with gradients since the last step: nothing measured
        st = self.state
        dev = st["max_logits"].device
        maxima = torch.cat(
            [
                torch.full((s.heads,), -math.inf, device=dev)
                if s.max_logit is None
                else s.max_logit.to(dev)
                for s in sites
            ]
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
        gamma, scaled = qk_factors(maxima, self._group_of, self._n_groups, self.tau)
        factors = torch.cat(
            [gamma[self._group_of].pow(self.alpha), gamma.pow(1.0 - self.alpha), gamma.new_ones(1)]
        )
        row_scale = [RowScale(t, factors[idx]) for t, idx in self._plan]
        scaled_q = scaled[self._group_of]
        st["max_logits"] = torch.where(torch.isfinite(maxima), maxima, st["max_logits"])
        st["clipped"] = st["clipped"] + scaled_q.long()
        st["steps"] += 1
        metrics: dict[str, float | torch.Tensor] = {
            "qk_clip.max_logit": maxima.max(),
            "qk_clip.clipped": scaled_q.sum().float(),
        }
        at = 0
        for s in sites:
            if s.max_logit is not None:
                metrics[f"qk_clip.max_logit.{s.name}"] = maxima[at : at + s.heads].max()
            at += s.heads
        return UpdateDecision(row_scale=row_scale, acted=scaled.any(), metrics=metrics)

    def after_step(self, ctx: StepContext, stepped: bool) -> None:
        """The next step measures its own forward (a skipped step's logits are dropped too)."""
        if self._meter is not None:
            self._meter.reset()

    def close(self) -> None:
        if self._meter is not None:
            self._meter.close()
            self._meter = None

    @property
    def sites(self) -> list[AttentionSite]:
        """The attention modules this policy clips (after the Guard bound it)."""
        return list(getattr(self, "_sites", []))


def qk_factors(
    max_logits: torch.Tensor, group_of: torch.Tensor, n_groups: int, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key-head group, ``gamma = min(1, tau / S)`` with ``S`` the largest logit of the query
    heads in the group (``group_of[h]``: query head ``h``'s group; one head per group without
    grouped-query attention), and whether it is below 1. A max of ``tau`` or less (or NaN, or
    none measured: -inf) gives exactly 1.0."""
    s = torch.full((n_groups,), -math.inf, device=max_logits.device).scatter_reduce(
        0, group_of, max_logits.float(), reduce="amax"
    )
    over = s > tau
    return torch.where(over, tau / s, torch.ones_like(s)), over
