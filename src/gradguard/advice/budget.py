"""Fit the probe into the budget: how many runs, how long, over how many seeds and stress levels.

A budget is training steps (``"2000steps"``: the steps of every probe run added up, never
exceeded) or wall-clock seconds (``"300s"``, ``"5min"``). Seconds are turned into steps with a
cost model measured on the setting itself: the seconds to build a run and per training step (a
short timing in this process before the probe, then the probe's own runs before the candidates
are planned), divided over the worker processes, plus each phase's start-up.

The full probe is ``len(probe)`` unguarded LR-probe runs plus every candidate policy at every
stress level (x1 is the user's LR) over every seed; the unguarded candidate's seed-0 runs are the
probe's runs at the same LR, counted once. When that does not fit, the plan cuts, in this order,
until it does (each cut is kept in ``Plan.cuts`` and shown with the answer):

1. seeds down to 2;
2. the probe's LRs outside [0.3x, the highest stress level] dropped;
3. the highest stress level dropped (x10);
4. seeds down to 1;
5. the other stress levels dropped, the highest first, until only x1 is left;
6. runs shorter, down to ``MIN_STEPS``.

A budget that even the smallest plan exceeds is refused with the amount it needs. Run length goes
last: a policy's score after a shortened run can rank policies differently from a full one
(adaptive clipping that starts slow and ends best), while fewer seeds or stress levels only
leave the answer less sure. Seeds before the x3 level: the score at the user's LR decides first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import ConfigError

#: Shortest probe run: divergence at a high LR shows within tens of steps; fewer says little.
MIN_STEPS = 50
#: Seconds-budget plans aim at this share of the budget (timings vary between runs and processes).
SAFETY = 0.85
#: A phase's start-up before its first run ends (worker processes importing torch; the probe
#: phase's telemetry also imports TensorBoard): an estimate until the probe phase measures it.
STARTUP_S = 8.0
#: A guarded step costs up to this much an unguarded one (the Guard's statistics pass and, in the
#: probe, its telemetry: 20-50% on the bench's smallest models, less on larger ones).
GUARD_FACTOR = 1.5

_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
}


@dataclass(frozen=True)
class Budget:
    """``kind`` is ``"steps"`` (training steps over all runs) or ``"seconds"`` (wall clock)."""

    kind: str
    amount: float

    def __str__(self) -> str:
        return f"{int(self.amount)} steps" if self.kind == "steps" else f"{self.amount:g} s"


def parse_budget(budget: Any) -> Budget:
    """``"300s"``, ``"5min"``, ``"2000steps"`` (or a :class:`Budget`) -> Budget."""
    if isinstance(budget, Budget):
        text = f"{budget.amount}{'steps' if budget.kind == 'steps' else 's'}"
    elif isinstance(budget, str):
        text = budget
    else:
        raise ConfigError(
            f"budget must say its unit, e.g. '300s', '5min' or '2000steps'; got {budget!r}"
        )
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or (unit not in _UNITS and unit not in ("step", "steps")):
        raise ConfigError(
            f"budget {text!r} is not understood; give seconds or steps, e.g. '300s', '5min', "
            "'2000steps'"
        )
    value = float(m.group(1))
    if unit in ("step", "steps"):
        if not value.is_integer() or value < 1:
            raise ConfigError(f"budget {text!r}: a steps budget is a whole number >= 1")
        return Budget("steps", int(value))
    seconds = value * _UNITS[unit]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"budget {text!r}: seconds must be > 0")
    return Budget("seconds", seconds)


@dataclass(frozen=True)
class Cost:
    """Budget units spent by a plan: ``fixed + runs * per_run + run_steps * per_step``."""

    fixed: float = 0.0
    per_run: float = 0.0
    per_step: float = 1.0

    def of(self, runs: int, steps: int) -> float:
        return self.fixed + runs * self.per_run + runs * steps * self.per_step


def seconds_cost(setup_s: float, step_s: float, workers: int, startup_s: float) -> Cost:
    """Wall seconds of a phase: its start-up, then runs spread evenly over ``workers``."""
    w = max(1, workers)
    return Cost(fixed=startup_s, per_run=setup_s / w, per_step=step_s / w)


def pool_pays(runs: int, steps: int, setup_s: float, step_s: float, workers: int) -> bool:
    """Whether ``runs`` runs of ``steps`` steps end sooner over ``workers`` fresh worker processes
    (each first imports torch, the task's data, TensorBoard: :data:`STARTUP_S`) than one after
    another in this process, which has all of that loaded already."""
    compute = runs * (setup_s + steps * step_s)
    return workers > 1 and STARTUP_S + compute / workers < compute


def phase_costs(setup_s: float, step_s: float, workers: int, phases: int) -> list[Cost]:
    """The cost of ``phases`` phases run in this process, and over ``workers`` processes."""
    out = [Cost(fixed=0.0, per_run=setup_s, per_step=step_s)]
    if workers > 1:
        out.append(seconds_cost(setup_s, step_s, workers, phases * STARTUP_S))
    return out


def richest(plans: Sequence[Plan]) -> Plan:
    """The plan with the fewest cuts, then the longest runs."""
    return max(plans, key=lambda p: (-len(p.cuts), p.steps))


@dataclass(frozen=True)
class Plan:
    """What the probe runs: ``probe`` LR factors unguarded (seed 0), then ``candidates`` policies
    at each of ``levels`` (LR factors; 1.0 is the user's LR) over ``seeds`` seeds, ``steps``
    steps each. ``probe_steps`` is the probe runs' length (the candidates may be shorter only when
    a seconds budget is re-planned after the probe)."""

    steps: int
    seeds: int
    levels: tuple[float, ...]
    probe: tuple[float, ...]
    candidates: int
    probe_steps: int
    cuts: tuple[str, ...] = ()

    @property
    def probe_runs(self) -> int:
        return len(self.probe)

    @property
    def candidate_runs(self) -> int:
        """Candidate runs not already among the probe's (the unguarded seed-0 runs)."""
        shared = len(set(self.levels) & set(self.probe)) if self.steps == self.probe_steps else 0
        return len(self.levels) * self.seeds * self.candidates - shared

    @property
    def runs(self) -> int:
        return self.probe_runs + self.candidate_runs

    @property
    def total_steps(self) -> int:
        """Training steps of every planned run (what a steps budget counts)."""
        return self.probe_runs * self.probe_steps + self.candidate_runs * self.steps

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(runs=self.runs, total_steps=self.total_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(
            steps=int(d["steps"]),
            seeds=int(d["seeds"]),
            levels=tuple(float(x) for x in d["levels"]),
            probe=tuple(float(x) for x in d["probe"]),
            candidates=int(d["candidates"]),
            probe_steps=int(d["probe_steps"]),
            cuts=tuple(d.get("cuts", ())),
        )


def _ladder(full: Plan, max_steps: int, probe_fixed: bool) -> list[tuple[Plan, int]]:
    """(plan, the shortest run it accepts) from the full plan down, one cut at a time."""
    out = [(full, max_steps)]
    p = full

    def cut(plan: Plan, why: str, floor: int, **changes) -> None:
        nonlocal p
        p = replace(plan, cuts=(*plan.cuts, why), **changes)
        out.append((p, floor))

    if p.seeds > 2:
        cut(p, "seeds cut to 2", max_steps, seeds=2)
    top = max(p.levels)
    kept = tuple(f for f in p.probe if 0.3 - 1e-9 <= f <= top + 1e-9)
    if not probe_fixed and kept != p.probe:
        dropped = ", ".join(f"x{f:g}" for f in p.probe if f not in kept)
        cut(p, f"probe LRs {dropped} dropped", max_steps, probe=kept)
    if len(p.levels) > 2:
        top = max(p.levels)
        cut(p, f"stress level x{top:g} dropped", max_steps, levels=_without(p.levels, top))
    if p.seeds > 1:
        cut(p, "seeds cut to 1", max_steps, seeds=1)
    while len(p.levels) > 1:
        top = max(p.levels)
        cut(p, f"stress level x{top:g} dropped", max_steps, levels=_without(p.levels, top))
    if max_steps > MIN_STEPS:
        cut(p, "runs shortened", MIN_STEPS)
    return out


def _without(levels: tuple[float, ...], level: float) -> tuple[float, ...]:
    return tuple(x for x in levels if x != level)


def fit(
    budget: float,
    cost: Cost,
    *,
    max_steps: int,
    seeds: int,
    levels: Sequence[float],
    probe: Sequence[float],
    candidates: int,
    probe_steps: int | None = None,
    what: str = "",
) -> Plan:
    """The richest plan whose cost is within ``budget`` (cut in the module doc's order), with the
    longest runs that fit (up to ``max_steps``).

    ``probe_steps``: the probe has already run with runs of this length (a seconds budget re-planned
    after the probe): its runs cost nothing more, only the candidates are planned and cut.
    """
    probe_fixed = probe_steps is not None
    full = Plan(
        steps=max_steps,
        seeds=seeds,
        levels=tuple(levels),
        probe=tuple(probe),
        candidates=candidates,
        probe_steps=probe_steps if probe_steps is not None else max_steps,
    )
    ladder = _ladder(full, max_steps, probe_fixed)
    for plan, floor in ladder:
        # Runs of S steps cost n(S) * (per_run + S * per_step): solve for the longest S that fits.
        for steps in _lengths(budget, cost, plan, floor, max_steps, probe_fixed):
            trial = replace(
                plan, steps=steps, probe_steps=plan.probe_steps if probe_fixed else steps
            )
            if _spent(cost, trial, probe_fixed) <= budget:
                if trial.cuts and trial.cuts[-1] == "runs shortened":
                    label = f"runs shortened to {steps} steps (from {max_steps})"
                    trial = replace(trial, cuts=(*trial.cuts[:-1], label))
                return trial
    poorest = ladder[-1][0]
    smallest = replace(
        poorest, steps=MIN_STEPS, probe_steps=poorest.probe_steps if probe_fixed else MIN_STEPS
    )
    need = _spent(cost, smallest, probe_fixed)
    raise ConfigError(
        f"budget{what} too small: the smallest probe ({smallest.runs} runs of {MIN_STEPS} steps: "
        f"{smallest.candidates} policies at your LR, 1 seed) needs about {_fmt(need, cost)}; "
        f"the budget allows {_fmt(budget, cost)}"
    )


def _spent(cost: Cost, plan: Plan, probe_fixed: bool) -> float:
    """What the plan costs; the probe's runs are free once they have run."""
    return cost.of(plan.candidate_runs if probe_fixed else plan.runs, plan.steps)


def _lengths(budget: float, cost: Cost, plan: Plan, floor: int, max_steps: int, probe_fixed: bool):
    """Run lengths to try, longest first: the solved length, then (because sharing the probe's
    runs depends on the length) the probe's own length."""
    runs = plan.candidate_runs if probe_fixed else plan.runs
    room = budget - cost.fixed - runs * cost.per_run
    if runs <= 0:
        yield min(max_steps, plan.steps)
        return
    s = max_steps if cost.per_step <= 0 else int(room // (runs * cost.per_step)) if room > 0 else 0
    s = min(max_steps, s)
    if s >= floor:
        yield s
    if probe_fixed and plan.probe_steps <= max_steps and plan.probe_steps >= floor:
        yield plan.probe_steps


def _fmt(units: float, cost: Cost) -> str:
    if cost.per_step == 1.0 and cost.per_run == 0.0 and cost.fixed == 0.0:
        return f"{math.ceil(units)} steps"
    return f"{units:.0f} s"
