"""qk_clip: per-head factors against a readable twin, the measured max logit against logits
computed by hand from the model's own q and k, the bound on a run whose logits blow up, and its
state, errors and no-op."""

from __future__ import annotations

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard
from gradguard import ConfigError, Guard, SpecError
from gradguard.bench.models.transformer import gpt
from gradguard.policies import parse_spec


# ----- a readable twin of the rule ------------------------------------------------------------------
def qk_clip_reference(q_w, k_w, max_logits, heads, kv_heads, tau, alpha):
    """Megatron-LM's SelfAttention.clip_qk, written out: per key-head group the largest logit of
    its query heads gives gamma = min(1, tau / S); the group's query rows times gamma**alpha, its
    key rows times gamma**(1 - alpha). q_w: (heads * d, in), k_w: (kv_heads * d, in)."""
    q_w, k_w = q_w.clone(), k_w.clone()
    d = q_w.shape[0] // heads
    per_group = heads // kv_heads
    for g in range(kv_heads):
        s = max(float(max_logits[h]) for h in range(g * per_group, (g + 1) * per_group))
        gamma = min(1.0, tau / s) if s > tau else 1.0
        for h in range(g * per_group, (g + 1) * per_group):
            q_w[h * d : (h + 1) * d] *= gamma**alpha
        k_w[g * d : (g + 1) * d] *= gamma ** (1 - alpha)
    return q_w, k_w


# ----- logits by hand ------------------------------------------------------------------------------------
def max_by_hand(q, k, allowed):
    """Per query head: the max of q.k / sqrt(d) where ``allowed``; q (B, H, L, d), k (B, Hk, S, d)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.masked_fill(~allowed, -math.inf).amax(dim=(0, 2, 3))


def causal(t):
    return torch.ones(t, t, dtype=torch.bool).tril()


def rope(x):
    """Rotary embedding (rotate-half form) over the positions of x (B, H, T, d)."""
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(t).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class HFAttention(nn.Module):
    """Hugging Face Llama-style attention: q_proj/k_proj/v_proj/o_proj, grouped-query heads,
    rotary, a head count in ``config``; SDPA (``enable_gqa``) or the eager matmul + softmax path
    with a float mask of the dtype's lowest value, as transformers writes it."""

    def __init__(self, d=16, heads=4, kv_heads=2, eager=False, bias=True):
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads)
        self.head_dim = d // heads
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, d, bias=False)
        self.eager = eager

    def qk(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        return rope(q), rope(k)

    def forward(self, x):
        b, t, _ = x.shape
        q, k = self.qk(x)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.eager:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5
            mask = torch.zeros(t, t).masked_fill(~causal(t), torch.finfo(torch.float32).min)
            w = F.softmax(scores + mask, dim=-1, dtype=torch.float32)
            y = w @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class Stack(nn.Module):
    def __init__(self, attn, d=16):
        super().__init__()
        self.emb = nn.Linear(d, d)
        self.attn = attn
        self.head = nn.Linear(d, d)

    def forward(self, x):
        return self.head(self.attn(self.emb(x)))


def one_step(model, spec, x, lr=0.0, opt_cls=torch.optim.SGD):
    """A forward, a backward and one guarded step; returns the Guard and its report."""
    opt = opt_cls(model.parameters(), lr=lr)
    guard = Guard(model, opt, spec)
    out = model(x)
    loss = out.float().square().mean()
    loss.backward()
    return guard, guard.step(loss=loss)


def qk_policy(guard):
    return next(p for p in guard.policies if p.name == "qk_clip")


# ----- the measured max logit equals the logits computed by hand --------------------------------------
@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager_softmax"])
def test_max_logit_of_a_grouped_query_hf_module_is_the_one_computed_by_hand(eager):
    torch.manual_seed(0)
    model = Stack(HFAttention(eager=eager))
    x = torch.randn(3, 7, 16) * 4
    with torch.no_grad():
        q, k = model.attn.qk(model.emb(x))
    want = max_by_hand(q, k, causal(7))
    guard, report = one_step(model, "qk_clip:tau=1e9", x)
    site = qk_policy(guard).sites[0]
    assert (site.heads, site.kv_heads, site.how) == (4, 2, "q_proj/k_proj")
    got = qk_policy(guard).state["max_logits"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert report.metrics["qk_clip.max_logit"] == pytest.approx(float(want.max()), rel=1e-5)
    assert report.metrics["qk_clip.max_logit.attn"] == pytest.approx(float(want.max()), rel=1e-5)


def mha_by_hand(mha, x, attn_mask, kpm):
    """nn.MultiheadAttention's logits from its own in_proj_weight (batch_first x: (B, T, E))."""
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = F.linear(x, w[:e], b[:e]).view(*x.shape[:2], h, d).transpose(1, 2)
    k = F.linear(x, w[e : 2 * e], b[e : 2 * e]).view(*x.shape[:2], h, d).transpose(1, 2)
    allowed = ~attn_mask[None, None] & ~kpm[:, None, None, :]
    return max_by_hand(q, k, allowed)


@pytest.mark.parametrize("need_weights", [False, True])
def test_max_logit_of_nn_multihead_attention_is_the_one_computed_by_hand(need_weights):
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(12, 3, batch_first=True)

        def forward(self, x, attn_mask, kpm):
            y, _ = self.mha(x, x, x, attn_mask=attn_mask, key_padding_mask=kpm,
                            need_weights=need_weights)  # fmt: skip
            return y

    net = Net()
    t = 6
    x = torch.randn(4, t, 12) * 3
    attn_mask = ~causal(t)  # MHA's bool mask: True where excluded
    kpm = torch.zeros(4, t, dtype=torch.bool)
    kpm[1, 2] = True  # batch 1 may not look at position 2 (no query sees nothing) ...
    x[1, 2] *= 10  # ... whose key would give the largest logits
    want = mha_by_hand(net.mha, x, attn_mask, kpm)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    guard = Guard(net, opt, "qk_clip:tau=1e9")
    net(x, attn_mask, kpm).square().mean().backward()
    guard.step()
    got = qk_policy(guard).state["max_logits"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def gpt_by_hand(model, idx):
    """Per block, each head's max logit of the bench GPT, from its qkv weights."""
    out = []
    with torch.no_grad():
        h = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1]))
        for blk in model.blocks:
            a, x = blk.attn, blk.ln1(h)
            b, t, d = x.shape
            q, k, _ = (
                z.view(b, t, a.n_heads, a.head_dim).transpose(1, 2)
                for z in a.qkv(x).split(d, dim=2)
            )
            out.append(max_by_hand(a.q_norm(q), a.k_norm(k), causal(t)))
            h = blk(h)
    return torch.cat(out)


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_max_logit_of_the_bench_gpt_is_the_one_computed_by_hand(qk_layernorm):
    torch.manual_seed(2)
    model = gpt((10,), 20, d_model=16, n_heads=4, n_layers=2, qk_layernorm=qk_layernorm)
    idx = torch.randint(0, 20, (3, 10))
    want = gpt_by_hand(model, idx)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = Guard(model, opt, "qk_clip:tau=1e9")
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    guard.step()
    assert [s.name for s in qk_policy(guard).sites] == ["blocks.0.attn", "blocks.1.attn"]
    torch.testing.assert_close(qk_policy(guard).state["max_logits"].double(), want, rtol=1e-5,
                               atol=1e-6)  # fmt: skip


