"""The probe from start to answer: plan, LR range probe, candidates, score, diagnose.

Both phases run through the bench runner (:func:`gradguard.bench.runner.run_grid`): parallel
worker processes, one SQLite row per run in ``OUT/results.db``, a progress bar, and resume: a
finished run is never recomputed, an interrupted one is redone from scratch. The plan (and, for a
seconds budget, the re-plan after the probe) is saved in ``OUT/advise-<request>.json``, so that a
rerun of the same request makes the same runs even though timings differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, GradGuardError
from . import budget as B
from .candidates import candidates
from .probe import DEFAULT_PERCENTILE, analyze, probe_factors
from .recommend import choose, gather
from .result import Advice
from .setting import make_setting, scaled_lr

#: Stress levels: the user's LR times these, besides x1.
DEFAULT_STRESS = (3.0, 10.0)
DEFAULT_SEEDS = 2
#: Seconds kept back from a seconds budget for reading results, the diagnosis and the answer.
REPORT_RESERVE_S = 2.0
_VERSION = 1


class ProbeFailed(GradGuardError):
    """Every run of a phase raised: the setup fails when trained (the message has the error)."""


def advise(
    config: Any = None,
    *,
    entry: str | None = None,
    lr: float | None = None,
    budget: str | B.Budget = "300s",
    out: str | os.PathLike | None = None,
    workers: int | None = None,
    seeds: int = DEFAULT_SEEDS,
    stress: Sequence[float] = DEFAULT_STRESS,
    steps: int | None = None,
    percentile: float = DEFAULT_PERCENTILE,
    progress: bool = True,
    **settings: Any,
) -> Advice:
    """The probe and the answer; the public entry point (arguments, return) is
    :func:`gradguard.advice.advise`."""
    t_start = time.perf_counter()
    seeds, workers, levels = _check_counts(seeds, workers, stress, percentile)
    bud = B.parse_budget(budget)
    setting = make_setting(config, entry=entry, lr=lr, steps=steps, settings=settings)
    if not isinstance(progress, bool):
        raise ConfigError(f"progress must be True or False, got {progress!r}")
    out_dir = Path(out) if out is not None else Path("results") / f"advise-{setting.slug()}"
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out {out_dir} is a file, not a folder")
    request = {
        "version": _VERSION,
        "setting": setting.request(),
        "budget": [bud.kind, bud.amount],
        "seeds": seeds,
        "levels": list(levels),
        "max_steps": setting.max_steps,
        "percentile": float(percentile),
    }
    session = _Session(
        setting=setting,
        out_dir=out_dir,
        state=_State(out_dir, request),  # a rerun of the same request finds its plan there
        workers=workers,
        # Every run trains with the setting's threads (RunConfig.threads; 1 for an entry point),
        # wherever it runs and whatever the worker count, and the timing is taken with as many.
        n_workers=workers or os.cpu_count() or 1,
        progress=progress,
        t_start=t_start,
    )
    notes: list[str] = []
    plan, timing = _make_plan(session, bud, seeds, levels)
    probe, rows = _lr_probe(session, plan, timing, percentile)
    cands = candidates(probe.threshold)
    plan2 = _candidates_plan(session, plan, bud, rows, notes)
    cells, rows2 = _run_candidates(session, cands, plan2, timing)
    return _answer(session, bud, cands, plan2, probe, {**rows, **rows2}, cells, notes)


# ----- the phases ---------------------------------------------------------------------------------
@dataclass
class _Session:
    """What every phase of one :func:`advise` call works with."""

    setting: Any
    out_dir: Path
    state: _State
    workers: int | None  # the worker processes asked for (None: each phase chooses)
    n_workers: int  # the pool a phase runs on when it runs on one
    progress: bool
    t_start: float


def _check_counts(
    seeds: Any, workers: Any, stress: Sequence[float], percentile: Any
) -> tuple[int, int | None, tuple[float, ...]]:
    """The seeds, workers and stress levels checked (and the percentile), in that order."""
    seeds = _check_int("seeds", seeds, 1, 100)
    if workers is not None:
        workers = _check_int("workers", workers, 1, 1024)
    levels = _levels(stress)
    if (
        isinstance(percentile, bool)
        or not isinstance(percentile, (int, float))
        or not 0 < percentile <= 100
    ):
        raise ConfigError(f"percentile must be a number in (0, 100], got {percentile!r}")
    return seeds, workers, levels


def _make_plan(
    session: _Session, bud: B.Budget, seeds: int, levels: tuple[float, ...]
) -> tuple[B.Plan, dict[str, float]]:
    """The plan and the timing it was made with, the saved ones on a rerun. Nothing is written
    before the plan fits: a bad budget leaves no trace."""
    n_cands = len(candidates(1.0))
    factors = probe_factors(levels)
    plan_dict, timing = session.state.get("plan"), session.state.get("timing")
    fit_args: dict[str, Any] = dict(
        max_steps=session.setting.max_steps,
        seeds=seeds,
        levels=levels,
        probe=factors,
        candidates=n_cands,
    )
    if plan_dict is None and bud.kind == "steps":
        plan_dict = B.fit(bud.amount, B.Cost(), what=f" {bud}", **fit_args).as_dict()
    if timing is None:  # seconds per step and per run: for a seconds budget, and where to run
        t = _timed(session.setting)
        timing = {"setup_s": t.setup_s, "step_s": t.step_s}
    if plan_dict is None:
        room = bud.amount * B.SAFETY - (time.perf_counter() - session.t_start) - REPORT_RESERVE_S
        plan_dict = _fit_seconds(room, timing, session.n_workers, 2, f" {bud}", fit_args).as_dict()
    session.out_dir.mkdir(parents=True, exist_ok=True)
    session.state.set("timing", timing)
    session.state.set("plan", plan_dict)
    return B.Plan.from_dict(plan_dict), timing


def _lr_probe(
    session: _Session, plan: B.Plan, timing: dict[str, float], percentile: float
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Phase 1, the unguarded LR range probe: its analysis and its rows by run key."""
    from ..bench.runner import DB_NAME, run_grid
    from ..bench.store import ResultStore, run_key

    setting = session.setting
    probe_runs = []
    for f in plan.probe:
        run_lr = scaled_lr(setting.lr, f)
        cfg = setting.run(run_lr, "none", 0, plan.probe_steps)
        probe_runs.append((f, run_lr, run_key(cfg.as_dict()), cfg))
    t1 = time.perf_counter()
    w1 = _phase_workers(
        session.workers, session.n_workers, len(probe_runs), plan.probe_steps, timing
    )
    run_grid(
        [c for *_, c in probe_runs],
        session.out_dir,
        workers=w1,
        progress=session.progress,
        telemetry=True,
        desc="advise 1/2: LR probe",
    )
    if session.state.get("phase1") is None:
        session.state.set(
            "phase1",
            {
                "seconds": time.perf_counter() - t1,
                "spent": time.perf_counter() - session.t_start,
                "workers": w1,
            },
        )
    with ResultStore(session.out_dir / DB_NAME) as store:
        rows = {r["key"]: r for r in store.runs(None, [k for _, _, k, _ in probe_runs])}
        _refuse_all_failed("LR probe", rows.values())
        probe = analyze(
            [(f, x, k) for f, x, k, _ in probe_runs], rows, store.steps, percentile, setting.lr
        )
    return probe, rows


