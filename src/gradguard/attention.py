"""Where a model's attention heads are, and what their largest pre-softmax logit was: what
``qk_clip`` reads.

An :class:`AttentionSite` names one attention module, its query heads and key heads and the rows
of the weights that compute each head's queries and keys. :func:`find_attention` finds them in
``nn.MultiheadAttention``, in Hugging Face-style modules (``q_proj``/``k_proj`` Linear children and a
head count) and in modules with a fused ``qkv`` Linear laid out q|k|v (the bench's GPT, nanoGPT and
timm style); :func:`register_attention` declares any other.

:class:`LogitMeter` measures, exactly, the logits the model uses: a forward pre-hook and a forward
hook on each attention module enter a :class:`torch.overrides.TorchFunctionMode` for that module's
forward only, which sees its call to ``F.scaled_dot_product_attention`` (the queries and keys after
any q/k norm or rotary, the mask, the scale), to ``F.multi_head_attention_forward`` (the
in-projection's arguments) or to a softmax over ``(batch, heads, queries, keys)`` scores (attention
written by hand, as Hugging Face's eager path is), and takes each head's maximum of ``q.k * scale``
over the batch and the positions the mask allows, in float32, without gradient. A module that
computes its softmax some other way (a fused kernel) reports its logits with
:func:`record_attention_logits`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .errors import ConfigError

#: The attribute :func:`register_attention` sets on a module.
_ATTR = "_gradguard_attention"
#: Scores materialized at once while measuring (float32 elements, 256 MiB): longer sequences are
#: measured a block of queries at a time.
_BLOCK = 1 << 26
_SOFTMAXES = (F.softmax, torch.softmax, Tensor.softmax)
_MHA_SIGNATURE = None


@dataclass(eq=False)
class AttentionSite:
    """One attention module: ``heads`` query heads and ``kv_heads`` key heads (fewer under
    grouped-query attention: query head ``h`` reads key head ``h // (heads // kv_heads)``, as
    ``repeat_interleave`` and ``scaled_dot_product_attention(enable_gqa=True)`` pair them).

    ``q``/``k``: the weights whose rows compute the queries/keys; ``q_rows[h]``/``k_rows[h]``: the
    rows of head ``h`` (a range of the first dimension); ``q_bias``/``k_bias``: their biases (rows
    indexed alike), if any. ``max_logit``: the largest logit of each query head seen since the last
    :meth:`reset` (None: none seen).
    """

    name: str
    module: nn.Module
    heads: int
    kv_heads: int
    q: Tensor
    q_rows: list[range]
    k: Tensor
    k_rows: list[range]
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    max_logit: Tensor | None = None
    #: A forward that will be trained on ran since the last reset (host flag, no sync).
    ran: bool = False
    how: str = ""
    _handles: list[Any] = field(default_factory=list, repr=False)

    def record(self, per_head: Tensor) -> None:
        """Fold one forward's per-head maxima into :attr:`max_logit` (no host read)."""
        per_head = per_head.detach().float().reshape(-1)
        if per_head.numel() != self.heads:
            raise ConfigError(
                f"qk_clip: the attention in {self.name} computed logits for {per_head.numel()} "
                f"heads where it was found with {self.heads}; register it with the right head "
                "count: gradguard.register_attention(module, heads=..., q=..., k=...)"
            )
        cur = self.max_logit
        self.max_logit = per_head if cur is None else torch.maximum(cur, per_head.to(cur.device))

    def reset(self) -> None:
        self.max_logit = None
        self.ran = False


# ----- declaring and finding attention ---------------------------------------------------------------
@dataclass(frozen=True)
class _Declared:
    heads: int
    kv_heads: int
    q: Tensor
    q_start: int
    k: Tensor
    k_start: int
    head_dim: int
    q_bias: Tensor | None
    k_bias: Tensor | None


def _weight_and_bias(x: Any, what: str) -> tuple[Tensor, Tensor | None]:
    if isinstance(x, nn.Linear):
        return x.weight, x.bias
    if isinstance(x, Tensor) and x.dim() >= 1:
        return x, None
    raise ConfigError(
        f"register_attention: {what} must be the nn.Linear (or the weight parameter, rows = "
        f"output features) that computes the {what}, got {type(x).__name__}"
    )


