"""Localization: a fault injected into a known layer of a real model is traced back to that layer."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradguard.diagnose.localize import (
    INPUT,
    LOSS,
    REPLAY_NOTE,
    ROOT,
    Localization,
    localize_static,
    replay,
)
from gradguard.diagnose.records import dumps


class NaNGrad(torch.autograd.Function):
    """Identity forward; the backward returns NaN (a fault made in backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class NaNGradModule(nn.Module):
    def forward(self, x):
        return NaNGrad.apply(x)


def overflow_hook(_module, _inp, out):
    """Make a module's output overflow (a fault made in forward)."""
    return out * float("inf")


def nan_grad_hook(_module, _inp, out):
    return NaNGrad.apply(out)


def mlp(nan_after: int | None = None) -> nn.Sequential:
    """Six named Linear layers fc0..fc5 with ReLUs; optionally a NaN-gradient module after fc<k>."""
    torch.manual_seed(0)
    items: list[tuple[str, nn.Module]] = []
    d = 5
    for i in range(6):
        items.append((f"fc{i}", nn.Linear(d, 8 if i < 5 else 3)))
        d = 8
        if nan_after == i:
            items.append(("fault", NaNGradModule()))
        if i < 5:
            items.append((f"act{i}", nn.ReLU()))
    return nn.Sequential(OrderedDict(items))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)  # in-place ops are where full backward hooks break
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.relu2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.mean(dim=(2, 3))))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        out, _ = self.lstm(torch.tanh(self.proj(x)))
        return self.head(out[:, -1])


def closure_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda: F.cross_entropy(model(x), y)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)


@pytest.fixture
def image_batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)


@pytest.fixture
def seq_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 7, 4, generator=g), torch.randint(0, 2, (3,), generator=g)


# ----- (i) forward overflow -----------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 3, 5])
def test_forward_overflow_in_mlp(batch, k):
    model = mlp()
    getattr(model, f"fc{k}").register_forward_hook(overflow_hook)
    loc = replay(model, closure_for(model, *batch))
    assert loc.phase == "forward"
    assert loc.origin == f"fc{k}"
    assert loc.path[0] == f"fc{k}"
    assert "fc0" not in loc.path[1:]  # only what ran after the fault
    assert loc.detail["seen_in"] == "output" and loc.detail["inf"] + loc.detail["nan"] > 0


def test_forward_overflow_in_cnn_and_lstm(image_batch, seq_batch):
    cnn = SmallCNN()
    cnn.bn1.register_forward_hook(overflow_hook)
    loc = replay(cnn, closure_for(cnn, *image_batch))
    assert (loc.phase, loc.origin) == ("forward", "bn1")
    lstm = LSTMNet()
    lstm.proj.register_forward_hook(overflow_hook)
    loc = replay(lstm, closure_for(lstm, *seq_batch))
    assert (loc.phase, loc.origin) == ("forward", "proj")


def test_nonfinite_batch_is_the_input(batch):
    model = mlp()
    x, y = batch
    x = x.clone()
    x[0, 0] = float("nan")
    loc = replay(model, closure_for(model, x, y))
    assert (loc.phase, loc.origin) == ("forward", INPUT)


def test_nonfinite_loss_from_a_finite_model_is_the_loss(batch):
    model = mlp()
    x, _ = batch
    loc = replay(model, lambda: model(x).sum() * 0 + torch.log(torch.zeros(())))
    assert (loc.phase, loc.origin) == ("forward", LOSS)


# ----- (ii) NaN made in backward -------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4])
def test_backward_nan_module_in_mlp(batch, k):
    model = mlp(nan_after=k)
    loc = replay(model, closure_for(model, *batch))
    assert (loc.phase, loc.origin) == ("backward", "fault")
    # it spreads towards the input: fc<k> first, then the layers before it, never the ones after
    assert loc.path[:2] == ["fault", f"fc{k}"]
    assert f"fc{k + 1}" not in loc.path
    assert loc.detail["grad_output_finite"] and not loc.detail["grad_input_finite"]


