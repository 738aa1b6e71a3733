"""The one-pass statistics against torch's own norms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradguard.layout import ParamLayout
from gradguard.stats import compute_grad_stats

from tests.helpers import TinyNet, set_grads


def layout_of(model: nn.Module, **opt_kw) -> ParamLayout:
    return ParamLayout.build(model, torch.optim.SGD(model.parameters(), lr=0.1, **opt_kw))


def test_global_norm_is_bitwise_torchs(tiny):
    set_grads(tiny, 1, scale=3.0)
    stats = compute_grad_stats(layout_of(tiny))
    expected = torch.nn.utils.get_total_norm([p.grad for p in tiny.parameters()], foreach=True)
    assert torch.equal(stats.norm, expected)
    assert bool(stats.finite)


def test_param_and_layer_norms(tiny):
    set_grads(tiny, 2)
    stats = compute_grad_stats(layout_of(tiny))
    ref = torch.stack([p.grad.norm() for p in tiny.parameters()])
    torch.testing.assert_close(stats.raw_param_norms, ref)
    layer_ref = {
        name: math.sqrt(sum(p.grad.norm().item() ** 2 for p in mod.parameters()))
        for name, mod in tiny.named_children()
    }
    got = dict(zip(stats.layout.layer_names, stats.raw_layer_norms.tolist(), strict=True))
    assert got.keys() == layer_ref.keys()
    for k in got:
        assert got[k] == pytest.approx(layer_ref[k], rel=1e-6)


def test_params_without_grads_and_several_groups(tiny):
    opt = torch.optim.SGD(
        [
            {"params": tiny.fc1.parameters()},
            {"params": list(tiny.fc2.parameters()) + list(tiny.head.parameters()), "lr": 0.5},
        ],
        lr=0.1,
    )
    set_grads(tiny, 3)
    tiny.fc2.weight.grad = None
    stats = compute_grad_stats(ParamLayout.build(tiny, opt))
    grads = [p.grad for p in tiny.parameters() if p.grad is not None]
    assert len(stats.grads) == 5
    torch.testing.assert_close(
        stats.norm, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    )
    # fc2 still has its bias gradient: its layer norm is the bias norm alone.
    li = stats.layout.layer_names.index("fc2")
    assert stats.raw_layer_norms[li].item() == pytest.approx(
        tiny.fc2.bias.grad.norm().item(), rel=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_grads_accumulate_in_fp32(dtype):
    model = nn.Linear(512, 512).to(dtype)
    model.weight.grad = torch.full_like(
        model.weight, 200.0
    )  # fp16 norm would overflow: 200*512 = 102400 > 65504
    model.bias.grad = torch.ones_like(model.bias)
    stats = compute_grad_stats(layout_of(model))
    expected = math.sqrt(200.0**2 * 512 * 512 + 512)
    assert stats.norm.dtype == torch.float32
    assert stats.norm.item() == pytest.approx(expected, rel=1e-3)
    assert bool(stats.finite)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_flag_from_norms(tiny, bad):
    set_grads(tiny, 4)
    tiny.fc2.weight.grad[1, 2] = bad
    stats = compute_grad_stats(layout_of(tiny))
    assert not bool(stats.finite)
    bad_layers = [
        n
        for n, v in zip(stats.layout.layer_names, stats.raw_layer_norms.tolist(), strict=True)
        if not math.isfinite(v)
    ]
    assert bad_layers == ["fc2"]


def test_weight_norms_on_demand(tiny):
    set_grads(tiny, 5)
    stats = compute_grad_stats(layout_of(tiny))
    torch.testing.assert_close(
        stats.weight_norms, torch.stack([p.detach().norm() for p in tiny.parameters()])
    )


def test_scale_keeps_running_norms_exact(tiny):
    set_grads(tiny, 6)
    stats = compute_grad_stats(layout_of(tiny))
    stats.scale_params_(torch.linspace(0.1, 1.0, len(stats.grads)))
    torch.testing.assert_close(
        stats.param_norms, torch.stack([p.grad.norm() for p in tiny.parameters()])
    )
    stats.scale_(torch.tensor(0.5))
    torch.testing.assert_close(
        stats.norm_after,
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in tiny.parameters()])),
    )


def test_layout_names_layers_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight
            self.scale = nn.Parameter(torch.ones(()))

    m = Tied()
    layout = ParamLayout.build(m, torch.optim.SGD(m.parameters(), lr=0.1))
    assert layout.names == [
        "scale",
        "emb.weight",
    ]  # optimizer order: the root's own parameters first
    assert layout.layer_names == ["(root)", "emb"]


def test_head_found_by_execution_not_registration():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(8, 3)  # registered first, runs last
            self.body = nn.Linear(4, 8)

        def forward(self, x):
            return self.classifier(torch.relu(self.body(x)))

    m = HeadFirst()
    layout = ParamLayout.build(m, torch.optim.SGD(m.parameters(), lr=0.1))
    layout.watch_forward_order()
    m(torch.randn(2, 4))
    assert layout.layer_names[layout.head_layer()] == "classifier"
    # The hooks are gone after the first forward.
    assert not m.classifier._forward_pre_hooks and not m._forward_pre_hooks and not m._forward_hooks


def test_head_fallback_warns():
    m = TinyNet()
    layout = ParamLayout.build(m, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.warns(UserWarning, match="forward pass"):
        assert layout.layer_names[layout.head_layer()] == "head"