def register_attention(
    module: nn.Module,
    *,
    heads: int,
    q: nn.Linear | Tensor,
    k: nn.Linear | Tensor,
    kv_heads: int | None = None,
    q_rows: slice | None = None,
    k_rows: slice | None = None,
) -> nn.Module:
    """Declare ``module`` an attention whose heads ``qk_clip`` clips (for a layout it does not
    find by itself). Call it before building the Guard; returns ``module``.

    ``q``/``k``: the Linear (its weight and bias) or the weight that computes the queries/keys;
    ``q_rows``/``k_rows``: the rows of that weight holding every head's queries/keys, head after
    head (default: all its rows; e.g. ``slice(0, d)`` and ``slice(d, 2 * d)`` for a fused
    q|k|v projection). ``heads`` query heads, ``kv_heads`` key heads (default ``heads``).

    The max logit is measured inside the module's forward from its call to
    ``F.scaled_dot_product_attention`` or to a softmax over ``(batch, heads, queries, keys)``
    scores; a module that calls neither (a fused kernel) passes them with
    :func:`record_attention_logits`.

        gradguard.register_attention(block.attn, heads=8, q=block.attn.wqkv,
                                     k=block.attn.wqkv, q_rows=slice(0, 512),
                                     k_rows=slice(512, 1024))
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"register_attention needs an nn.Module, got {type(module).__name__}")
    kv_heads = heads if kv_heads is None else kv_heads
    for key, v in (("heads", heads), ("kv_heads", kv_heads)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"register_attention: {key} must be an integer >= 1, got {v!r}")
    if heads % kv_heads:
        raise ConfigError(
            f"register_attention: heads={heads} is not a multiple of kv_heads={kv_heads}"
        )
    qw, qb = _weight_and_bias(q, "queries")
    kw, kb = _weight_and_bias(k, "keys")
    qs = _rows(qw, q_rows, "q_rows")
    ks = _rows(kw, k_rows, "k_rows")
    if len(qs) % heads or len(ks) % kv_heads or len(qs) // heads != len(ks) // kv_heads:
        raise ConfigError(
            f"register_attention: {len(qs)} query rows for {heads} heads and {len(ks)} key rows "
            f"for {kv_heads} heads: each head needs the same number of query and key rows"
        )
    setattr(
        module,
        _ATTR,
        _Declared(heads, kv_heads, qw, qs.start, kw, ks.start, len(qs) // heads, qb, kb),
    )
    return module


def _rows(w: Tensor, rows: slice | None, what: str) -> range:
    r = range(w.shape[0])[rows if rows is not None else slice(None)]
    if rows is not None and (not isinstance(rows, slice) or r.step != 1 or not len(r)):
        raise ConfigError(
            f"register_attention: {what} must be a slice of consecutive rows of the weight, "
            f"got {rows!r}"
        )
    return r


def record_attention_logits(module: nn.Module, logits: Tensor) -> None:
    """For an attention module whose softmax ``qk_clip`` cannot see (a fused kernel): pass this
    forward's pre-softmax logits, ``(..., heads, queries, keys)`` with the positions the mask
    excludes at ``-inf``, or their per-head maxima, ``(heads,)``. A no-op when no ``qk_clip``
    measures ``module``."""
    sites = getattr(module, "_gradguard_sites", ())
    if not sites:
        return
    with torch.no_grad():
        per_head = logits if logits.dim() == 1 else _per_head_max(logits.float(), -3)
        for site in sites:
            site.record(per_head)


def _heads_of(m: nn.Module) -> int | None:
    for attr in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    v = getattr(getattr(m, "config", None), "num_attention_heads", None)
    return v if isinstance(v, int) and v > 0 else None


def _site(name, m, heads, kv_heads, q, q_start, k, k_start, head_dim, qb, kb, how):
    q_rows = [range(q_start + h * head_dim, q_start + (h + 1) * head_dim) for h in range(heads)]
    k_rows = [range(k_start + h * head_dim, k_start + (h + 1) * head_dim) for h in range(kv_heads)]
    return AttentionSite(name, m, heads, kv_heads, q, q_rows, k, k_rows, qb, kb, how=how)


def _find_one(name: str, m: nn.Module) -> AttentionSite | None:
    declared = getattr(m, _ATTR, None)
    if isinstance(declared, _Declared):
        dc = declared
        return _site(
            name, m, dc.heads, dc.kv_heads, dc.q, dc.q_start, dc.k, dc.k_start, dc.head_dim,
            dc.q_bias, dc.k_bias, "registered",
        )  # fmt: skip
    if isinstance(m, nn.MultiheadAttention):
        e, h = m.embed_dim, m.num_heads
        if m.in_proj_weight is not None:
            q = k = m.in_proj_weight
            ks = e
        else:
            q, k, ks = m.q_proj_weight, m.k_proj_weight, 0
        b = m.in_proj_bias
        return _site(name, m, h, h, q, 0, k, ks, e // h, b, b, "nn.MultiheadAttention")
    heads = _heads_of(m)
    if heads is None:
        return None
    children = dict(m.named_children())
    qp, kp, qkv = children.get("q_proj"), children.get("k_proj"), children.get("qkv")
    if isinstance(qp, nn.Linear) and isinstance(kp, nn.Linear):
        head_dim = getattr(m, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim <= 0:
            head_dim = qp.out_features // heads
        if head_dim * heads != qp.out_features or kp.out_features % head_dim:
            return None
        kv = kp.out_features // head_dim
        if not kv or heads % kv:
            return None
        return _site(
            name, m, heads, kv, qp.weight, 0, kp.weight, 0, head_dim, qp.bias, kp.bias,
            "q_proj/k_proj",
        )  # fmt: skip
    if isinstance(qkv, nn.Linear) and qkv.out_features % 3 == 0:
        d = qkv.out_features // 3
        if d % heads:
            return None
        w, b = qkv.weight, qkv.bias
        return _site(name, m, heads, heads, w, 0, w, d, d // heads, b, b, "fused qkv (q|k|v)")
    return None


def find_attention(model: nn.Module) -> list[AttentionSite]:
    """Every attention module of ``model`` this module knows how to clip (see the module
    docstring), in module order; a module inside a found one is not searched."""
    sites: list[AttentionSite] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        site = _find_one(name or "(root)", m)
        if site is not None:
            sites.append(site)
            inside.append(name)
            if not name:
                break
    return sites


# ----- measuring ---------------------------------------------------------------------------------------
def _per_head_max(scores: Tensor, head_dim: int) -> Tensor:
    """Max over every dimension but ``head_dim`` (negative) of ``scores``."""
    dims = [d for d in range(scores.dim()) if d != scores.dim() + head_dim]
    return scores.amax(dim=dims)


@overload
def _blocked_of(mask: Tensor, allowed_is_true: bool) -> Tensor: ...
@overload
def _blocked_of(mask: None, allowed_is_true: bool) -> None: ...
def _blocked_of(mask: Tensor | None, allowed_is_true: bool) -> Tensor | None:
    """A boolean mask, True where a position is excluded: a bool mask as its convention says,
    a float mask where it is -inf or the dtype's lowest value (what Hugging Face writes). A
    float mask's finite values (a bias such as ALiBi) are not part of ``q.k``: the q and k
    weights do not scale them, so they are not counted in the logit."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask if allowed_is_true else mask
    return mask <= torch.finfo(mask.dtype).min


