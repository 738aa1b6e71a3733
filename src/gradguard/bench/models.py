"""The model families of the ``gradguard bench`` suite, registered by name.

``build_model(name, input_shape, num_outputs, **options)`` builds one; ``available_models()`` lists
them, ``model_options(name)`` gives a family's options with their defaults. Every model's forward
takes a batch ``(B, *input_shape)`` and returns ``(B, num_outputs)``; ``gpt`` takes ``(B, T)`` token
ids and returns ``(B, T, vocab)`` logits (``num_outputs`` is the vocabulary size).

The families cover the ways gradients explode that the bench compares mitigations on: a deep plain
``mlp``/``cnn`` whose ``init_scale`` > 1 makes the gradient grow geometrically with depth; the
``resnet*`` designs that residuals and BatchNorm keep stable; ``rnn``/``lstm``/``gru`` whose
recurrent ``init_scale`` pushes the spectral radius past 1; and a small ``gpt`` whose attention
logits grow without ``qk_layernorm``.

    >>> model = build_model("mlp", (1, 8, 8), 10, depth=12, init_scale=1.5)
    >>> build_model("resnet51", (3, 32, 32), 10)
    Traceback (most recent call last):
    ...
    gradguard.errors.ConfigError: unknown model 'resnet51'; valid models: cnn, gpt, gru, ...

A bad name, an unknown option or a bad value raises ``gradguard.ConfigError`` naming the valid
choices.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = [
    "ModelInfo",
    "available_models",
    "build_model",
    "model_info",
    "model_options",
    "register",
]

Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "gelu"]
Norm = Literal["none", "batch", "layer"]
Init = Literal["kaiming", "xavier", "normal", "default"]

#: What a family's ``input_shape`` describes (tests and the bench pick inputs from it).
Inputs = Literal["any", "image", "sequence", "tokens"]


@dataclass(frozen=True)
class ModelInfo:
    """One registered family: its name, its builder, and the kind of input it takes."""

    name: str
    build: Callable[..., nn.Module]
    inputs: str
    summary: str


_REGISTRY: dict[str, ModelInfo] = {}


def register(name: str, inputs: Inputs) -> Callable[[Callable[..., nn.Module]], Callable]:
    """Register ``fn(input_shape, num_outputs, *, option=default, ...)`` as model ``name``.

    Options are the builder's keyword-only parameters; their annotations (``int``, ``float``,
    ``bool`` or a ``Literal`` of choices) are checked by ``build_model`` before the call.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not fn.__doc__:
            raise TypeError(f"model builder {fn.__name__} needs a docstring")
        if name in _REGISTRY and _REGISTRY[name].build is not fn:
            raise TypeError(f"model name {name!r} is already registered")
        summary = inspect.cleandoc(fn.__doc__).splitlines()[0]
        _REGISTRY[name] = ModelInfo(name, fn, inputs, summary)
        return fn

    return deco


def available_models() -> list[str]:
    """Names of every registered model family, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; valid models: {', '.join(available_models())}"
        ) from None


def model_options(name: str) -> dict[str, Any]:
    """The options of model ``name`` with their defaults, in declaration order."""
    sig = inspect.signature(model_info(name).build)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_model(
    name: str, input_shape: tuple[int, ...], num_outputs: int, **options: Any
) -> nn.Module:
    """Build model family ``name`` for inputs ``(B, *input_shape)`` and ``num_outputs`` outputs."""
    info = model_info(name)
    valid = model_options(name)
    for key in options:
        if key not in valid:
            raise ConfigError(
                f"{name}: unknown option {key!r}; valid options: {', '.join(valid) or 'none'}"
            )
    shape = _check_shape(name, input_shape)
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ConfigError(f"{name}: num_outputs must be a positive integer, got {num_outputs!r}")
    hints = typing.get_type_hints(info.build)
    checked = {k: _check_type(name, k, v, hints[k]) for k, v in options.items()}
    try:
        return info.build(shape, num_outputs, **checked)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


# ---------------------------------------------------------------------------------------------
# option checking


def _check_shape(name: str, input_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ConfigError(
            f"{name}: input_shape must be a tuple of positive integers, got {input_shape!r}"
        ) from None
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ConfigError(
            f"{name}: input_shape must be a non-empty tuple of positive integers, got {input_shape!r}"
        )
    return shape


def _check_type(model: str, key: str, value: Any, hint: Any) -> Any:
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{model}: {key}={value!r} is not one of {', '.join(choices)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{model}: {key}={value!r} is not a boolean (use True or False)")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{model}: {key}={value!r} is not an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{model}: {key}={value!r} is not a number")
        return float(value)
    return value


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value!r} must be >= {low}")


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{key}={value!r} must be a positive finite number")


def _probability(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{key}={value!r} must be in [0, 1)")


def _image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)``, or ``(H, W)`` read as one channel."""
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    raise ConfigError(f"input_shape must be (C, H, W) or (H, W) for images, got {shape}")


