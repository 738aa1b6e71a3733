"""``single_bad_step``: one or two isolated non-finite steps in a run that was otherwise healthy."""

from __future__ import annotations

from ..records import RunLog
from .base import LONE_RECOVERY, Finding, _lone_nonfinite, _trouble
from .registry import register


def _spikes_besides(run: RunLog, bad: list[int]) -> str:
    spikes = sorted({e["step"] for e in _trouble(run) if e["step"] not in bad})
    if not spikes:
        return "no gradient or loss spike anywhere in the run"
    where = ", ".join(map(str, spikes))
    return f"besides it only a gradient spike at step {where}, no loss spike: no trend"


@register
def single_bad_step(run: RunLog) -> Finding | None:
    """A NaN/Inf on one (or two) isolated steps, finite before and after: one bad batch, not a trend.

    Such a step is evidence about that batch (a NaN in its inputs or labels, a ``log(0)`` or a
    division by zero its values trigger in the loss, a rare overflow), not about the learning rate
    or the model: the run recovered at once. Not where the model's outputs were already far
    too large on its first step (``init_depth``'s bound): that run's NaN is its init's doing.
    """
    from .depth import INIT_LOGITS, _first_logits  # here: the rules register in report order

    bad = _lone_nonfinite(run)
    if not bad:
        return None
    _, start = _first_logits(run)
    if start is not None and start >= INIT_LOGITS:
        return None
    events = [e for e in _trouble(run) if e["step"] in bad]
    kinds = sorted({str(e["kind"]) for e in events})
    actions = sorted({str(e.get("action")) for e in events if e.get("action")})
    where = ", ".join(map(str, bad))
    evidence = [
        f"non-finite at step{'s' if len(bad) > 1 else ''} {where} ({', '.join(kinds)}); "
        f"every other recorded step finite, at least {LONE_RECOVERY} finite steps after each",
        _spikes_besides(run, bad),
    ]
    if actions:
        evidence.append("what the Guard did: " + ", ".join(actions))
    loc = next((r for r in run.localizations if r.get("step") in bad and r.get("origin")), None)
    if loc is not None:
        evidence.append(f"it started in {loc.get('origin')} ({loc.get('phase')}, by replay)")
    advice = [
        f"Look at the batch of step {bad[0]}: log the sample ids and check their inputs and "
        "labels for NaN/Inf or values out of range, and the loss for log(0), division by zero "
        "or sqrt of a negative that only these values reach (add an epsilon, clamp).",
        "Keep skipping such steps: policy 'skip_nonfinite' (in 'default') drops the update of a "
        "non-finite step, so one bad batch costs one step.",
        "Pass replay= to guard.step (a function that recomputes the loss of the same batch) to "
        "name the module where it starts. Nothing here points at the learning rate.",
    ]
    if "skipped" not in actions and "rolled_back" not in actions:
        advice[1] = (
            "Let the Guard skip such steps: add 'skip_nonfinite' to the policy (e.g. 'default'); "
            "an optimizer step on a NaN gradient writes NaN into the weights or Adam's moments."
        )
    return Finding(
        cause="single_bad_step",
        title="Single non-finite step",
        summary=(
            f"A single bad step: the loss or gradient was NaN/Inf at step {where} only, and the "
            "run went on finite: one batch (or a rare overflow) did it, not the learning rate."
        ),
        evidence=evidence,
        advice=advice,
        severity="medium",
        step=bad[0],
    )