def _masked_max(q: Tensor, k: Tensor, scale: float, blocked: Tensor | None) -> Tensor:
    """Per-head max of ``q @ k^T * scale`` where not ``blocked``: q ``(B, H, L, E)``, k
    ``(B, H, S, E)``, blocked broadcastable to ``(B, H, L, S)``; float32, in blocks of queries."""
    b, h, L, _ = q.shape
    S = k.shape[-2]
    q, k = q.float(), k.float()
    kt = k.transpose(-2, -1)
    step = max(1, _BLOCK // max(1, b * h * S))
    out = torch.full((h,), -math.inf, device=q.device)
    for i in range(0, L, step):
        s = torch.matmul(q[:, :, i : i + step], kt) * scale
        if blocked is not None:
            blk = blocked if blocked.shape[-2] == 1 else blocked[..., i : i + step, :]
            s = s.masked_fill(blk, -math.inf)
        out = torch.maximum(out, _per_head_max(s, -3))
    return out


def _lead(t: Tensor) -> Tensor:
    """``(..., H, L, E)`` as ``(B, H, L, E)``."""
    return t.reshape(-1, *t.shape[-3:]) if t.dim() != 4 else t


def sdpa_max_logits(
    query: Tensor,
    key: Tensor,
    value: Tensor | None = None,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Per query head, the max pre-softmax logit of ``F.scaled_dot_product_attention`` called
    with these arguments (its mask conventions: a bool ``attn_mask`` is True where attention is
    allowed; ``is_causal`` allows key ``j <= i``)."""
    hq, L, e = query.shape[-3:]
    hk, S = key.shape[-3], key.shape[-2]
    lead = query.shape[:-3]
    if scale is None:
        scale = 1.0 / math.sqrt(e)
    k = key
    if hk != hq:
        k = key.repeat_interleave(hq // hk, dim=-3)
    k = k.expand(*lead, hq, S, e)
    blocked = _blocked_of(attn_mask, allowed_is_true=True)
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril().logical_not()
        blocked = causal if blocked is None else blocked | causal
    if blocked is not None:
        blocked = blocked.expand(*lead, hq, L, S).reshape(-1, hq, L, S)
    return _masked_max(_lead(query), _lead(k), float(scale), blocked)


def _mha_signature():
    global _MHA_SIGNATURE
    if _MHA_SIGNATURE is None:
        import inspect

        _MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
    return _MHA_SIGNATURE


def mha_max_logits(*args: Any, **kwargs: Any) -> Tensor:
    """Per head, the max pre-softmax logit of ``F.multi_head_attention_forward`` called with
    these arguments: the in-projection of query and key, ``bias_k`` and ``add_zero_attn``'s extra
    keys, ``attn_mask`` (bool: True where excluded) and ``key_padding_mask``, as it computes
    them."""
    a = _mha_signature().bind(*args, **kwargs)
    a.apply_defaults()
    p = a.arguments
    query, key = p["query"], p["key"]
    h = p["num_heads"]
    batched = query.dim() == 3
    kpm, attn_mask = p["key_padding_mask"], p["attn_mask"]
    if not batched:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        if kpm is not None:
            kpm = kpm.unsqueeze(0)
    L, n, e = query.shape
    d = e // h
    if p["use_separate_proj_weight"]:
        wq, wk = p["q_proj_weight"], p["k_proj_weight"]
    else:
        wq, wk = p["in_proj_weight"][:e], p["in_proj_weight"][e : 2 * e]
    bq = bk = None
    if p["in_proj_bias"] is not None:
        bq, bk, _ = p["in_proj_bias"].chunk(3)
    q = F.linear(query, wq, bq).view(L, n, h, d).permute(1, 2, 0, 3)
    if p["static_k"] is not None:
        k = p["static_k"].view(n, h, -1, d)
    else:
        k = F.linear(key, wk, bk)
        if p["bias_k"] is not None:
            k = torch.cat([k, p["bias_k"].repeat(1, n, 1)])
        k = k.view(k.shape[0], n, h, d).permute(1, 2, 0, 3)
    if p["add_zero_attn"]:
        k = torch.cat([k, k.new_zeros(n, h, 1, d)], dim=2)
    S = k.shape[2]  # the extra keys (bias_k, the zero key) are allowed: masks pad them with 0
    blocked = None
    if attn_mask is not None:
        bm = _blocked_of(attn_mask, allowed_is_true=False)
        bm = bm.view(1, 1, L, -1) if bm.dim() == 2 else bm.view(n, h, L, -1)
        blocked = F.pad(bm, (0, S - bm.shape[-1]), value=False)
    if kpm is not None:
        km = _blocked_of(kpm, allowed_is_true=False).view(n, 1, 1, -1)
        km = F.pad(km, (0, S - km.shape[-1]), value=False)
        blocked = km if blocked is None else blocked | km
    return _masked_max(q, k, 1.0 / math.sqrt(d), blocked)


class _Measure(TorchFunctionMode):
    """Active for one attention module's forward: records the logits of its attention call."""

    def __init__(self, site: AttentionSite):
        super().__init__()
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        site = self.site
        if func is F.scaled_dot_product_attention:
            with torch.no_grad():
                site.record(sdpa_max_logits(*args, **kwargs))
        elif func is F.multi_head_attention_forward:
            with torch.no_grad():
                site.record(mha_max_logits(*args, **kwargs))
        elif func in _SOFTMAXES:
            scores = args[0] if args else kwargs.get("input")
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if (
                isinstance(scores, Tensor)
                and scores.dim() == 4
                and scores.shape[1] == site.heads
                and dim in (-1, 3)
            ):
                with torch.no_grad():
                    site.record(_per_head_max(scores.float(), -3))
        # Any other call, and the attention call itself, runs as it would without the mode (the
        # mode is off inside this handler: what the call does inside is not seen twice).
        return func(*args, **kwargs)


class LogitMeter:
    """Hooks on each site's module that measure its max logits during every forward run with
    gradients enabled (a forward the next step trains on; evaluation under ``no_grad`` is not
    counted). Gradient accumulation: the max over every micro-batch since the last reset.

    ``when``: called (no arguments) as each attention module's forward starts; the forward is
    measured only if it returns True (default: every forward). The telemetry measures only the
    forwards that feed a sampled step, so the other steps pay nothing but the call."""

    def __init__(self, sites: Sequence[AttentionSite], when: Callable[[], bool] | None = None):
        self.sites = list(sites)
        self.when = when
        for site in self.sites:
            self._attach(site)

    def _attach(self, site: AttentionSite) -> None:
        active: list[_Measure] = []

        def pre(_m, _args):
            if torch.is_grad_enabled() and (self.when is None or self.when()):
                site.ran = True
                mode = _Measure(site)
                mode.__enter__()
                active.append(mode)

        def post(_m, _args, _out):
            if active:
                active.pop().__exit__(None, None, None)

        m = site.module
        registry = m.__dict__.setdefault("_gradguard_sites", [])
        registry.append(site)
        site._handles = [
            m.register_forward_pre_hook(pre),
            m.register_forward_hook(post, always_call=True),
        ]

    def reset(self) -> None:
        for site in self.sites:
            site.reset()

    def close(self) -> None:
        for site in self.sites:
            for h in site._handles:
                h.remove()
            site._handles = []
            registry = site.module.__dict__.get("_gradguard_sites", [])
            if site in registry:
                registry.remove(site)
        self.sites = []