def _activation(activation: str, leak: float) -> nn.Module:
    if activation == "leaky_relu":
        return nn.LeakyReLU(leak)
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}[activation]()


def _doc(template: str, **fields: Any) -> Callable[[Callable], Callable]:
    """Give a builder a docstring from a template shared by its family (set before registering)."""

    def deco(fn: Callable) -> Callable:
        fn.__doc__ = template.format(**fields)
        return fn

    return deco


class _Reshape(nn.Module):
    """View a batch as ``(B, *shape)``: lets an image model take flat features (8x8 digits as 64)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


# ---------------------------------------------------------------------------------------------
# plain deep networks: mlp, cnn


class _Block(nn.Module):
    """``layer -> norm -> activation -> dropout``, plus ``x`` when ``residual`` (and shapes match).

    The flag changes the forward only, never the parameters, so a residual and a plain net built
    from the same seed hold the same weights.
    """

    def __init__(
        self, layer: nn.Module, norm: nn.Module, act: nn.Module, dropout: float, residual: bool
    ):
        super().__init__()
        self.layer, self.norm, self.act = layer, norm, act
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.act(self.norm(self.layer(x))))
        return x + y if self.residual else y

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


class PlainNet(nn.Module):
    """``stem`` (reshape) -> ``blocks`` -> ``pool`` -> ``head``: the mlp and cnn families."""

    def __init__(self, stem: nn.Module, blocks: list[_Block], pool: nn.Module, head: nn.Linear):
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.pool = pool
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))))


def _check_plain(depth: int, width: int, leak: float, dropout: float, init_scale: float) -> None:
    _at_least("depth", depth, 1)
    _at_least("width", width, 1)
    _at_least("leak", leak, 0.0)
    _probability("dropout", dropout)
    _positive("init_scale", init_scale)


def _init_weights(
    model: nn.Module, init: str, init_scale: float, activation: str, leak: float
) -> None:
    """Initialise every Linear/Conv2d weight by ``init``, then multiply it by ``init_scale``.

    ``kaiming``/``xavier`` use the activation's gain (GELU takes ReLU's); ``normal`` is the fixed
    N(0, 0.02) of GPT-2/BERT; ``default`` keeps PyTorch's own init. The three non-default inits
    zero the biases.
    """
    nonlinearity = "relu" if activation == "gelu" else activation
    gain = nn.init.calculate_gain(nonlinearity, leak)
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=leak, nonlinearity=nonlinearity)
            elif init == "xavier":
                nn.init.xavier_normal_(m.weight, gain=gain)
            elif init == "normal":
                nn.init.normal_(m.weight, 0.0, 0.02)
            if init != "default" and m.bias is not None:
                nn.init.zeros_(m.bias)
            m.weight.mul_(init_scale)


@register("mlp", inputs="any")
def mlp(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    depth: int = 4,
    width: int = 128,
    activation: Activation = "relu",
    leak: float = 0.01,
    dropout: float = 0.0,
    norm: Norm = "none",
    residual: bool = False,
    init: Init = "kaiming",
    init_scale: float = 1.0,
) -> nn.Module:
    """Plain deep MLP on the flattened input: ``depth`` hidden blocks of ``width``, a linear head.

    Each block is ``Linear -> norm -> activation -> dropout``; ``norm`` is ``batch``
    (BatchNorm1d), ``layer`` (LayerNorm) or ``none``. ``residual`` adds an identity skip around
    every block whose input and output widths match (all but the first, unless the input already
    has ``width`` features). ``leak`` is leaky_relu's negative slope.

    Defaults: no norm, no skip and He init (He et al. 2015), the deep plain net where gradients
    explode or vanish with depth. ``init_scale`` multiplies every initial weight (head included):
    each layer then multiplies the signal and the gradient by about ``init_scale``, so with ReLU
    the gradient grows like ``init_scale ** depth`` (2 at depth 8 is ~256x).
    """
    _check_plain(depth, width, leak, dropout, init_scale)
    features = math.prod(input_shape)
    blocks = []
    for i in range(depth):
        d_in = features if i == 0 else width
        if norm == "batch":
            norm_layer: nn.Module = nn.BatchNorm1d(width)
        elif norm == "layer":
            norm_layer = nn.LayerNorm(width)
        else:
            norm_layer = nn.Identity()
        blocks.append(
            _Block(
                nn.Linear(d_in, width),
                norm_layer,
                _activation(activation, leak),
                dropout,
                residual and d_in == width,
            )
        )
    model = PlainNet(nn.Flatten(), blocks, nn.Identity(), nn.Linear(width, num_outputs))
    _init_weights(model, init, init_scale, activation, leak)
    return model


@register("cnn", inputs="image")
def cnn(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    depth: int = 4,
    width: int = 128,
    activation: Activation = "relu",
    leak: float = 0.01,
    dropout: float = 0.0,
    norm: Norm = "none",
    residual: bool = False,
    init: Init = "kaiming",
    init_scale: float = 1.0,
) -> nn.Module:
    """Plain deep CNN: ``depth`` 3x3 conv blocks of ``width`` channels, global average pool, linear.

    ``input_shape`` is ``(C, H, W)`` or ``(H, W)`` (one channel); a batch may come flat, e.g. the
    64 features of 8x8 digits with ``input_shape=(1, 8, 8)``. Each block is ``Conv3x3 (stride 1,
    padding 1) -> norm -> activation -> dropout``; ``norm`` is ``batch`` (BatchNorm2d), ``layer``
    (GroupNorm with one group, i.e. LayerNorm over C, H, W) or ``none``. Options and defaults as
    for ``mlp`` (no norm, no skip, He init: the plain net whose gradients explode with depth).
    There is no downsampling, so the cost grows with H x W: keep images small or width modest.
    """
    _check_plain(depth, width, leak, dropout, init_scale)
    channels, height, width_px = _image_shape(input_shape)
    blocks = []
    for i in range(depth):
        c_in = channels if i == 0 else width
        if norm == "batch":
            norm_layer: nn.Module = nn.BatchNorm2d(width)
        elif norm == "layer":
            norm_layer = nn.GroupNorm(1, width)
        else:
            norm_layer = nn.Identity()
        blocks.append(
            _Block(
                nn.Conv2d(c_in, width, 3, padding=1),
                norm_layer,
                _activation(activation, leak),
                dropout,
                residual and c_in == width,
            )
        )
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = PlainNet(
        _Reshape((channels, height, width_px)), blocks, pool, nn.Linear(width, num_outputs)
    )
    _init_weights(model, init, init_scale, activation, leak)
    return model


# ---------------------------------------------------------------------------------------------
# ResNet (He et al. 2016), torchvision's v1.5 layout


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; ``out = act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None, act):
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = act()
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: v1.5), 1x1 expand by 4; BN after each; skip added."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None, act):
        super().__init__()
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act = act()
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + identity)


class ResNet(nn.Module):
    """The ResNet of He et al. 2016 with torchvision's module names (``conv1 ... layer4, fc``)."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        input_shape: tuple[int, int, int],
        num_outputs: int,
        small_input: bool,
        activation: str,
        leak: float,
        zero_init_residual: bool,
    ):
        super().__init__()
        channels = input_shape[0]
        self.input_shape = input_shape

        def act() -> nn.Module:
            return nn.LeakyReLU(leak) if activation == "leaky_relu" else nn.ReLU()

        if small_input:  # CIFAR-style stem: keep the few pixels of an 8x8-32x32 image
            self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:  # ImageNet stem: 7x7/2 conv then 3x3/2 max-pool, 4x smaller per side
            self.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = act()
        c_in = 64
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            c_out = planes * block.expansion
            downsample = None
            if stride != 1 or c_in != c_out:
                downsample = nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))
            blocks = [block(c_in, planes, stride, downsample, act)]
            blocks += [block(c_out, planes, 1, None, act) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_outputs)

        nonlinearity = "leaky_relu" if activation == "leaky_relu" else "relu"
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=leak, mode="fan_out", nonlinearity=nonlinearity)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)  # accepts flat features too
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(
    block: type[BasicBlock | Bottleneck],
    layers: list[int],
    input_shape: tuple[int, ...],
    num_outputs: int,
    small_input: bool | None,
    activation: str,
    leak: float,
    zero_init_residual: bool,
) -> ResNet:
    _at_least("leak", leak, 0.0)
    shape = _image_shape(input_shape)
    if small_input is None:
        small_input = shape[1] <= 64 and shape[2] <= 64
    elif not isinstance(small_input, bool):
        raise ConfigError(f"small_input={small_input!r} is not a boolean (or None: by input size)")
    return ResNet(
        block, layers, shape, num_outputs, small_input, activation, leak, zero_init_residual
    )


