"""Diagnosis rules: from a run's telemetry to plain-language findings (cause, evidence, advice).

Each rule is a small function ``rule(run: RunLog) -> Finding | None`` registered in :data:`RULES`
(in the order they are listed in reports with equal severity); ``diagnose`` runs them all. A rule
reads only the telemetry (``diagnose/records.py``), tolerates any optional field being absent or
null, and stays quiet on a healthy run. Thresholds are constants of each rule's module, each with
where it comes from. ``list_rules()`` names the rules, ``rule_info(name)`` gives one's record.

Rules (the ``cause`` id is the function's name), one a module:

=========================  ===================  ===============================================
rule                       module               fires when
=========================  ===================  ===============================================
``lr_too_high``            ``learning_rate``    updates are a large fraction of the weights on
                                                several sampled steps.
``init_depth``             ``depth``            gradient norms grow or shrink geometrically with
                                                depth from the start.
``missing_normalization``  ``normalization``    a deep plain network without normalization
                                                layers had spikes/NaN, or training killed
                                                its units.
``outlier_batch``          ``outliers``         a spike or NaN came with a batch whose inputs
                                                are far larger (or shifted) than the rest,
                                                beyond what its size explains.
``single_bad_step``        ``nonfinite``        one or two isolated NaN/Inf steps in a run
                                                that was finite before and after.
``fp16_overflow``          ``amp``              fp16 loss scaling keeps overflowing or its scale
                                                collapses.
``recurrent_explosion``    ``recurrent``        a recurrent weight's spectral radius is above 1
                                                around the events.
``update_spike``           ``updates``          the update jumped far above its history (the
                                                gradient did not explain it), or the LR jumped.
``label_noise``            ``labels``           a burst of loss spikes on normal inputs, LR and
                                                updates, from which the run recovered.
``dead_units``             ``units``            most hidden units get exactly zero gradient at
                                                the end (dead ReLUs, saturated units).
``attention_logits``       ``attention``        the largest attention logit grew past ~30 and
                                                several times its start.
``output_logits``          ``outputs``          the output logits' mean drifted tens of nats
                                                from its start, the logits moving together.
``loss_degradation``       ``progress``         the loss ended well above the best it reached
                                                (it climbed, or rose and stalled), events or not.
=========================  ===================  ===============================================

``base`` holds :class:`Finding` and the helpers that read a run, ``registry`` the registry and
``diagnose``.
"""

from __future__ import annotations

from .base import LONE_MAX_STEPS, LONE_RECOVERY, SEVERITIES, TROUBLE_KINDS, Finding, Rule
from .registry import RULES, RuleInfo, diagnose, list_rules, register, rule_info, rule_infos

# The rules register themselves on import, in this order (the report order of equal severity).
from .learning_rate import (  # isort: skip
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_LAYER_HIGH,
    UPDATE_RATIO_MIN_STEPS,
    UPDATE_RATIO_SEVERE,
    UPDATE_RATIO_TARGET,
    lr_too_high,
)
from .depth import INIT_MIN_LAYERS, INIT_MIN_R2, INIT_RATIO, INIT_STEPS, init_depth  # isort: skip
from .normalization import NORM_MIN_LAYERS, NORM_MIN_SPIKES, missing_normalization  # isort: skip
from .outliers import (  # isort: skip
    OUTLIER_LOG_FLOOR,
    OUTLIER_MEAN_FLOOR,
    OUTLIER_MEAN_SHIFT,
    OUTLIER_MIN_HISTORY,
    OUTLIER_WINDOW,
    OUTLIER_Z,
    outlier_batch,
)
from .nonfinite import single_bad_step  # isort: skip
from .amp import (  # isort: skip
    AMP_FALL_LOG2,
    AMP_MIN_OVERFLOWS,
    AMP_OVERFLOW_RATE,
    AMP_SCALE_FLOOR,
    fp16_overflow,
)
from .recurrent import RADIUS_GROWTH, RADIUS_LIMIT, RADIUS_WINDOW, recurrent_explosion  # isort: skip
from .updates import (  # isort: skip
    LR_FLAT,
    LR_JUMP,
    UPD_GRAD_SHARE,
    UPD_SPIKE,
    update_spike,
)
from .labels import LABEL_JUMP, LABEL_MIN_STEPS, LABEL_RECOVER, label_noise  # isort: skip
from .units import DEAD_LAYER, DEAD_SHARE, dead_units  # isort: skip
from .attention import ATTN_GROWTH, ATTN_HIGH, attention_logits  # isort: skip
from .outputs import OUT_COMMON, OUT_DRIFT, output_logits  # isort: skip
from .progress import (  # isort: skip
    DEGRADE_GIVE_BACK,
    DEGRADE_MIN_STEPS,
    DEGRADE_NOISE,
    DEGRADE_REL,
    DEGRADE_WINDOWS,
    loss_degradation,
)

__all__ = [
    "AMP_FALL_LOG2",
    "AMP_MIN_OVERFLOWS",
    "AMP_OVERFLOW_RATE",
    "AMP_SCALE_FLOOR",
    "ATTN_GROWTH",
    "ATTN_HIGH",
    "DEAD_LAYER",
    "DEAD_SHARE",
    "DEGRADE_GIVE_BACK",
    "DEGRADE_MIN_STEPS",
    "DEGRADE_NOISE",
    "DEGRADE_REL",
    "DEGRADE_WINDOWS",
    "INIT_MIN_LAYERS",
    "INIT_MIN_R2",
    "INIT_RATIO",
    "INIT_STEPS",
    "LABEL_JUMP",
    "LABEL_MIN_STEPS",
    "LABEL_RECOVER",
    "LONE_MAX_STEPS",
    "LONE_RECOVERY",
    "LR_FLAT",
    "LR_JUMP",
    "NORM_MIN_LAYERS",
    "NORM_MIN_SPIKES",
    "OUTLIER_LOG_FLOOR",
    "OUTLIER_MEAN_FLOOR",
    "OUTLIER_MEAN_SHIFT",
    "OUTLIER_MIN_HISTORY",
    "OUTLIER_WINDOW",
    "OUTLIER_Z",
    "OUT_COMMON",
    "OUT_DRIFT",
    "RADIUS_GROWTH",
    "RADIUS_LIMIT",
    "RADIUS_WINDOW",
    "RULES",
    "SEVERITIES",
    "TROUBLE_KINDS",
    "UPDATE_RATIO_HIGH",
    "UPDATE_RATIO_LAYER_HIGH",
    "UPDATE_RATIO_MIN_STEPS",
    "UPDATE_RATIO_SEVERE",
    "UPDATE_RATIO_TARGET",
    "UPD_GRAD_SHARE",
    "UPD_SPIKE",
    "Finding",
    "Rule",
    "RuleInfo",
    "attention_logits",
    "dead_units",
    "diagnose",
    "fp16_overflow",
    "init_depth",
    "label_noise",
    "list_rules",
    "loss_degradation",
    "lr_too_high",
    "missing_normalization",
    "outlier_batch",
    "output_logits",
    "recurrent_explosion",
    "register",
    "rule_info",
    "rule_infos",
    "single_bad_step",
    "update_spike",
]
