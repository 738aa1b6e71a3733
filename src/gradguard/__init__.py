"""gradguard: prevent, detect, diagnose and mitigate exploding gradients and loss spikes.

guard = gradguard.Guard(model, optimizer, policy="default")
loss.backward()
report = guard.step(loss=loss)     # replaces optimizer.step()
"""

import importlib
from typing import Any

from . import advise  # a callable package: gradguard.advise(...); its work loads when called
from .attention import record_attention_logits, register_attention
from .errors import (
    ConfigError,
    GradGuardError,
    IntegrityError,
    SnapshotError,
    SpecError,
    StallError,
    TrainingHalted,
)
from .guard import Guard
from .optim import GuardedOptimizer
from .policies import (
    DEFAULT_SPEC,
    Policy,
    adagc,
    adaptive_clip,
    agc,
    autoclip,
    available_policies,
    clip_layerwise,
    clip_norm,
    clip_value,
    lr_backoff,
    parse_spec,
    qk_clip,
    reset_moments,
    rollback,
    skip_nonfinite,
    skip_spike,
    spam_clip,
    update_clip,
    zclip,
)
from .report import StepReport

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SPEC",
    "ConfigError",
    "GradGuardError",
    "Guard",
    "GuardedOptimizer",
    "IntegrityError",
    "Policy",
    "SnapshotError",
    "SpecError",
    "StallError",
    "StepReport",
    "TrainingHalted",
    "__version__",
    "adagc",
    "adaptive_clip",
    "advise",
    "agc",
    "autoclip",
    "available_policies",
    "clip_layerwise",
    "clip_norm",
    "clip_value",
    "lr_backoff",
    "parse_spec",
    "qk_clip",
    "record_attention_logits",
    "register_attention",
    "reset_moments",
    "rollback",
    "skip_nonfinite",
    "skip_spike",
    "spam_clip",
    "update_clip",
    "zclip",
]


#: Subpackages reachable as ``gradguard.<name>`` after ``import gradguard``, loaded on first use
#: (so ``import gradguard`` stays light): ``gradguard.faults.parse(...)`` works as written.
_LAZY = ("bench", "diagnose", "faults", "integrations", "keras")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gradguard' has no attribute {name!r}")