_RESNET_DOC = """ResNet-{depth} (He et al. 2016, "Deep Residual Learning"): {design}.

    Written from scratch in torchvision's v1.5 layout (stride on the 3x3 conv, downsample = 1x1
    conv + BN), with the same parameter count: at ``(3, 224, 224)``, 1000 classes and
    ``small_input=False``, {count} parameters. ``small_input`` (default: H and W <= 64) swaps the
    7x7/2 stem and 3x3/2 max-pool for a 3x3 stride-1 stem, as usual for 8x8 to 32x32 images.
    ``activation`` is ``relu`` or ``leaky_relu`` (slope ``leak``); ``zero_init_residual`` zeroes
    each block's last BN scale so the block starts as the identity (Goyal et al. 2017), off by
    default as in torchvision. Input ``(C, H, W)`` or ``(H, W)``; a batch may come flat.
    """

ResNetActivation = Literal["relu", "leaky_relu"]


@register("resnet18", inputs="image")
@_doc(_RESNET_DOC, depth=18, design="BasicBlock stages [2, 2, 2, 2]", count="11,689,512")
def resnet18(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    small_input: bool | None = None,
    activation: ResNetActivation = "relu",
    leak: float = 0.01,
    zero_init_residual: bool = False,
) -> nn.Module:
    return _resnet(
        BasicBlock,
        [2, 2, 2, 2],
        input_shape,
        num_outputs,
        small_input,
        activation,
        leak,
        zero_init_residual,
    )