@pytest.mark.parametrize("k", [0, 2, 5])
def test_backward_nan_made_by_a_layer(batch, k):
    model = mlp()
    getattr(model, f"fc{k}").register_forward_hook(nan_grad_hook)  # fc<k> itself makes it
    loc = replay(model, closure_for(model, *batch))
    assert (loc.phase, loc.origin) == ("backward", f"fc{k}")
    assert not loc.detail["param_grads_finite"]
    assert f"fc{k}.weight" in loc.detail["bad_params"]


def test_backward_nan_in_cnn_with_inplace_relu(image_batch):
    cnn = SmallCNN()
    cnn.conv2.register_forward_hook(nan_grad_hook)
    loc = replay(cnn, closure_for(cnn, *image_batch))
    assert (loc.phase, loc.origin) == ("backward", "conv2")
    assert loc.path.index("relu1") < loc.path.index("conv1")


def test_backward_nan_in_lstm(seq_batch):
    model = LSTMNet()
    model.lstm.register_forward_hook(lambda m, i, o: (NaNGrad.apply(o[0]), o[1]))
    loc = replay(model, closure_for(model, *seq_batch))
    assert (loc.phase, loc.origin) == ("backward", "lstm")
    assert "proj" in loc.path and "head" not in loc.path


def test_backward_nan_in_a_parents_own_code(batch):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.c(torch.relu(NaNGrad.apply(self.b(torch.relu(self.a(x))))))

    model = Net()
    loc = replay(model, closure_for(model, *batch))
    assert (loc.phase, loc.origin) == ("backward", ROOT)
    assert loc.detail["first_bad_grad_output"] == "b"  # between b's output and c's input


def test_shared_module_called_twice_is_judged_per_call(batch):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.act = nn.Tanh()  # one module, two calls

        def forward(self, x):
            return self.head(self.act(self.fc2(self.act(self.fc1(x)))))

    model = Net()
    model.fc2.register_forward_hook(nan_grad_hook)
    loc = replay(model, closure_for(model, *batch))
    assert (loc.phase, loc.origin) == ("backward", "fc2")


# ----- (iii) static ---------------------------------------------------------------------------------


META = {
    # registered head first, so the layer index order is not the forward order
    "layers": ["head", "fc1", "fc2", "fc3", "fc4", "fc5"],
    "forward_order": [1, 2, 3, 4, 5, 0],
}


@pytest.mark.parametrize("k", range(6))
def test_static_origin_is_the_last_nonfinite_layer_in_forward_order(k):
    bad = META["forward_order"][: k + 1]
    rec = localize_static({"step": 7, "loss": 1.5, "nonfinite_layers": bad}, META)
    names = [META["layers"][i] for i in bad]
    assert rec["origin"] == names[-1]
    assert rec["path"] == names[::-1]
    assert (rec["type"], rec["step"], rec["phase"], rec["method"]) == (
        "localization",
        7,
        "gradient",
        "static",
    )
    assert rec["detail"]["contiguous"]
    json.loads(dumps(rec))


def test_static_gap_and_nonfinite_loss_and_nothing():
    rec = localize_static({"step": 1, "loss": 2.0, "nonfinite_layers": [3, 1]}, META)
    assert rec["origin"] == "fc3" and not rec["detail"]["contiguous"]
    assert rec["detail"]["finite_before_origin"] == ["fc2"]
    bad = localize_static(
        {"step": 2, "loss": math.nan, "nonfinite_layers": [1, 2, 3, 4, 5, 0]}, META
    )
    assert bad["detail"]["loss_finite"] is False and bad["detail"]["suggest"] == "replay"
    assert "replay" in bad["detail"]["note"]
    assert localize_static({"step": 3, "loss": 1.0, "nonfinite_layers": []}, META) is None
    assert localize_static({"step": 3, "loss": None}, {}) is None
    only_loss = localize_static({"step": 4, "loss": math.inf, "nonfinite_layers": []}, META)
    assert only_loss["origin"] == LOSS
    # no forward order recorded: registration order stands in
    assert (
        localize_static({"step": 5, "nonfinite_layers": [0, 1]}, {"layers": ["a", "b"]})["origin"]
        == "b"
    )


