"""What to change in the model itself: the diagnosis rules (:mod:`gradguard.diagnose.rules`:
initialization/depth, missing normalization, learning rate, outlier inputs, recurrent weights,
fp16) applied to the telemetry of the probe's unguarded runs.

Two runs are read: the one at the user's LR, and the first one that diverged (where the trouble
shows). A finding from the diverged run is kept only if the user's run did not already give that
cause, and its ``lr_too_high`` is dropped: that the LR range probe diverges at a high enough LR is
what it is for, not a fault of the model.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from .probe import ProbeResult


def diagnose_probe(out: str | Path, probe: ProbeResult, lr: float) -> list[dict[str, Any]]:
    """Findings as dicts (``Finding.as_dict()`` plus ``lr`` and ``run``: where it was seen), most
    severe first; empty when the telemetry shows nothing wrong or is missing."""
    from ..bench.runner import DB_NAME, telemetry_dir
    from ..bench.store import ResultStore
    from ..diagnose import diagnose, load_run
    from ..diagnose.rules import SEVERITIES
    from ..errors import GradGuardError

    sources = []
    user = probe.row(1.0)
    if user is not None and user.status == "done":
        sources.append((user, "your LR"))
    bad = next((r for r in probe.rows if r.diverged and r.status == "done"), None)
    if bad is not None and bad is not user:
        sources.append((bad, f"x{bad.factor:g}, where unguarded training diverges"))
    with ResultStore(Path(out) / DB_NAME) as store:  # a run's folder is named from its config
        configs = {r["key"]: r["config"] for r in store.runs(None, [r.key for r, _ in sources])}
    found: dict[str, dict[str, Any]] = {}
    for row, where in sources:
        try:
            run = load_run(telemetry_dir(out, row.key, configs.get(row.key, {})))
        except GradGuardError:
            continue  # no telemetry (e.g. removed by hand): nothing to diagnose
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a rule that fails is skipped; the probe goes on
            findings = diagnose(run)
        for f in findings:
            if f.cause in found or (row is not user and f.cause == "lr_too_high"):
                continue
            found[f.cause] = {**f.as_dict(), "lr": row.lr, "run": where}
    if "lr_too_high" in found:
        found["lr_too_high"] = with_probe_lr(found["lr_too_high"], probe, lr)
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(found.values(), key=lambda f: rank.get(f["severity"], len(rank)))


def with_probe_lr(finding: dict[str, Any], probe: ProbeResult, lr: float) -> dict[str, Any]:
    """``lr_too_high`` with its LR change taken from what the probe measured, never against it.

    The rule's factor is an estimate from the update/weight ratio; the probe trained the model
    unguarded at each LR, so its measurements replace it: the LR advised is the highest probed LR
    that trained; none when your LR itself trained unguarded; no LR at all when no probed LR
    trained (lowering the LR alone did not help there)."""
    from ..diagnose.rules.learning_rate import LR_CHANGE

    advice = [a for a in finding.get("advice", []) if not a.startswith(LR_CHANGE)]
    up, down = probe.trains_up_to, probe.diverges_at
    diverges = f" (it diverges from x{down:g})" if down is not None else ""
    if up is None:
        low = min((r.factor for r in probe.rows), default=1.0)
        line = (
            "Learning rate: lowering it alone is not shown to help; in the LR probe no LR down to "
            f"{lr * low:.3g} (x{low:g}) trained unguarded. See the other findings "
            "(initialization, normalization, inputs) first."
        )
    elif up >= 1:
        line = (
            "Learning rate: no change is needed to train; the LR probe trained unguarded at your "
            f"LR{diverges}. Updates this large leave little margin: warm the LR up, or keep a Guard."
        )
    else:
        row = probe.row(up)
        score = f", score {row.metric:.3g}" if row is not None and math.isfinite(row.metric) else ""
        line = (
            f"Learning rate: use {lr * up:.3g} (x{up:g} yours) or lower: the highest LR that "
            f"trained unguarded in the LR probe{score}{diverges}. This is measured; it replaces "
            "the estimate from the update ratio."
        )
    return {**finding, "advice": [line, *advice]}
