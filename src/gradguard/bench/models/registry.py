"""The model registry: families registered by name, their info records, and ``build_model``.

One shape with the other registries (tasks, diagnosis rules, faults): a frozen :class:`ModelInfo`
per family (name, builder, summary, options), ``list_models()`` for the names,
``model_infos()`` for every record by name and ``model_info(name)`` for one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ...errors import ConfigError
from ...registries import InfoRecord
from ..options import OptionInfo, check_type, options_of, summary_of

#: What a family's ``input_shape`` describes (tests and the bench pick inputs from it).
Inputs = Literal["any", "image", "sequence", "tokens"]


@dataclass(frozen=True)
class ModelInfo(InfoRecord):
    """One registered family: its name, its builder, its one-line summary (the builder's
    docstring's first line), its options (the builder's keyword-only parameters, with defaults
    and types) and the kind of input it takes."""

    name: str
    build: Callable[..., nn.Module]
    summary: str
    options: tuple[OptionInfo, ...]
    inputs: str


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
        options = options_of(fn, keyword_only=True)
        _REGISTRY[name] = ModelInfo(name, fn, summary_of(fn.__doc__), options, inputs)
        return fn

    return deco


def available_models() -> list[str]:
    """Names of every registered model family, sorted."""
    return sorted(_REGISTRY)


def list_models() -> list[str]:
    """Names of every registered model family, sorted (the same as ``available_models()``)."""
    return available_models()


def model_infos() -> dict[str, ModelInfo]:
    """Every registered family's record by name, sorted by name."""
    return {name: _REGISTRY[name] for name in available_models()}


def model_info(name: str) -> ModelInfo:
    """The record of family ``name``; an unknown name raises ``ConfigError`` naming the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; valid models: {', '.join(available_models())}"
        ) from None


def model_options(name: str) -> dict[str, Any]:
    """The options of model ``name`` with their defaults, in declaration order."""
    return model_info(name).defaults


def build_model(
    name: str, input_shape: tuple[int, ...], num_outputs: int, **options: Any
) -> nn.Module:
    """Build model family ``name`` for inputs ``(B, *input_shape)`` and ``num_outputs`` outputs."""
    info = model_info(name)
    types = {o.name: o.type for o in info.options}
    for key in options:
        if key not in types:
            raise ConfigError(
                f"{name}: unknown option {key!r}; valid options: {', '.join(types) or 'none'}"
            )
    shape = _check_shape(name, input_shape)
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ConfigError(f"{name}: num_outputs must be a positive integer, got {num_outputs!r}")
    checked = {k: check_type(name, k, v, types[k]) for k, v in options.items()}
    try:
        return info.build(shape, num_outputs, **checked)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


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
