"""gradguard: prevent, detect, diagnose and mitigate exploding gradients and loss spikes.

guard = gradguard.Guard(model, optimizer, policy="default")
loss.backward()
report = guard.step(loss=loss)     # replaces optimizer.step()
"""

from . import advise  # a callable package: gradguard.advise(...); its work loads when called
from .errors import ConfigError, GradGuardError, SnapshotError, SpecError
from .guard import Guard
from .layout import ParamLayout
from .optim import GuardedOptimizer
from .policies import (
    DEFAULT_SPEC,
    Policy,
    StepContext,
    agc,
    autoclip,
    available_policies,
    clip_layerwise,
    clip_norm,
    clip_value,
    lr_backoff,
    parse_spec,
    reset_moments,
    rollback,
    skip_nonfinite,
    skip_spike,
    zclip,
)
from .report import StepReport
from .stats import GradStats, compute_grad_stats

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SPEC",
    "ConfigError",
    "GradGuardError",
    "GradStats",
    "Guard",
    "GuardedOptimizer",
    "ParamLayout",
    "Policy",
    "SnapshotError",
    "SpecError",
    "StepContext",
    "StepReport",
    "__version__",
    "advise",
    "agc",
    "autoclip",
    "available_policies",
    "clip_layerwise",
    "clip_norm",
    "clip_value",
    "compute_grad_stats",
    "lr_backoff",
    "parse_spec",
    "reset_moments",
    "rollback",
    "skip_nonfinite",
    "skip_spike",
    "zclip",
]