def _candidates_plan(
    session: _Session,
    plan: B.Plan,
    bud: B.Budget,
    probe_rows: dict[str, dict[str, Any]],
    notes: list[str],
) -> B.Plan:
    """Phase 2's plan: the plan, or for a seconds budget a re-plan from the probe's timings
    (saved, so a rerun keeps it)."""
    if session.state.get("plan2") is None:
        plan2 = plan
        if bud.kind == "seconds":
            plan2 = _replan(plan, bud, session.state, probe_rows.values(), session.n_workers, notes)
        session.state.set("plan2", plan2.as_dict())
    # Its cuts include the plan's: shown with the answer.
    return B.Plan.from_dict(session.state.get("plan2"))


def _run_candidates(
    session: _Session, cands: Sequence[Any], plan2: B.Plan, timing: dict[str, float]
) -> tuple[dict[tuple[str, float, int], str], dict[str, dict[str, Any]]]:
    """Phase 2, every candidate at every level and seed: the run key of each (spec, level,
    seed) cell, and the rows by run key."""
    from ..bench.runner import DB_NAME, run_grid
    from ..bench.store import ResultStore, run_key

    setting = session.setting
    cells: dict[tuple[str, float, int], str] = {}
    cand_cfgs = []
    for level in plan2.levels:
        for seed in range(plan2.seeds):
            for c in cands:
                cfg = setting.run(scaled_lr(setting.lr, level), c.spec, seed, plan2.steps)
                key = run_key(cfg.as_dict())
                cells[(c.spec, level, seed)] = key
                cand_cfgs.append(cfg)
    w2 = _phase_workers(
        session.workers, session.n_workers, plan2.candidate_runs, plan2.steps, timing
    )
    run_grid(
        cand_cfgs,
        session.out_dir,
        workers=w2,
        progress=session.progress,
        desc="advise 2/2: policies",
    )
    with ResultStore(session.out_dir / DB_NAME) as store:
        rows2 = {r["key"]: r for r in store.runs(None, list(cells.values()))}
    _refuse_all_failed("candidate", rows2.values())
    return cells, rows2


