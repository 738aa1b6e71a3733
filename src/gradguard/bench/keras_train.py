"""The bench's Keras variant: model names that train with Keras 3 (TensorFlow backend) instead of
torch, validated here without importing Keras, trained by :mod:`gradguard.bench.keras_loop`.

``keras_mlp`` is the torch ``mlp`` in Keras, on the same tasks, splits and batches; the ``keras``
suite (:data:`SUITE`) is the seed document's TensorFlow scenario with it: Dropout, SGD with
momentum, handwritten digits. A run is a
:class:`~gradguard.bench.config.RunConfig` like any other (``model="keras_mlp"``); the mitigation
axis works the same (``dropout``, ``leaky_relu``, ``momentum``, ``nesterov``, ``batchnorm``,
``layernorm`` and every policy Keras has), and its result goes into the same SQLite rows.

    RunConfig(task="digits", model="keras_mlp", optimizer="momentum", lr=0.03,
              model_options={"dropout": 0.1}, mitigation="default", faults="nan:at=20")
"""

from __future__ import annotations

import contextlib
import inspect
import os
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from ..errors import ConfigError

#: Faults the Keras trainer injects (``fp16_overflow`` needs torch's GradScaler).
KERAS_FAULTS = ("nan", "inf", "spike", "poison", "lr_burst")


def keras_mlp(
    *,
    depth: int = 4,
    width: int = 128,
    activation: Literal["relu", "leaky_relu", "tanh"] = "relu",
    leak: float = 0.01,
    dropout: float = 0.0,
    norm: Literal["none", "batch", "layer"] = "none",
    init_scale: float = 1.0,
    jit_compile: bool = False,
) -> dict[str, Any]:
    """Keras MLP on the flattened input: ``depth`` blocks of ``Dense(width) -> norm ->
    activation -> Dropout(dropout)``, then a ``Dense`` head (logits).

    The torch ``mlp``'s design and defaults, with fewer options (He-normal kernels times ``init_scale``,
    zero biases, no dropout unless asked: the ``dropout`` mitigation means the same for both).
    The seed document's ``tf.keras`` scenario is ``dropout=0.1`` with SGD momentum 0.9: the
    ``keras`` suite (:data:`SUITE`). ``jit_compile`` compiles the train step with XLA.
    """
    return dict(locals())


#: The ``keras`` suite (``gradguard bench --suite keras``): the seed document's TensorFlow scenario,
#: a deep MLP with Dropout(0.1) trained with SGD and momentum 0.9 on handwritten digits (the quick
#: suite's net and LRs), unguarded (``none``) and with the Guard's policies on top.
SUITE: list[tuple[dict[str, Any], dict[str, list[Any]]]] = [  # config.Grid
    (
        {
            "steps": 300,
            "batch_size": 64,
            "model_options": {"depth": 12, "width": 64, "dropout": 0.1},
        },
        {
            "task": ["digits"],
            "model": ["keras_mlp"],
            "optimizer": ["momentum"],
            "lr": [0.01, 0.03, 0.1, 0.3],
            "mitigation": ["none", "clip_norm:1.0", "zclip", "autoclip:10", "agc:0.01", "default"],
            "seed": [0, 1, 2],
        },
    )
]

#: Keras model families: name -> options signature (keyword-only, annotated, with defaults).
KERAS_MODELS: dict[str, Callable[..., dict[str, Any]]] = {"keras_mlp": keras_mlp}


def is_keras_model(name: Any) -> bool:
    return isinstance(name, str) and name in KERAS_MODELS


def model_options(name: str) -> dict[str, Any]:
    """The options of Keras model ``name`` with their defaults."""
    sig = inspect.signature(KERAS_MODELS[name])
    return {p.name: p.default for p in sig.parameters.values()}


def check_config(cfg: Any, mopts: Mapping[str, Any], mitigation: str) -> None:
    """What ``bench.config`` checks for a torch model, for a Keras one: option names and types,
    the faults the Keras trainer can inject, and that the policy is one Keras has."""
    from .models import _check_type

    valid = model_options(cfg.model)
    hints = typing.get_type_hints(KERAS_MODELS[cfg.model])
    bad = sorted(set(mopts) - set(valid))
    if bad:
        via = (
            f" (set by mitigation {mitigation!r})" if not set(bad) <= set(cfg.model_options) else ""
        )
        raise ConfigError(
            f"model {cfg.model}: unknown option(s) {', '.join(bad)}{via}; valid options: "
            f"{', '.join(valid)}"
        )
    for k, v in mopts.items():
        _check_type(cfg.model, k, v, hints[k])
    if cfg.faults.strip() != "none":
        from ..faults import parse as parse_faults

        names = [f.name for f in parse_faults(cfg.faults, seed=cfg.seed).faults]
        unsupported = sorted(set(names) - set(KERAS_FAULTS))
        if unsupported:
            raise ConfigError(
                f"model {cfg.model}: the Keras trainer cannot inject {', '.join(unsupported)}; "
                f"it injects {', '.join(KERAS_FAULTS)}"
            )


def check_policy(cfg: Any, policy: str | None) -> None:
    """A policy Keras cannot run (``rollback``, ``reset_moments``, ``skip_spike:on=loss``) fails
    before any run starts. Imports Keras (only for grids with a Keras model); without Keras
    installed the run itself says what to install."""
    if policy is None:
        return
    try:
        from ..keras.policies import parse_keras_spec
    except ImportError:
        return
    try:
        parse_keras_spec(policy)
    except ConfigError as e:
        raise ConfigError(f"model {cfg.model}: {e}") from None


def pin_tf_threads(n: int) -> bool:
    """Give TensorFlow's intra-op pool ``n`` threads (what a run's ``threads`` names); False when
    it cannot: TensorFlow fixes its pools when its runtime starts, and it started in this process
    with another count. The inter-op pool (independent ops side by side, each computing what it
    would alone) gets ``n`` too where it still can; it does not change a result."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
    except RuntimeError:
        return False
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_inter_op_parallelism_threads(n)
    return True


def can_pin_threads(n: int) -> bool:
    """Whether a Keras run with ``threads=n`` can train in this process: TensorFlow is not
    imported, or its intra-op pool is (or can still be made) ``n`` threads."""
    import sys

    if "tensorflow" not in sys.modules:
        return True
    return pin_tf_threads(n)


def train_run(
    cfg: Any,
    on_step: Callable[[int], None] | None = None,
    log_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one Keras configuration (see :func:`gradguard.bench.keras_loop.train_run`)."""
    try:
        from .keras_loop import train_run as keras_train_run
    except ImportError as e:
        raise ConfigError(
            f"model {cfg.model} trains with Keras, which is not installed: "
            f"pip install gradguard[keras] ({e})"
        ) from None
    return keras_train_run(cfg, on_step=on_step, log_dir=log_dir)
