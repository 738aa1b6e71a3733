"""Deterministic fault injection: the faults that hit real training, scheduled from a seed, each
strike recorded (step, kind, where), for tests, for your own loop, and for the bench's fault axis.

    plan = gradguard.faults.parse("nan:p=0.01+spike:scale=1e4,p=0.02", seed=0)
    for step in range(steps):
        x, y = plan.on_batch(step, *next(batches))       # poison: scaled inputs, shuffled labels
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        plan.on_gradients(step, model)                   # nan / inf / spike / fp16_overflow
        plan.on_optimizer(step, optimizer)               # lr_burst: LR x factor for k steps
        guard.step(loss=loss)                            # (unscales first under AMP)
        plan.after_step(step, optimizer)                 # lr_burst: the LR restored exactly
        scheduler.step()
    plan.strikes                                         # [Strike(step, kind, where, detail), ...]

Spec grammar (as for policies, :mod:`.spec`): faults joined by ``+``, each ``name``,
``name:value`` (its first option) or ``name:key=value,...``; lists join with ``|``; ``none`` is the
empty plan. A fault strikes at the steps ``at`` (``at=20`` or ``at=20|50``), or on each step with
probability ``p`` (0.01 if neither is given). Schedules are a pure function of (seed, fault, step):
the same seed strikes the same steps and layers whatever else the run does.

=================  ==============================================================================
fault (options)    what it does (defaults)
=================  ==============================================================================
``nan``, ``inf``   a NaN/Inf in one layer's gradient; ``layer=`` a module name or glob (default:
(p, at, layer)     one drawn per strike among the modules that own a gradient; ``*``: every one)
``spike``          one layer's gradient x ``scale`` (1e4; any > 1); ``layer=*``: every layer's
(scale, p, at,
layer)
``poison``         a poisoned batch: inputs x ``scale`` (1e3, ``mode=scale``) or labels permuted
(mode, scale, p,   (``mode=shuffle``); the caller's tensors are not modified
at)
``lr_burst``       every param group's LR x ``factor`` (100) for ``steps`` (10) steps from ``at``
(factor, steps,    (required); restored exactly after each step, whatever a scheduler did
at)
``logit_drift``    every output logit moved by ``rate`` (0.5) nats, ``direction=down`` (or up),
(rate, direction,  on each struck step (``p=1``: a steady drift): the common mode the loss cannot
p, at, layer)      see (output-logit divergence); the bias of ``layer`` (default: the last
                   ``nn.Linear``), or without one its rows along its mean input
``fp16_overflow``  an Inf in a (scaled) gradient before ``GradScaler.unscale_``: the scaler skips
(p, at)            the step and halves its scale
=================  ==============================================================================

:func:`corrupt_checkpoint` truncates or scribbles over a checkpoint file, deterministically, so
that loading it fails. :func:`available_faults` lists the faults with their options.
"""

from . import injectors as _injectors  # noqa: F401  (registers the faults)
from .base import DEFAULT_P, Fault, FaultPlan, FaultSpecError, Option, Strike
from .injectors import (
    CHECKPOINT_MODES,
    Fp16Overflow,
    InfGrad,
    LogitDrift,
    LrBurst,
    NanGrad,
    PoisonBatch,
    SpikeGrad,
    corrupt_checkpoint,
)
from .spec import (
    FaultInfo,
    available_faults,
    fault_class,
    fault_info,
    fault_infos,
    list_faults,
    parse,
    parse_fault,
    register,
)

__all__ = [
    "CHECKPOINT_MODES",
    "DEFAULT_P",
    "Fault",
    "FaultInfo",
    "FaultPlan",
    "FaultSpecError",
    "Fp16Overflow",
    "InfGrad",
    "LogitDrift",
    "LrBurst",
    "NanGrad",
    "Option",
    "PoisonBatch",
    "SpikeGrad",
    "Strike",
    "available_faults",
    "corrupt_checkpoint",
    "fault_class",
    "fault_info",
    "fault_infos",
    "list_faults",
    "parse",
    "parse_fault",
    "register",
]
