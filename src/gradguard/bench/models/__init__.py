"""The model families of the ``gradguard bench`` suite, registered by name.

``build_model(name, input_shape, num_outputs, **options)`` builds one; ``list_models()`` (or
``available_models()``) lists them, ``model_info(name)`` gives a family's record (summary,
options with their types and defaults, inputs) and ``model_options(name)`` its options'
defaults. Every model's forward
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

One family a module: ``plain`` (mlp, cnn), ``resnet``, ``recurrent`` (rnn, lstm, gru),
``transformer`` (gpt); ``registry`` holds the registry and ``build_model``, ``common`` the pieces
they share.
"""

from __future__ import annotations

from ..options import OptionInfo
from ..options import check_type as _check_type  # noqa: F401 (bench.config and keras_train use it)
from .plain import Activation, Init, Norm, PlainNet, cnn, mlp
from .recurrent import RecurrentNet, gru, lstm, rnn
from .registry import (
    Inputs,
    ModelInfo,
    available_models,
    build_model,
    list_models,
    model_info,
    model_infos,
    model_options,
    register,
)
from .resnet import BasicBlock, Bottleneck, ResNet, ResNetActivation, resnet18, resnet34, resnet50
from .transformer import GPT, CausalSelfAttention, TransformerBlock, gpt

__all__ = [
    "GPT",
    "Activation",
    "BasicBlock",
    "Bottleneck",
    "CausalSelfAttention",
    "Init",
    "Inputs",
    "ModelInfo",
    "Norm",
    "OptionInfo",
    "PlainNet",
    "RecurrentNet",
    "ResNet",
    "ResNetActivation",
    "TransformerBlock",
    "available_models",
    "build_model",
    "cnn",
    "gpt",
    "gru",
    "list_models",
    "lstm",
    "mlp",
    "model_info",
    "model_infos",
    "model_options",
    "register",
    "resnet18",
    "resnet34",
    "resnet50",
    "rnn",
]
