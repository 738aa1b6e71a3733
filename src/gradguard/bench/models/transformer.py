"""``gpt``: a small pre-LN decoder-only transformer whose attention logits grow without
``qk_layernorm``."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .common import _at_least, _probability
from .registry import register


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, optionally with LayerNorm on each head's q and k."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, qk_layernorm: bool):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        # One LayerNorm over head_dim, shared by the heads (ViT-22B): bounds every q.k logit.
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_layernorm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_layernorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            for z in self.qkv(x).split(d, dim=2)
        )
        y = F.scaled_dot_product_attention(
            self.q_norm(q),
            self.k_norm(k),
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``; the MLP is 4x wide, GELU."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, qk_layernorm: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout, qk_layernorm)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, a final LayerNorm, a linear head."""

    def __init__(
        self,
        vocab: int,
        context_length: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        dropout: float,
        qk_layernorm: bool,
        tied_embeddings: bool,
    ):
        super().__init__()
        self.context_length = context_length
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(context_length, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(
            *(TransformerBlock(d_model, n_heads, dropout, qk_layernorm) for _ in range(n_layers))
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        # GPT-2 init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 n_layers) so
        # the residual stream's variance does not grow with depth.
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = 0.02
                if name.endswith(("attn.proj", "mlp.2")):
                    std /= math.sqrt(2 * n_layers)
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(cast(torch.Tensor, m.bias))  # a Linear's (Embedding has none)
        if tied_embeddings:  # Press & Wolf 2017, as GPT-2 does
            self.head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context_length:
            raise ConfigError(
                f"gpt: sequence of {t} tokens is longer than context_length={self.context_length}"
            )
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        return self.head(self.ln_f(self.blocks(x)))


@register("gpt", inputs="tokens")
def gpt(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    dropout: float = 0.0,
    qk_layernorm: bool = False,
    tied_embeddings: bool = False,
) -> nn.Module:
    """Small pre-LN decoder-only transformer (GPT-2, Radford et al. 2019): tokens to next-token logits.

    ``input_shape`` is ``(context_length,)``, ``num_outputs`` the vocabulary size; the forward
    takes ``(B, T)`` token ids, ``T <= context_length``, and returns ``(B, T, vocab)`` logits.
    Causal attention by ``F.scaled_dot_product_attention(is_causal=True)``; GPT-2 init.
    Defaults (d_model 128, 2 layers, 4 heads, no dropout) train in seconds on a CPU.
    ``qk_layernorm`` applies LayerNorm to each head's queries and keys before attention, the fix
    of Dehghani et al. 2023 (ViT-22B) and OLMo 2 for attention logits that grow until the softmax
    saturates and the loss spikes; off by default, so the bench can show the spike.
    ``tied_embeddings`` shares the token embedding with the output head (Press & Wolf 2017).
    """
    if len(input_shape) != 1:
        raise ConfigError(f"input_shape must be (context_length,) for tokens, got {input_shape}")
    _at_least("d_model", d_model, 1)
    _at_least("n_layers", n_layers, 1)
    _at_least("n_heads", n_heads, 1)
    _probability("dropout", dropout)
    if d_model % n_heads:
        raise ConfigError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    return GPT(
        num_outputs,
        input_shape[0],
        d_model,
        n_layers,
        n_heads,
        dropout,
        qk_layernorm,
        tied_embeddings,
    )