def test_static_agrees_with_a_real_backward_nan(batch):
    model = mlp()
    model.fc3.register_forward_hook(nan_grad_hook)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    layers = [f"fc{i}" for i in range(6)]
    bad = [
        i
        for i, n in enumerate(layers)
        if not all(torch.isfinite(p.grad).all() for p in getattr(model, n).parameters())
    ]
    rec = localize_static({"step": 0, "loss": 1.0, "nonfinite_layers": bad}, {"layers": layers})
    assert rec["origin"] == "fc3" and rec["detail"]["contiguous"]


# ----- (iv) replay leaves the model as it was --------------------------------------------------------


def _state(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "grad_values": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "buffers": {n: (b, b.clone()) for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": _hook_counts(model),
    }


def _hook_counts(model: nn.Module) -> dict:
    return {
        n: (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(m._backward_pre_hooks),
            sum(len(p._backward_hooks or {}) for p in m.parameters(recurse=False)),
        )
        for n, m in model.named_modules()
    }


def _assert_same(model: nn.Module, before: dict) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p, before["params"][n]), n
        assert p.grad is before["grads"][n], n  # the same tensor (None stays None)
        if p.grad is not None:
            assert torch.equal(p.grad, before["grad_values"][n]), n
    for n, b in model.named_buffers():
        obj, values = before["buffers"][n]
        assert b is obj and torch.equal(b, values), n
    assert {n: m.training for n, m in model.named_modules()} == before["modes"]
    assert _hook_counts(model) == before["hooks"]


@pytest.mark.parametrize("fault", ["none", "forward", "backward"])
def test_replay_restores_buffers_grads_and_hooks(image_batch, fault):
    cnn = SmallCNN().train()
    x, y = image_batch
    F.cross_entropy(cnn(x), y).backward()  # the step's (finite) gradients
    cnn.fc.bias.grad = None  # and one parameter without a gradient
    if fault == "forward":
        cnn.bn2.register_forward_hook(overflow_hook)
    elif fault == "backward":
        cnn.conv1.register_forward_hook(nan_grad_hook)
    before = _state(cnn)
    rng = torch.get_rng_state()
    loc = replay(cnn, closure_for(cnn, x, y))
    _assert_same(cnn, before)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is untouched
    assert loc.phase == fault
    assert loc.detail["stochastic"] == ["drop"] and loc.detail["note"] == REPLAY_NOTE


def test_replay_restores_everything_when_the_closure_raises(image_batch):
    cnn = SmallCNN().train()
    x, y = image_batch
    F.cross_entropy(cnn(x), y).backward()
    before = _state(cnn)

    def closure():
        cnn.eval()  # even a closure that flips modes
        out = cnn(x)
        raise RuntimeError(f"data loader broke after {out.shape}")

    with pytest.raises(RuntimeError, match="data loader broke"):
        replay(cnn, closure)
    _assert_same(cnn, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in cnn.modules())
    assert all(not p._backward_hooks for p in cnn.parameters())


def test_closure_must_return_a_scalar(batch):
    model = mlp()
    with pytest.raises(TypeError, match="scalar tensor"):
        replay(model, lambda: model(batch[0]))
    assert all(not m._forward_hooks for m in model.modules())


# ----- (v) a healthy step ----------------------------------------------------------------------------


def test_healthy_step_is_phase_none(batch, seq_batch):
    model = mlp()
    loc = replay(model, closure_for(model, *batch))
    assert (loc.origin, loc.phase, loc.path) == ("", "none", [])
    lstm = LSTMNet()
    assert replay(lstm, closure_for(lstm, *seq_batch)).phase == "none"


def test_as_record_is_a_localization_record(batch):
    model = mlp(nan_after=2)
    rec = replay(model, closure_for(model, *batch)).as_record(12)
    assert rec["type"] == "localization" and rec["step"] == 12 and rec["method"] == "replay"
    assert set(rec) == {"type", "step", "origin", "phase", "path", "method", "detail"}
    assert json.loads(dumps(rec))["origin"] == "fault"
    assert Localization("x", "none").as_record(0)["path"] == []
