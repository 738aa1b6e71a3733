"""Mitigation policies and the spec language that names them.

Importing this package registers every built-in policy.
"""

from ..actions import reset_param_state_
from .adagc import adagc
from .adaptive import adaptive_clip
from .agc import agc
from .autoclip import autoclip
from .base import HostView, Policy, StepContext
from .clip import clip_layerwise, clip_norm, clip_value
from .lr_backoff import lr_backoff
from .moments import reset_moments
from .qk_clip import qk_clip
from .registry import (
    DEFAULT_SPEC,
    PolicyInfo,
    available_policies,
    list_policies,
    make_policy,
    parse_spec,
    policy_class,
    policy_info,
    policy_infos,
    register,
)
from .rollback import rollback
from .skip import skip_nonfinite, skip_spike
from .spam_clip import spam_clip
from .update import update_clip
from .zclip import zclip

__all__ = [
    "DEFAULT_SPEC",
    "HostView",
    "Policy",
    "PolicyInfo",
    "StepContext",
    "adagc",
    "adaptive_clip",
    "agc",
    "autoclip",
    "available_policies",
    "clip_layerwise",
    "clip_norm",
    "clip_value",
    "list_policies",
    "lr_backoff",
    "make_policy",
    "parse_spec",
    "policy_class",
    "policy_info",
    "policy_infos",
    "qk_clip",
    "register",
    "reset_moments",
    "reset_param_state_",
    "rollback",
    "skip_nonfinite",
    "skip_spike",
    "spam_clip",
    "update_clip",
    "zclip",
]