def _answer(
    session: _Session,
    bud: B.Budget,
    cands: Sequence[Any],
    plan2: B.Plan,
    probe: Any,
    rows: dict[str, dict[str, Any]],
    cells: dict[tuple[str, float, int], str],
    notes: list[str],
) -> Advice:
    """The chosen policy, why, and the evidence (``rows``: both phases' runs), written to
    ``OUT/advice.json`` and ``OUT/advice.md``."""
    setting, out_dir = session.setting, session.out_dir
    use_metric = setting.kind == "bench" or getattr(setting, "has_evaluate", False)
    higher = setting.higher_is_better if use_metric else False
    table = gather(
        cands,
        plan2.levels,
        plan2.seeds,
        setting.lr,
        lambda spec, level, seed: rows.get(cells.get((spec, level, seed), "")),
        use_metric,
    )
    chosen, trains = choose(table, higher, use_loss=use_metric)
    from .diagnosis import diagnose_probe

    diagnosis = diagnose_probe(out_dir, probe, setting.lr)
    notes = _lr_notes(probe, setting.lr) + notes
    steps_run = sum(
        (r.get("result") or {}).get("steps_run", 0)
        for r in rows.values()
        if r.get("status") == "done"
    )
    advice = Advice(
        setting=setting.label(),
        lr=setting.lr,
        spec=chosen.spec,
        code=_code(chosen.spec),
        reason=_reason(chosen, table, trains, probe, setting.lr, higher, setting.metric_name),
        trains=trains,
        metric=setting.metric_name if use_metric else "train loss",
        higher_is_better=higher,
        table=[r.as_dict() for r in sorted(table, key=lambda r: r.rank)],
        probe=probe.as_dict(),
        diagnosis=diagnosis,
        notes=notes,
        plan={**plan2.as_dict(), "probe_runs": plan2.probe_runs},
        budget=str(bud),
        spent={"seconds": time.perf_counter() - session.t_start, "steps": float(steps_run)},
        out=str(out_dir),
    )
    (out_dir / "advice.json").write_text(advice.to_json() + "\n", encoding="utf-8")
    (out_dir / "advice.md").write_text(advice.markdown() + "\n", encoding="utf-8")
    return advice


# ----- helpers ------------------------------------------------------------------------------------
class _State:
    """``OUT/advise-<request hash>.json``: the request, its plan(s) and the probe's timings."""

    def __init__(self, out: Path, request: Mapping[str, Any]):
        digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]
        self.path = out / f"advise-{digest}.json"
        self.data: dict[str, Any] = {"request": dict(request)}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                loaded = None
            if isinstance(loaded, dict) and loaded.get("request") == self.data["request"]:
                self.data = loaded

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)  # atomic: an interrupted write leaves the old file


