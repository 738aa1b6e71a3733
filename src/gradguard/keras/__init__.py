"""gradguard for Keras 3: the Guard's policies in ``keras.ops`` (TensorFlow, JAX and torch
backends) as an optimizer wrapper, and a callback that writes the Guard's telemetry.

    import keras
    from gradguard.keras import GuardedOptimizer, GuardTelemetry

    opt = GuardedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), policy="default")
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, callbacks=[GuardTelemetry("runs/keras")])   # then: gradguard report runs/keras
    opt.counters                                                # {"steps": ..., "skipped": ...}

Importing :mod:`gradguard` never imports Keras; importing this package does, and says what to
install when it is missing.
"""

from __future__ import annotations

try:
    import keras as _keras
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "gradguard.keras needs Keras 3 and a backend: pip install gradguard[keras] "
        f"(or: pip install keras tensorflow) ({e})"
    ) from e

if int(_keras.__version__.split(".")[0]) < 3:  # pragma: no cover
    raise ImportError(
        f"gradguard.keras needs Keras 3, found keras {_keras.__version__}: pip install gradguard[keras]"
    )

from .callback import GuardTelemetry
from .optimizer import GuardedOptimizer, build_chain
from .policies import (
    KERAS_POLICIES,
    REFUSED,
    KerasPolicy,
    VarLayout,
    available_policies,
    parse_keras_spec,
)

__all__ = [
    "KERAS_POLICIES",
    "REFUSED",
    "GuardTelemetry",
    "GuardedOptimizer",
    "KerasPolicy",
    "VarLayout",
    "available_policies",
    "build_chain",
    "parse_keras_spec",
]