def test_micro_batches_give_the_max_over_them_and_no_grad_forwards_do_not_count():
    torch.manual_seed(3)
    model = Stack(HFAttention())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = Guard(model, opt, "qk_clip:tau=1e9")
    xs = [torch.randn(2, 5, 16), torch.randn(2, 5, 16) * 3]
    with torch.no_grad():
        model(torch.randn(2, 5, 16) * 100)  # evaluation: not trained on, not measured
        wants = [max_by_hand(*model.attn.qk(model.emb(x)), causal(5)) for x in xs]
    for x in xs:
        model(x).square().mean().backward()
    guard.step()
    torch.testing.assert_close(
        qk_policy(guard).state["max_logits"].double(), torch.maximum(*wants), rtol=1e-5, atol=1e-5
    )


# ----- the rescaling -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("tau", "alpha"), [(0.5, 0.5), (1.0, 0.0), (2.0, 1.0), (1.5, 0.3)])
def test_weights_are_rescaled_as_the_reference_twin_with_grouped_queries(tau, alpha):
    torch.manual_seed(4)
    model = Stack(HFAttention(bias=True))
    x = torch.randn(3, 7, 16) * 4
    with torch.no_grad():
        maxima = max_by_hand(*model.attn.qk(model.emb(x)), causal(7))
    assert maxima.max() > tau  # the clip binds on some group
    q0, k0 = model.attn.q_proj.weight.detach().clone(), model.attn.k_proj.weight.detach().clone()
    bq0 = model.attn.q_proj.bias.detach().clone()
    want_q, want_k = qk_clip_reference(q0, k0, maxima, 4, 2, tau, alpha)
    _, report = one_step(model, f"qk_clip:tau={tau},alpha={alpha}", x)  # SGD at lr 0
    torch.testing.assert_close(model.attn.q_proj.weight, want_q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.attn.k_proj.weight, want_k, rtol=1e-6, atol=1e-7)
    assert torch.equal(model.attn.q_proj.bias, bq0)  # as Megatron-LM: weights only
    assert report.actions == ("qk_clip",)


