"""ResNet-18/34/50 (He et al. 2016), written from scratch in torchvision's v1.5 layout: the
design that residuals and BatchNorm keep stable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, cast

import torch
from torch import nn

from ...errors import ConfigError
from .common import _at_least, _doc, _image_shape, _probability
from .registry import register


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; ``out = act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(
        self, c_in: int, planes: int, stride: int, downsample: nn.Module | None, act, norm
    ):
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm(planes)
        self.act = act()
        self.downsample = downsample

    def last_bn(self) -> nn.Module:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: v1.5), 1x1 expand by 4; BN after each; skip added."""

    expansion = 4

    def __init__(
        self, c_in: int, planes: int, stride: int, downsample: nn.Module | None, act, norm
    ):
        super().__init__()
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm(planes * self.expansion)
        self.act = act()
        self.downsample = downsample

    def last_bn(self) -> nn.Module:
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
        dropout: float = 0.0,
        norm: str = "batch",
    ):
        super().__init__()
        channels = input_shape[0]

        def bn(c: int) -> nn.Module:  # norm="none": the same network without batch norm
            return nn.BatchNorm2d(c) if norm == "batch" else nn.Identity()

        self.input_shape = input_shape

        def act() -> nn.Module:
            return nn.LeakyReLU(leak) if activation == "leaky_relu" else nn.ReLU()

        if small_input:  # CIFAR-style stem: keep the few pixels of an 8x8-32x32 image
            self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:  # ImageNet stem: 7x7/2 conv then 3x3/2 max-pool, 4x smaller per side
            self.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = bn(64)
        self.act = act()
        stages, c_in = _stages(block, layers, act, bn)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # Dropout where a ResNet usually has it: on the pooled features, before the classifier.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c_in, num_outputs)
        _init_resnet(self, activation, leak, zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)  # accepts flat features too
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def _stages(
    block: type[BasicBlock | Bottleneck],
    layers: list[int],
    act: Callable[[], nn.Module],
    norm: Callable[[int], nn.Module],
) -> tuple[list[nn.Sequential], int]:
    """The four stages (64, 128, 256, 512 planes; stride 2 from the second on) and the channels
    they end with."""
    c_in = 64
    stages = []
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        stride = 1 if i == 0 else 2
        c_out = planes * block.expansion
        downsample = None
        if stride != 1 or c_in != c_out:
            downsample = nn.Sequential(_conv1x1(c_in, c_out, stride), norm(c_out))
        blocks = [block(c_in, planes, stride, downsample, act, norm)]
        blocks += [block(c_out, planes, 1, None, act, norm) for _ in range(n - 1)]
        stages.append(nn.Sequential(*blocks))
        c_in = c_out
    return stages, c_in


def _init_resnet(model: nn.Module, activation: str, leak: float, zero_init_residual: bool) -> None:
    """torchvision's init: He (fan-out) convs, BN scale 1 and shift 0; optionally each block's
    last BN scale 0."""
    nonlinearity: Literal["leaky_relu", "relu"] = (
        "leaky_relu" if activation == "leaky_relu" else "relu"
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=leak, mode="fan_out", nonlinearity=nonlinearity)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(cast(torch.Tensor, m.last_bn().weight))  # a norm layer's scale


def _resnet(
    block: type[BasicBlock | Bottleneck],
    layers: list[int],
    input_shape: tuple[int, ...],
    num_outputs: int,
    small_input: bool | None,
    activation: str,
    leak: float,
    zero_init_residual: bool,
    dropout: float = 0.0,
    norm: str = "batch",
) -> ResNet:
    _at_least("leak", leak, 0.0)
    _probability("dropout", dropout)
    if zero_init_residual and norm == "none":
        raise ConfigError(
            "zero_init_residual zeroes each block's last batch-norm scale; with norm='none' there "
            "is none: leave one of them out"
        )
    shape = _image_shape(input_shape)
    if small_input is None:
        small_input = shape[1] <= 64 and shape[2] <= 64
    elif not isinstance(small_input, bool):
        raise ConfigError(f"small_input={small_input!r} is not a boolean (or None: by input size)")
    return ResNet(
        block,
        layers,
        shape,
        num_outputs,
        small_input,
        activation,
        leak,
        zero_init_residual,
        dropout,
        norm,
    )


_RESNET_DOC = """ResNet-{depth} (He et al. 2016, "Deep Residual Learning"): {design}.

    Written from scratch in torchvision's v1.5 layout (stride on the 3x3 conv, downsample = 1x1
    conv + BN), with the same parameter count: at ``(3, 224, 224)``, 1000 classes and
    ``small_input=False``, {count} parameters. ``small_input`` (default: H and W <= 64) swaps the
    7x7/2 stem and 3x3/2 max-pool for a 3x3 stride-1 stem, as usual for 8x8 to 32x32 images.
    ``activation`` is ``relu`` or ``leaky_relu`` (slope ``leak``); ``zero_init_residual`` zeroes
    each block's last BN scale so the block starts as the identity (Goyal et al. 2017), off by
    default as in torchvision. ``dropout`` (default 0) is applied to the pooled features before
    the classifier, where a ResNet usually has it; ``norm="none"`` is the same network without
    batch norm (each BN an identity; the seed document's "batch norm off"). Input ``(C, H, W)``
    or ``(H, W)``; a batch may come flat.
    """

ResNetActivation = Literal["relu", "leaky_relu"]
ResNetNorm = Literal["batch", "none"]


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
    dropout: float = 0.0,
    norm: ResNetNorm = "batch",
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
        dropout,
        norm,
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
    dropout: float = 0.0,
    norm: ResNetNorm = "batch",
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
        dropout,
        norm,
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
    dropout: float = 0.0,
    norm: ResNetNorm = "batch",
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
        dropout,
        norm,
    )
