"""The plain deep networks, ``mlp`` and ``cnn``: a stack of ``layer -> norm -> activation ->
dropout`` blocks without skips or normalization by default, whose gradients explode or vanish with
depth when ``init_scale`` moves off 1."""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
from torch import nn

from .common import _activation, _at_least, _image_shape, _positive, _probability, _Reshape
from .registry import register

Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "gelu"]
Norm = Literal["none", "batch", "layer"]
Init = Literal["kaiming", "xavier", "normal", "default"]


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
    # _activation builds no other: relu, tanh, sigmoid, leaky_relu (and gelu, given relu's gain)
    nonlinearity = cast(
        Literal["relu", "tanh", "sigmoid", "leaky_relu"],
        "relu" if activation == "gelu" else activation,
    )
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