@register("resnet34", inputs="image")
@_doc(_RESNET_DOC, depth=34, design="BasicBlock stages [3, 4, 6, 3]", count="21,797,672")
def resnet34(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    small_input: bool | None = None,
    activation: ResNetActivation = "relu",
    leak: float = 0.01,
    zero_init_residual: bool = False,
) -> nn.Module:
    return _resnet(
        BasicBlock,
        [3, 4, 6, 3],
        input_shape,
        num_outputs,
        small_input,
        activation,
        leak,
        zero_init_residual,
    )


@register("resnet50", inputs="image")
@_doc(
    _RESNET_DOC,
    depth=50,
    design="Bottleneck stages [3, 4, 6, 3], expansion 4",
    count="25,557,032",
)
def resnet50(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    small_input: bool | None = None,
    activation: ResNetActivation = "relu",
    leak: float = 0.01,
    zero_init_residual: bool = False,
) -> nn.Module:
    return _resnet(
        Bottleneck,
        [3, 4, 6, 3],
        input_shape,
        num_outputs,
        small_input,
        activation,
        leak,
        zero_init_residual,
    )


# ---------------------------------------------------------------------------------------------
# recurrent networks: rnn, lstm, gru


class RecurrentNet(nn.Module):
    """A recurrent stack over ``(B, T, F)`` and a linear readout of the last step's hidden state."""

    def __init__(self, rnn: nn.RNNBase, num_outputs: int, features: int):
        super().__init__()
        self.features = features
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(x.shape[0], -1, self.features))
        return self.head(out[:, -1])


