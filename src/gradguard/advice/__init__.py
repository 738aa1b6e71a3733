"""``gradguard advise``: choose the mitigation for a training setup from evidence, in minutes.

    advice = gradguard.advise(task="digits", model="mlp", optimizer="momentum", lr=0.1,
                              budget="120s", out="results/advise-digits")
    print(advice)            # the policy, the code line, the evidence table, the diagnosis
    advice.spec              # e.g. "clip_norm:2.37"
    advice.code              # 'guard = gradguard.Guard(model, optimizer, policy="clip_norm:2.37")'

    gradguard.advise(entry="examples.advise_entry:build", budget="2000steps")  # your own setup

How: an LR range probe without a Guard finds where training starts to diverge and what healthy
gradient norms look like (:mod:`.probe`); the candidate policies, with a clip threshold taken
from those norms (:mod:`.candidates`), run at the user's LR and at 3x and 10x it over a few seeds
(:mod:`.advisor`, through the bench runner: parallel, SQLite, resumable), all fitted into the
budget (:mod:`.budget`); the answer prefers what trains at the user's LR as well as the best,
then the widest stability margin, then low overhead (:mod:`.recommend`), with the diagnosis
rules run on the probe's telemetry (:mod:`.diagnosis`). A user's own setup is an entry point
(:mod:`.entry`, trained by :mod:`.runs`).

``gradguard.advise`` is this package's :func:`advise`, a plain function. Only this file loads with
``import gradguard``; the rest loads when ``advise`` runs (and :class:`Advice`, :class:`Budget`,
:class:`Setup`, :func:`parse_budget` on first use), so importing gradguard stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .budget import Budget
    from .result import Advice

__all__ = ["Advice", "Budget", "Setup", "advise", "parse_budget"]


def advise(
    config: Any = None,
    *,
    entry: str | None = None,
    lr: float | None = None,
    budget: str | Budget = "300s",
    out: str | os.PathLike | None = None,
    workers: int | None = None,
    seeds: int = 2,
    stress: Sequence[float] = (3.0, 10.0),
    steps: int | None = None,
    percentile: float = 90.0,
    progress: bool = True,
    **settings: Any,
) -> Advice:
    """Choose the Guard policy for a training setup from a short probe of it, within a budget.

    The setup is a bench configuration (``config``: a :class:`~gradguard.bench.config.RunConfig`
    or a dict of its settings, and/or its settings as keywords: ``task="digits", model="mlp",
    optimizer="momentum", lr=0.1, model_options={"depth": 12}``) or a user's own ``entry`` point,
    ``"package.module:function"`` (the contract: :mod:`gradguard.advice.entry`;
    ``examples/advise_entry.py``); ``lr`` then overrides the LR its optimizer is built with.

    ``budget``: ``"300s"``, ``"5min"`` or ``"2000steps"`` (training steps of all runs together,
    never exceeded). ``out``: the results folder (default ``results/advise-<setting>``); rerun
    with the same one to resume: finished runs are not recomputed. ``workers``: parallel
    processes (default one per core). ``seeds``: seeds per candidate and LR. ``stress``: LR
    multiples besides x1 that each candidate must survive. ``steps``: steps per run at most
    (default: the config's ``steps``, or 300); the budget may shorten them. ``percentile``: of the
    healthy run's gradient norms, the clip threshold. ``progress``: progress bars.

    Returns an :class:`~gradguard.advice.result.Advice` (``.spec``, ``.code``, ``.table``,
    ``.diagnosis``; ``print(advice)`` renders it), also written to ``OUT/advice.json`` and
    ``OUT/advice.md``. Bad input raises :class:`~gradguard.ConfigError` before any run starts.
    """
    from .advisor import advise as _advise

    return _advise(
        config,
        entry=entry,
        lr=lr,
        budget=budget,
        out=out,
        workers=workers,
        seeds=seeds,
        stress=stress,
        steps=steps,
        percentile=percentile,
        progress=progress,
        **settings,
    )


def __getattr__(name: str) -> Any:
    # The result, budget and entry-point types load on first use.
    if name == "Advice":
        from .result import Advice

        return Advice
    if name in ("Budget", "parse_budget"):
        from . import budget

        return getattr(budget, name)
    if name == "Setup":
        from .entry import Setup

        return Setup
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
