"""gradguard: prevent, detect, diagnose and mitigate exploding gradients and loss spikes.

guard = gradguard.Guard(model, optimizer, policy="default")
loss.backward()
report = guard.step(loss=loss)     # replaces optimizer.step()
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .advice import advise  # a plain function; gradguard.advice's work loads when it is called
from .errors import (
    ConfigError,
    GradGuardError,
    IntegrityError,
    SnapshotError,
    SpecError,
    StallError,
    TrainingHalted,
)
from .listeners import set_log_dir_listener

if TYPE_CHECKING:  # loaded on first use, below: ``import gradguard`` does not import torch
    from .attention import record_attention_logits, register_attention
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


def _telemetry(log_dir: Any) -> Any:
    """``Guard(log_dir=...)``'s recorder: gradguard.diagnose's Telemetry, loaded when first asked
    for (the core knows only the listener protocol, :mod:`gradguard.listeners`)."""
    from .diagnose.telemetry import Telemetry

    return Telemetry(log_dir)


set_log_dir_listener(_telemetry)

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

#: The top-level names that need torch, each with the module that defines it: loaded on first use,
#: so that ``import gradguard`` (and the CLI's ``--help``, ``check``, ``policies``) start at once.
_FROM = {
    "Guard": ".guard",
    "GuardedOptimizer": ".optim",
    "StepReport": ".report",
    "record_attention_logits": ".attention",
    "register_attention": ".attention",
    **{
        name: ".policies"
        for name in __all__
        if name[0].islower()
        and name not in ("advise", "__version__", "record_attention_logits", "register_attention")
    },
    "DEFAULT_SPEC": ".policies",
    "Policy": ".policies",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in _FROM:
        value = getattr(importlib.import_module(_FROM[name], __name__), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'gradguard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_LAZY))