def _recurrent(
    cls: type[nn.RNNBase],
    input_shape: tuple[int, ...],
    num_outputs: int,
    hidden: int,
    layers: int,
    init_scale: float,
) -> nn.Module:
    _at_least("hidden", hidden, 1)
    _at_least("layers", layers, 1)
    _positive("init_scale", init_scale)
    if len(input_shape) == 1:
        features = 1
    elif len(input_shape) == 2:
        features = input_shape[1]
    else:
        raise ConfigError(f"input_shape must be (T, F) or (T,) for sequences, got {input_shape}")
    rnn = cls(features, hidden, num_layers=layers, batch_first=True)
    with torch.no_grad():
        for pname, p in rnn.named_parameters():
            if pname.startswith("weight_hh"):
                p.mul_(init_scale)
    return RecurrentNet(rnn, num_outputs, features)


_RECURRENT_DOC = """{title} over sequences ``(T, F)`` (or ``(T,)``, one feature); batch ``(B, T, F)``.

    ``layers`` stacked ``nn.{cls}`` layers of ``hidden`` units (PyTorch's init,
    U(-1/sqrt(hidden), 1/sqrt(hidden))), read out by a linear layer on the last time step's hidden
    state. ``init_scale`` multiplies the recurrent weights ``weight_hh`` only: the gradient through
    T steps scales like the recurrent Jacobian to the power T, so a spectral radius above 1
    explodes it (Pascanu et al. 2013). The default init has a radius near 1/sqrt(3) ~ 0.58 per
    gate matrix, so ``init_scale`` >~ 2 makes a vanilla RNN explode. {extra}
    """


@register("rnn", inputs="sequence")
@_doc(
    _RECURRENT_DOC,
    title="Vanilla tanh RNN (Elman 1990)",
    cls="RNN",
    extra="The family where gradients explode most readily.",
)
def rnn(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    hidden: int = 128,
    layers: int = 1,
    init_scale: float = 1.0,
) -> nn.Module:
    return _recurrent(nn.RNN, input_shape, num_outputs, hidden, layers, init_scale)


@register("lstm", inputs="sequence")
@_doc(
    _RECURRENT_DOC,
    title="LSTM (Hochreiter & Schmidhuber 1997)",
    cls="LSTM",
    extra="Its gates damp the explosion that a vanilla RNN shows at the same scale.",
)
def lstm(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    hidden: int = 128,
    layers: int = 1,
    init_scale: float = 1.0,
) -> nn.Module:
    return _recurrent(nn.LSTM, input_shape, num_outputs, hidden, layers, init_scale)


@register("gru", inputs="sequence")
@_doc(
    _RECURRENT_DOC,
    title="GRU (Cho et al. 2014)",
    cls="GRU",
    extra="Gated like the LSTM, with one state and three gates.",
)
def gru(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    hidden: int = 128,
    layers: int = 1,
    init_scale: float = 1.0,
) -> nn.Module:
    return _recurrent(nn.GRU, input_shape, num_outputs, hidden, layers, init_scale)


# ---------------------------------------------------------------------------------------------
# GPT: a small pre-LN decoder-only transformer


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
                    nn.init.zeros_(m.bias)
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
