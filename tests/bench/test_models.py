"""The bench's model registry: every family trains a step, ResNets match the reference parameter
counts, each option does what it says, and bad names or options raise a helpful ConfigError."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard.bench.models import available_models, build_model, model_info, model_options
from gradguard.errors import ConfigError

# A small input for each kind of model input (the registry says which kind a family takes).
SMALL_INPUTS = {
    "any": (1, 8, 8),
    "image": (3, 8, 8),
    "sequence": (6, 3),
    "tokens": (8,),
}
NUM_OUTPUTS = 5


def make_batch(name: str, input_shape: tuple[int, ...], batch: int = 4, seed: int = 0):
    """A batch of inputs and integer targets for model ``name``."""
    gen = torch.Generator().manual_seed(seed)
    if model_info(name).inputs == "tokens":
        x = torch.randint(NUM_OUTPUTS, (batch, *input_shape), generator=gen)
        y = torch.randint(NUM_OUTPUTS, (batch, *input_shape), generator=gen)
    else:
        x = torch.randn((batch, *input_shape), generator=gen)
        y = torch.randint(NUM_OUTPUTS, (batch,), generator=gen)
    return x, y


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def has(model: nn.Module, cls: type[nn.Module]) -> bool:
    return any(isinstance(m, cls) for m in model.modules())


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", available_models())
def test_every_model_trains_one_step(name):
    torch.manual_seed(0)
    shape = SMALL_INPUTS[model_info(name).inputs]
    model = build_model(name, shape, NUM_OUTPUTS)
    x, y = make_batch(name, shape)
    out = model(x)
    if model_info(name).inputs == "tokens":
        assert out.shape == (4, *shape, NUM_OUTPUTS)
        loss = nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())
    else:
        assert out.shape == (4, NUM_OUTPUTS)
        loss = nn.functional.cross_entropy(out, y)
    assert torch.isfinite(out).all()
    before = [p.detach().clone() for p in model.parameters()]
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", available_models())
def test_every_model_is_documented(name):
    info = model_info(name)
    assert info.build.__doc__ and len(info.build.__doc__) > 100
    assert info.summary
    assert info.inputs in SMALL_INPUTS


# ----------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize(
    ("name", "count"),
    [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)],
)
def test_resnet_parameter_counts_match_the_reference(name, count):
    model = build_model(name, (3, 224, 224), 1000, small_input=False)
    assert n_params(model) == count


def test_resnet_stem_follows_input_size():
    small = build_model("resnet18", (3, 32, 32), 10)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = build_model("resnet18", (3, 224, 224), 10)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)
    forced = build_model("resnet18", (3, 32, 32), 10, small_input=False)
    assert forced.conv1.kernel_size == (7, 7)
    assert forced(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet50_is_v1_5_bottleneck():
    model = build_model("resnet50", (3, 32, 32), 10)
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)  # stride on the 3x3
    assert block.conv3.out_channels == 4 * block.conv2.out_channels
    conv, bn = block.downsample
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(bn, nn.BatchNorm2d)


def test_resnet_options():
    leaky = build_model("resnet18", (1, 8, 8), 10, activation="leaky_relu", leak=0.2)
    assert any(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in leaky.modules())
    assert not has(leaky, nn.ReLU)
    zero = build_model("resnet50", (3, 8, 8), 10, zero_init_residual=True)
    assert all(torch.all(b.bn3.weight == 0) for layer in (zero.layer1, zero.layer4) for b in layer)
    assert torch.all(zero.bn1.weight == 1)
    flat = build_model("resnet18", (1, 8, 8), 10)
    assert flat(torch.randn(2, 64)).shape == (2, 10)  # 8x8 digits given as 64 features


def test_resnet_dropout_sits_before_the_classifier():
    torch.manual_seed(0)
    model = build_model("resnet18", (1, 8, 8), 10, dropout=0.5)
    pooled, fed = [], []
    model.dropout.register_forward_hook(lambda _m, args, out: pooled.append((args[0], out)))
    model.fc.register_forward_pre_hook(lambda _m, args: fed.append(args[0]))
    x = torch.randn(16, 1, 8, 8)
    model.train()
    model(x)
    (features, dropped), (into_fc,) = pooled[0], fed
    assert features.shape == (16, 512)  # the pooled features, right before the classifier
    assert into_fc is dropped
    live = features != 0
    zeroed = (dropped == 0) & live
    assert 0.35 < zeroed.float().sum() / live.float().sum() < 0.65  # about half dropped
    kept = live & ~zeroed
    torch.testing.assert_close(dropped[kept], 2 * features[kept])  # the rest scaled by 1/(1-p)
    model.eval()
    model(x)
    features, out = pooled[1]
    assert torch.equal(features, out)  # no dropout in evaluation
    # Nowhere else, and none by default.
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 1
    assert not has(build_model("resnet18", (1, 8, 8), 10), nn.Dropout)


def test_resnet_without_batch_norm_is_the_same_network_minus_its_norms():
    on = build_model("resnet50", (3, 8, 8), 10)
    off = build_model("resnet50", (3, 8, 8), 10, norm="none")
    assert not has(off, nn.BatchNorm2d)
    bn_params = sum(
        p.numel() for m in on.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    )
    n_on, n_off = (sum(p.numel() for p in m.parameters()) for m in (on, off))
    assert n_off == n_on - bn_params
    assert [n for n, m in on.named_modules() if isinstance(m, nn.Conv2d)] == [
        n for n, m in off.named_modules() if isinstance(m, nn.Conv2d)
    ]
    assert off(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(ConfigError, match="zero_init_residual"):
        build_model("resnet50", (3, 8, 8), 10, norm="none", zero_init_residual=True)


# ----------------------------------------------------------------------------- mlp and cnn


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_plain_activation_and_leak(name):
    for act, cls in [
        ("relu", nn.ReLU),
        ("tanh", nn.Tanh),
        ("sigmoid", nn.Sigmoid),
        ("gelu", nn.GELU),
    ]:
        assert has(build_model(name, (1, 8, 8), 3, depth=2, width=8, activation=act), cls)
    model = build_model(name, (1, 8, 8), 3, depth=2, width=8, activation="leaky_relu", leak=0.3)
    slopes = [m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.3, 0.3]


@pytest.mark.parametrize(
    ("name", "norm", "cls"),
    [
        ("mlp", "batch", nn.BatchNorm1d),
        ("mlp", "layer", nn.LayerNorm),
        ("cnn", "batch", nn.BatchNorm2d),
        ("cnn", "layer", nn.GroupNorm),
    ],
)
def test_plain_norm(name, norm, cls):
    model = build_model(name, (1, 8, 8), 3, depth=3, width=8, norm=norm)
    assert sum(isinstance(m, cls) for m in model.modules()) == 3
    plain = build_model(name, (1, 8, 8), 3, depth=3, width=8)
    assert not any(
        isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))
        for m in plain.modules()
    )


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_plain_dropout(name):
    model = build_model(name, (1, 8, 8), 3, depth=3, width=8, dropout=0.25)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.25] * 3
    assert not has(build_model(name, (1, 8, 8), 3, depth=3, width=8), nn.Dropout)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_plain_residual_changes_the_output_not_the_weights(name):
    torch.manual_seed(1)
    plain = build_model(name, (1, 8, 8), 3, depth=3, width=8)
    torch.manual_seed(1)
    res = build_model(name, (1, 8, 8), 3, depth=3, width=8, residual=True)
    for a, b in zip(plain.state_dict().values(), res.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(4, 1, 8, 8)
    assert not torch.allclose(plain(x), res(x))
    # the first block maps 1 channel / 64 features to width 8: no identity skip there
    assert [b.residual for b in res.blocks] == [False, True, True]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("init", ["kaiming", "xavier", "normal", "default"])
def test_plain_init_scale_multiplies_the_weights(name, init):
    torch.manual_seed(2)
    one = build_model(name, (1, 8, 8), 3, depth=3, width=16, init=init)
    torch.manual_seed(2)
    two = build_model(name, (1, 8, 8), 3, depth=3, width=16, init=init, init_scale=2.0)
    for w1, w2 in zip(weights(one), weights(two), strict=True):
        torch.testing.assert_close(w2, 2 * w1)
        torch.testing.assert_close(w2.std(), 2 * w1.std())


def test_mlp_init_choices():
    torch.manual_seed(0)
    kaiming = build_model("mlp", (256,), 3, depth=2, width=256)
    # He init: std = gain / sqrt(fan_in) = sqrt(2) / 16
    assert abs(kaiming.blocks[1].layer.weight.std().item() - 2**0.5 / 16) < 0.005
    assert torch.all(kaiming.blocks[1].layer.bias == 0)
    normal = build_model("mlp", (256,), 3, depth=2, width=256, init="normal")
    assert abs(normal.blocks[1].layer.weight.std().item() - 0.02) < 0.001
    default = build_model("mlp", (256,), 3, depth=2, width=256, init="default")
    assert not torch.all(default.blocks[1].layer.bias == 0)  # PyTorch's own init kept


def test_deep_mlp_init_scale_explodes_the_gradient():
    def grad_norm(init_scale: float) -> float:
        torch.manual_seed(0)
        model = build_model("mlp", (1, 8, 8), 10, depth=10, width=64, init_scale=init_scale)
        x, y = torch.randn(32, 64), torch.randint(10, (32,))
        nn.functional.cross_entropy(model(x), y).backward()
        return torch.linalg.vector_norm(
            torch.cat([p.grad.flatten() for p in model.parameters()])
        ).item()

    assert grad_norm(2.0) >= 100 * grad_norm(1.0)


def test_cnn_shapes():
    model = build_model("cnn", (1, 8, 8), 10, depth=2, width=8)
    assert model(torch.randn(3, 64)).shape == (3, 10)  # 8x8 digits given as 64 features
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    two_d = build_model("cnn", (8, 8), 10, depth=2, width=8)
    assert two_d(torch.randn(3, 8, 8)).shape == (3, 10)
    assert model.blocks[0].layer.kernel_size == (3, 3)


# ----------------------------------------------------------------------------- recurrent


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_recurrent_init_scale_scales_weight_hh_only(name):
    torch.manual_seed(3)
    one = build_model(name, (6, 3), 2, hidden=16, layers=2)
    torch.manual_seed(3)
    two = build_model(name, (6, 3), 2, hidden=16, layers=2, init_scale=2.0)
    for (pname, a), b in zip(one.rnn.named_parameters(), two.rnn.parameters(), strict=True):
        torch.testing.assert_close(b, 2 * a if pname.startswith("weight_hh") else a)
    assert one.rnn.num_layers == 2 and one.rnn.hidden_size == 16


def test_recurrent_families_and_readout():
    assert isinstance(build_model("rnn", (6, 3), 2).rnn, nn.RNN)
    assert build_model("rnn", (6, 3), 2).rnn.nonlinearity == "tanh"
    assert isinstance(build_model("lstm", (6, 3), 2).rnn, nn.LSTM)
    assert isinstance(build_model("gru", (6, 3), 2).rnn, nn.GRU)
    model = build_model("rnn", (6, 3), 2, hidden=8)
    x = torch.randn(4, 6, 3)
    out, _ = model.rnn(x)
    torch.testing.assert_close(model(x), model.head(out[:, -1]))
    one_feature = build_model("gru", (6,), 2, hidden=8)
    assert one_feature(torch.randn(4, 6)).shape == (4, 2)


def test_rnn_init_scale_explodes_the_gradient_through_time():
    def grad_norm(init_scale: float) -> float:
        torch.manual_seed(0)
        model = build_model("rnn", (50, 3), 2, hidden=64, init_scale=init_scale)
        model(torch.randn(8, 50, 3)).sum().backward()
        return model.rnn.weight_ih_l0.grad.norm().item()

    assert grad_norm(3.0) >= 10 * grad_norm(1.0)


# ----------------------------------------------------------------------------- gpt


def test_gpt_shapes_and_causality():
    torch.manual_seed(0)
    model = build_model("gpt", (8,), 11, d_model=16, n_heads=2).eval()
    idx = torch.randint(11, (2, 8))
    out = model(idx)
    assert out.shape == (2, 8, 11)
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 11
    out2 = model(changed)
    torch.testing.assert_close(out[:, :5], out2[:, :5])  # the past never sees the future
    assert not torch.allclose(out[:, 5:], out2[:, 5:])
    assert model(idx[:, :3]).shape == (2, 3, 11)  # shorter than the context is fine
    with pytest.raises(ConfigError, match="context_length=8"):
        model(torch.randint(11, (2, 9)))


def test_gpt_options():
    base = build_model("gpt", (8,), 11, d_model=16, n_layers=3, n_heads=4)
    assert sum(isinstance(m, nn.LayerNorm) for m in base.modules()) == 2 * 3 + 1
    qk = build_model("gpt", (8,), 11, d_model=16, n_layers=3, n_heads=4, qk_layernorm=True)
    norms = [m for m in qk.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 4 * 3 + 1
    assert qk.blocks[0].attn.q_norm.normalized_shape == (4,)  # per head: d_model / n_heads
    tied = build_model("gpt", (8,), 11, d_model=16, n_layers=3, n_heads=4, tied_embeddings=True)
    assert tied.head.weight is tied.tok_emb.weight
    assert n_params(base) - n_params(tied) == 11 * 16
    drop = build_model("gpt", (8,), 11, d_model=16, dropout=0.1)
    assert drop.blocks[0].attn.dropout == 0.1 and drop.drop.p == 0.1
    assert len(base.blocks) == 3 and base.blocks[0].attn.n_heads == 4


# ----------------------------------------------------------------------------- errors


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown model 'resnet51'; valid models: cnn, gpt") as e:
        build_model("resnet51", (3, 32, 32), 10)
    assert all(name in str(e.value) for name in available_models())


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(
        ConfigError, match="mlp: unknown option 'layers'; valid options: depth, width"
    ):
        build_model("mlp", (64,), 10, layers=3)
    with pytest.raises(ConfigError, match="valid options: small_input, activation"):
        build_model("resnet18", (3, 32, 32), 10, width=2)
    assert list(model_options("rnn")) == ["hidden", "layers", "init_scale"]
    assert model_options("mlp")["init"] == "kaiming"


@pytest.mark.parametrize(
    ("name", "shape", "options", "message"),
    [
        (
            "mlp",
            (64,),
            {"activation": "swish"},
            "activation='swish' is not one of relu, leaky_relu",
        ),
        ("mlp", (64,), {"norm": "group"}, "norm='group' is not one of none, batch, layer"),
        ("cnn", (1, 8, 8), {"init": "orthogonal"}, "init='orthogonal' is not one of kaiming"),
        ("mlp", (64,), {"depth": 2.5}, "depth=2.5 is not an integer"),
        ("mlp", (64,), {"depth": 0}, "depth=0 must be >= 1"),
        ("mlp", (64,), {"residual": "yes"}, "residual='yes' is not a boolean"),
        ("mlp", (64,), {"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ("mlp", (64,), {"init_scale": 0}, "init_scale=0.0 must be a positive"),
        ("resnet50", (3, 8, 8), {"activation": "tanh"}, "is not one of relu, leaky_relu"),
        ("resnet18", (3, 8, 8), {"small_input": "no"}, "small_input='no' is not a boolean"),
        ("resnet50", (3, 8, 8), {"norm": "layer"}, "norm='layer' is not one of batch, none"),
        ("resnet50", (3, 8, 8), {"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ("cnn", (64,), {}, r"cnn: input_shape must be \(C, H, W\) or \(H, W\)"),
        ("rnn", (6, 3, 2), {}, r"input_shape must be \(T, F\)"),
        ("lstm", (6, 3), {"hidden": 0}, "hidden=0 must be >= 1"),
        ("gpt", (8, 2), {}, r"input_shape must be \(context_length,\)"),
        ("gpt", (8,), {"d_model": 10, "n_heads": 4}, "d_model=10 is not divisible by n_heads=4"),
        ("mlp", (0, 8), {}, "input_shape must be a non-empty tuple of positive integers"),
    ],
)
def test_bad_options_raise_config_error(name, shape, options, message):
    with pytest.raises(ConfigError, match=message):
        build_model(name, shape, 10, **options)


def test_bad_num_outputs():
    with pytest.raises(ConfigError, match="num_outputs must be a positive integer"):
        build_model("mlp", (64,), 0)