def test_after_the_clip_the_same_batch_peaks_at_tau():
    """With the biases scaled too (bias=True), the clipped weights give exactly tau on the group
    that bound (the max over its heads), and clipping again changes nothing."""
    torch.manual_seed(5)
    model = Stack(HFAttention(bias=True))
    x = torch.randn(3, 7, 16) * 4
    guard, _ = one_step(model, "qk_clip:tau=1.0,bias=true", x)
    with torch.no_grad():
        after = max_by_hand(*model.attn.qk(model.emb(x)), causal(7))
    assert float(after.max()) == pytest.approx(1.0, rel=1e-5)
    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().mean().backward()
    guard.step()
    for a, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_fused_qkv_rows_are_scaled_and_values_left_bit_identical():
    torch.manual_seed(6)
    model = gpt((10,), 20, d_model=16, n_heads=4, n_layers=1)
    idx = torch.randint(0, 20, (3, 10))
    maxima = gpt_by_hand(model, idx)
    w0 = model.blocks[0].attn.qkv.weight.detach().clone()
    tau = float(maxima.median())
    want_q, want_k = qk_clip_reference(w0[:16], w0[16:32], maxima, 4, 4, tau, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = Guard(model, opt, f"qk_clip:tau={tau}")
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    report = guard.step()
    w = model.blocks[0].attn.qkv.weight
    torch.testing.assert_close(w[:16], want_q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w[16:32], want_k, rtol=1e-6, atol=1e-7)
    assert torch.equal(w[32:], w0[32:])
    assert report.metrics["qk_clip.clipped"] == float((maxima > tau).sum())


def test_below_tau_the_step_is_bit_identical_to_an_unguarded_one():
    torch.manual_seed(7)
    model = gpt((10,), 20, d_model=16, n_heads=4, n_layers=2)
    twin = copy.deepcopy(model)
    idx = torch.randint(0, 20, (3, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    guard = Guard(model, opt, "qk_clip", check_finite=False)
    for _ in range(3):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            F.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
        report = guard.step()
        twin_opt.step()
        assert report.metrics["qk_clip.clipped"] == 0.0
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_skipped_step_clips_nothing():
    torch.manual_seed(8)
    model = Stack(HFAttention())
    x = torch.randn(3, 7, 16) * 4
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, opt, "qk_clip:tau=0.1")
    model(x).square().mean().backward()
    model.emb.weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    report = guard.step()
    assert report.skipped and "qk_clip" not in report.actions
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a, b)


# ----- end to end: a run whose logits blow up --------------------------------------------------------
def _repeats(gen, b=8, t=16, vocab=16):
    return torch.randint(0, vocab, (b, 8), generator=gen).repeat(1, t // 8)


def _train(spec, steps=40, lr=3e-2):
    torch.manual_seed(0)
    model = gpt((16,), 16, d_model=32, n_heads=2, n_layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    guard = Guard(model, opt, spec)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = _repeats(gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        guard.step(loss=loss)
    fresh = torch.Generator().manual_seed(99)
    return max(float(gpt_by_hand(model, _repeats(fresh)).max()) for _ in range(4))


@pytest.mark.slow
def test_qk_clip_keeps_the_max_logit_near_tau_where_an_unguarded_run_blows_past_it():
    """AdamW at 3e-2 on a GPT: the unguarded max logit grows past 5x tau; with qk_clip it stays
    near tau on fresh batches (above it by what one step adds: the clip is computed from the
    step's forward, before the update, as MuonClip's and Megatron-LM's are)."""
    tau = 5.0
    unguarded = _train("none")
    clipped = _train(f"qk_clip:tau={tau}")
    assert unguarded > 5 * tau
    assert clipped <= 1.3 * tau


# ----- discovery, registration, errors -----------------------------------------------------------------
class Fused(nn.Module):
    """Attention no rule finds: one ``wqkv`` weight, heads in ``h``; SDPA, or a fused kernel
    stand-in that reports its logits."""

    def __init__(self, d=16, h=4, report=False):
        super().__init__()
        self.h, self.report = h, report
        self.wqkv = nn.Parameter(torch.randn(3 * d, d) / 4)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.h, -1).transpose(1, 2) for z in (x @ self.wqkv.T).split(d, 2))
        if self.report:
            s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            gradguard.record_attention_logits(self, s.masked_fill(~causal(t), -math.inf))
            y = v.cumsum(2)  # a stand-in for a kernel the meter cannot see
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(b, t, d)


@pytest.mark.parametrize("report", [False, True])
def test_registered_attention_is_measured_and_clipped(report):
    torch.manual_seed(9)
    attn = Fused(report=report)
    model = Stack(attn)
    with pytest.raises(ConfigError, match="register_attention"):
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.0), "qk_clip")
    gradguard.register_attention(
        attn, heads=4, q=attn.wqkv, k=attn.wqkv, q_rows=slice(0, 16), k_rows=slice(16, 32)
    )
    x = torch.randn(3, 7, 16) * 4
    with torch.no_grad():
        q, k, _ = (
            z.view(3, 7, 4, -1).transpose(1, 2) for z in (model.emb(x) @ attn.wqkv.T).split(16, 2)
        )
    maxima = max_by_hand(q, k, causal(7))
    w0 = attn.wqkv.detach().clone()
    want_q, want_k = qk_clip_reference(w0[:16], w0[16:32], maxima, 4, 4, 1.0, 0.5)
    guard, _ = one_step(model, "qk_clip:tau=1.0", x)
    torch.testing.assert_close(qk_policy(guard).state["max_logits"].double(), maxima, rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    torch.testing.assert_close(attn.wqkv[:16], want_q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(attn.wqkv[16:32], want_k, rtol=1e-6, atol=1e-7)


def test_an_attention_whose_logits_are_never_seen_is_refused_with_the_fix():
    class Blind(Fused):
        def forward(self, x):
            return x @ self.wqkv[:16].T  # no SDPA, no softmax, no record

    attn = Blind()
    gradguard.register_attention(attn, heads=4, q=attn.wqkv, k=attn.wqkv, q_rows=slice(0, 16),
                                 k_rows=slice(16, 32))  # fmt: skip
    with pytest.raises(ConfigError, match="record_attention_logits"):
        one_step(Stack(attn), "qk_clip", torch.randn(2, 3, 16))


def test_no_attention_is_a_clear_error_naming_the_fix():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"no attention module found.*register_attention"):
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), "qk_clip")
    with pytest.raises(ConfigError, match="needs the model"):
        Guard(None, torch.optim.SGD(model.parameters(), lr=0.1), "qk_clip")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("qk_clip:tau=0", "tau must be a finite number > 0"),
        ("qk_clip:tau=-1", "tau must be"),
        ("qk_clip:tau=inf", "tau must be"),
        ("qk_clip:alpha=1.5", "alpha must be a number in [0, 1]"),
        ("qk_clip:alpha=-0.1", "alpha must be"),
    ],
)
def test_parameters_are_validated(spec, words):
    with pytest.raises(SpecError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(spec)


def test_spec_defaults_and_round_trip():
    (p,) = parse_spec("qk_clip")
    assert (p.tau, p.alpha, p.bias) == (100.0, 0.5, False)
    (q,) = parse_spec(p.spec())
    assert q.params() == p.params()
    assert parse_spec("qk_clip:20")[0].tau == 20.0


def test_state_round_trips_and_a_bad_one_is_refused():
    torch.manual_seed(10)
    model = Stack(HFAttention())
    guard, _ = one_step(model, "qk_clip:tau=0.5", torch.randn(3, 7, 16) * 4)
    st = qk_policy(guard).state_dict()
    assert st["steps"] == 1 and int(st["clipped"].sum()) > 0 and st["max_logits"].shape == (4,)
    buf = io.BytesIO()
    torch.save(guard.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh_model = Stack(HFAttention())
    fresh = Guard(fresh_model, torch.optim.SGD(fresh_model.parameters(), lr=0.0), "qk_clip:tau=0.5")
    fresh.load_state_dict(saved)
    for k, v in qk_policy(fresh).state_dict().items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(st[k])), k
    bad = copy.deepcopy(saved)
    bad["policies"][-1]["state"]["clipped"] = -bad["policies"][-1]["state"]["clipped"] - 1
    with pytest.raises(ConfigError, match="clipped"):
        fresh.load_state_dict(bad)


def test_close_removes_the_hooks():
    model = Stack(HFAttention())
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.0), "qk_clip")
    assert model.attn._forward_pre_hooks
    guard.close()
    assert not model.attn._forward_pre_hooks and not model.attn._forward_hooks