def _check_int(name: str, v: Any, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {v!r}")
    return v


def _levels(stress: Sequence[float]) -> tuple[float, ...]:
    if isinstance(stress, (int, float)):
        stress = (stress,)
    out = [1.0]
    for s in stress:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 1 < s <= 1000:
            raise ConfigError(f"stress levels are LR multiples in (1, 1000], e.g. 3 10; got {s!r}")
        out.append(float(s))
    return tuple(sorted(set(out)))


def _timed(setting):
    """The setting's timing with the threads each of its runs trains with."""
    from ..bench.train import pinned_threads

    with pinned_threads(setting.threads):
        return setting.timing()


def _refuse_all_failed(phase: str, rows) -> None:
    rows = list(rows)
    failed = [r for r in rows if r.get("status") == "failed"]
    if rows and len(failed) == len(rows):
        err = (failed[0].get("error") or "").strip()
        last = err.splitlines()[0] if err else "unknown error"
        raise ProbeFailed(
            f"every {phase} run raised; the first: {last} (full text in the 'error' column of "
            "the runs table in results.db)"
        )


def _fit_seconds(room: float, timing, workers: int, phases: int, what: str, fit_args) -> B.Plan:
    """The richest plan within ``room`` seconds, the phases run in this process or over
    ``workers`` processes, whichever fits more."""
    plans: list[B.Plan] = []
    error: ConfigError | None = None
    step_s = timing["step_s"] * B.GUARD_FACTOR if phases == 2 else timing["step_s"]
    for cost in B.phase_costs(timing["setup_s"], step_s, workers, phases):
        try:
            plans.append(B.fit(room, cost, what=what, **fit_args))
        except ConfigError as e:
            error = error or e
    if not plans:
        assert error is not None  # phase_costs gives at least one cost
        raise error
    return B.richest(plans)


def _phase_workers(asked: int | None, n_workers: int, runs: int, steps: int, timing) -> int:
    """The processes a phase runs on: the ones asked for; else a pool of ``n_workers`` when it
    ends sooner than running here (see :func:`gradguard.advice.budget.pool_pays`)."""
    if asked is not None:
        return asked
    pays = B.pool_pays(runs, steps, timing["setup_s"], timing["step_s"], n_workers)
    return n_workers if pays else 1


def _replan(plan, bud, state, probe_rows, workers: int, notes: list[str]):
    """Fit the candidates into what is left of a seconds budget, with the probe's own timings:
    seconds per step from its runs, which had a (measuring) Guard too (the first timing was a
    short unguarded one in this process)."""
    timing = dict(state.get("timing") or {})
    phase1 = state.get("phase1") or {}
    # The median run: a worker's first run also pays its lazy imports (TensorBoard, on the first
    # telemetry step) inside its training time.
    per_step = [
        r["result"]["wall_seconds"] / r["result"]["steps_run"]
        for r in probe_rows
        if r.get("status") == "done" and r["result"]["steps_run"] >= 10
    ]
    if per_step:
        timing["step_s"] = max(timing.get("step_s", 0.0), statistics.median(per_step))
    room = bud.amount * B.SAFETY - float(phase1.get("spent", 0.0)) - REPORT_RESERVE_S
    fit_args: dict[str, Any] = dict(
        max_steps=plan.steps,
        seeds=plan.seeds,
        levels=plan.levels,
        probe=plan.probe,
        candidates=plan.candidates,
        probe_steps=plan.probe_steps,
    )
    try:
        return _fit_seconds(room, timing, workers, 1, " left after the LR probe", fit_args)
    except ConfigError:
        smallest = B.Plan(
            steps=B.MIN_STEPS,
            seeds=1,
            levels=(1.0,),
            probe=plan.probe,
            candidates=plan.candidates,
            probe_steps=plan.probe_steps,
            cuts=("over budget: only x1, 1 seed, shortest runs",),
        )
        notes.append(
            "the LR probe took longer than planned: the policies ran at your LR only, with 1 "
            f"seed and {B.MIN_STEPS}-step runs, which may exceed the budget"
        )
        return smallest


def _code(spec: str) -> str:
    return f'guard = gradguard.Guard(model, optimizer, policy="{spec}")'


#: advise's ranking rule (docs/advise.md, "How it chooses"), as the "why" states it.
RANKING_RULE = (
    "ranked by: trains at your LR in every seed, then within the seeds' noise of the best score "
    "and of the lowest final loss, then the widest LR margin"
)


def _reason(chosen, table, trains, probe, lr, higher, metric) -> str:
    if not trains:
        return _reason_untrained(chosen, table, probe, lr)
    _n_bad, n = chosen.runs.get("x1", [0, 0])
    word = "accuracy" if "accuracy" in metric else metric
    sign = 1.0 if higher else -1.0
    parts = [f"{chosen.spec} trained at your LR in {n}/{n} seeds with {word} {chosen.score:.4g}"]
    above = sorted(
        (r for r in table if r is not chosen and sign * (r.score - chosen.score) > 0),
        key=lambda r: -sign * r.score,
    )
    if not above:
        parts.append(f"(the best {word} of all candidates)")
    if chosen.margin is not None and chosen.margin > 1:
        parts.append(f"and kept training in every seed up to x{chosen.margin:g} your LR")
    parts.append(f"({RANKING_RULE})")
    if above:
        parts.append(
            "; scored higher but ranked lower: "
            + "; ".join(_why_lower(r, chosen) for r in above[:2])
        )
        if len(above) > 2:
            parts.append(f"and {len(above) - 2} more (the evidence table has them)")
    wider = [
        r
        for r in table
        if r not in above and r.margin is not None and (chosen.margin or 0) < r.margin
    ]
    if wider:
        parts.append(
            "; kept training at higher LRs but ranked lower: "
            + "; ".join(
                f"{r.spec} (up to x{r.margin:g}: {r.excluded or 'a lower score'})"
                for r in wider[:2]
            )
        )
    parts += _unguarded_part(chosen, table)
    if chosen.spec != "none" and math.isfinite(chosen.overhead):
        parts.append(f"; overhead {chosen.overhead:.1%} of training time")
    return " ".join(parts).replace(" ;", ";") + "."


def _why_lower(r, chosen) -> str:
    """Why a candidate that scored higher than the chosen one ranks below it."""
    head = f"{r.spec} ({r.score:.4g}"
    if r.excluded:
        return f"{head}: {r.excluded})"
    mine, theirs = chosen.margin or 0.0, r.margin or 0.0
    if theirs < mine:
        return f"{head}: within the noise of the best, with a narrower LR margin, x{theirs:g})"
    return f"{head}: within the noise of the best, ranked by the final loss and overhead)"


def _reason_untrained(chosen, table, probe, lr) -> str:
    """Why, when no policy trained in every seed at the user's LR."""
    n_bad, n = chosen.runs.get("x1", [0, 0])
    mine = [why for why in chosen.reasons if why.startswith("x1 ")]
    if mine and all(why.endswith("at_chance") for why in mine):
        # The chosen policy stayed finite and only failed to learn: the runs are too short
        # (an LR cut would not help), and it is still the one that held where others blew up.
        steps = max((row.steps_run for row in probe.rows), default=0)
        blew = [
            r.spec
            for r in table
            if any(w.startswith("x1 ") and not w.endswith("at_chance") for w in r.reasons)
        ]
        return (
            f"{chosen.spec} kept every seed finite at lr {lr:g}"
            + (f" where {', '.join(blew)} blew up" if blew else "")
            + f", but no policy got beyond chance there within {steps} steps"
            + (", nor did unguarded training at any lower LR" if probe.trains_up_to is None else "")
            + ": the probe's runs are too short for this task to learn. Rerun with --steps "
            "long enough to learn (and a budget to match); until then it is the safe choice."
        )
    up = probe.trains_up_to
    return (
        f"no policy trained at lr {lr:g} in every seed (the closest: {chosen.spec}, which "
        f"diverged or did not learn in {n_bad}/{n}). Lower the LR"
        + (f" (unguarded training trains up to lr {lr * up:.3g})" if up else "")
        + " or fix what the diagnosis names."
    )


def _unguarded_part(chosen, table) -> list[str]:
    """What training without a Guard did at the user's LR, beside the chosen policy."""
    none = next((r for r in table if r.spec == "none"), None)
    if none is not None and none is not chosen:
        nb, nn = none.runs.get("x1", [0, 0])
        if none.margin is None:
            return [f"; without a Guard {nb}/{nn} seeds diverged or did not learn at your LR"]
        return [f"; without a Guard every seed trained up to x{none.margin:g}"]
    if none is chosen:
        return [
            "; no policy did better, so no mitigation is needed at this LR (a Guard with "
            "policy='none' still skips a step whose loss or gradient is not finite, and changes "
            "nothing else)"
        ]
    return []


def _lr_notes(probe, lr: float) -> list[str]:
    d, up = probe.diverges_at, probe.trains_up_to
    if d is not None and d <= 1.0:
        low = min(r.factor for r in probe.rows)
        where = f"lr {lr * up:.3g} (x{up:g})" if up else f"no probed LR (down to x{low:g})"
        return [
            f"Your LR diverges without a Guard; unguarded training trains up to {where}. A Guard "
            "keeps it from blowing up, but a lower LR (or the diagnosis' fixes) is the cure."
        ]
    if d is None:
        return [
            f"Unguarded training trained at every probed LR (up to x{up:g}): at your LR a Guard "
            "is a safety net against the unexpected, not a necessity."
        ]
    return [
        f"Unguarded training trains at your LR and up to x{up:g} (lr {lr * up:.3g}); it diverges "
        f"from x{d:g} (lr {lr * d:.3g}). The policy buys a margin for LR schedules, data and "
        "runs longer than the probe's."
    ]
