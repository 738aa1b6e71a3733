"""Pieces the model families share: option range checks, image shapes, activations, a reshape
layer, and the family docstring templates."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError


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
        return shape
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
