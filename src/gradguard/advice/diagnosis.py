"""What to change in the model itself: the diagnosis rules (:mod:`gradguard.diagnose.rules`:
initialization/depth, missing normalization, learning rate, outlier inputs, recurrent weights,
fp16) applied to the telemetry of the probe's unguarded runs.

Two runs are read: the one at the user's LR, and the first one that diverged (where the trouble
shows). A finding from the diverged run is kept only if the user's run did not already give that
cause, and its ``lr_too_high`` is dropped: that the LR range probe diverges at a high enough LR is
what it is for, not a fault of the model.
"""

from __future__ import annotations

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
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(found.values(), key=lambda f: rank.get(f["severity"], len(rank)))
