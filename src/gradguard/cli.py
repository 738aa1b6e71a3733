"""The ``gradguard`` command line.

    gradguard policies            list the policies, their parameters and defaults
    gradguard check SPEC          validate a policy spec and print the chain it builds
    gradguard tasks | models      list the bench's tasks and model families with their options
    gradguard bench [...]         the mitigation comparison suite (parallel, resumable, SQLite)
    gradguard train [...]         one configuration, with a progress bar
    gradguard report RUN_DIR      report.html (figures, events, diagnosis) from a run's telemetry
    gradguard advise [...]        choose the mitigation for a setup from a short, budgeted probe

Bad arguments exit with status 2 and one readable line, no traceback. Ctrl-C exits with status
130 and one line (``interrupted: 3 of 8 runs done; rerun the same command to resume``), no
traceback from this process or its workers.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any, NoReturn

from ._version import __version__
from .errors import GradGuardError, Interrupted


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, status 2
        self.exit(2, f"gradguard: error: {message}\n")


def _out_folder(path: str, flag: str) -> Path:
    """``path`` as an output folder, refused before any work starts if a file is in the way."""
    if "\0" in path:
        raise GradGuardError(f"{flag} {path!r}: a path cannot hold a NUL character")
    out = Path(path)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise GradGuardError(f"{flag} {path}: {p} is a file, not a folder")
            break
    return out


def _cmd_policies(_args: argparse.Namespace) -> int:
    from .policies import policy_infos

    for name, info in policy_infos().items():
        params = ", ".join(f"{o.name}={o.default!r}" for o in info.options)
        print(f"{name}({params})\n    {info.summary}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .policies import parse_spec

    chain = parse_spec(args.spec)
    for p in chain:
        print(p.spec())
    return 0


_AXIS_FLAGS = {
    "task": str,
    "model": str,
    "optimizer": str,
    "lr": float,
    "mitigation": str,
    "faults": str,
    "seed": int,
}


def _bench_configs(args: argparse.Namespace):
    """The suite's (or the TOML file's) grid, with the axes and settings given as flags replacing
    the suite's."""
    from .bench.config import MAX_GRID_RUNS, SUITES, expand_grid, load_toml_grid
    from .bench.store import run_key

    overrides = {k: getattr(args, k) for k in _AXIS_FLAGS if getattr(args, k)}
    if args.seeds is not None:
        if not 1 <= args.seeds <= MAX_GRID_RUNS:  # before the list of seeds is built
            raise GradGuardError(f"--seeds must be in [1, {MAX_GRID_RUNS}], got {args.seeds}")
        overrides["seed"] = list(range(args.seeds))
    settings = {
        k: getattr(args, k)
        for k in ("steps", "batch_size", "threads", "device")
        if getattr(args, k) is not None
    }
    options = {
        "task_options": _key_values(args.task_option, "--task-option"),
        "model_options": _key_values(args.model_option, "--model-option"),
    }
    if args.grid:
        if args.suite:
            raise GradGuardError("give either --suite or --grid, not both")
        if overrides or settings or any(options.values()):
            raise GradGuardError(
                "--grid files set every axis themselves; edit the file instead of passing axis flags"
            )
        return load_toml_grid(args.grid)
    name = args.suite or "quick"
    if name not in SUITES:
        raise GradGuardError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")
    configs = [
        cfg
        for base, axes in SUITES[name]
        for cfg in expand_grid(
            {
                **base,
                **settings,
                # An option given as a flag is added to (or replaces one of) each grid's own.
                **{k: {**base.get(k, {}), **v} for k, v in options.items() if v},
            },
            {**axes, **overrides},
        )
    ]
    # Flags that override an axis can make a suite's grids coincide: keep each run once.
    return list({run_key(c.as_dict()): c for c in configs}.values())


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.runner import DB_NAME, run_grid
    from .bench.store import ResultStore
    from .bench.summary import terminal_table, write_outputs

    configs = _bench_configs(args)
    out = _out_folder(
        args.out
        or f"results/bench-{Path(args.grid).stem if args.grid else (args.suite or 'quick')}",
        "--out",
    )
    print(
        f"gradguard bench: {len(configs)} runs -> {out}/ ({DB_NAME}, summary.md, summary.csv, PNG plots)",
        flush=True,
    )
    runs = run_grid(
        configs,
        out,
        workers=args.workers,
        progress=not args.no_progress,
        executor=args.executor,
        ray_address=args.ray_address,
        telemetry=args.telemetry,
    )
    with ResultStore(out / DB_NAME) as store:
        rows = write_outputs(runs, store.steps, out)
    print(terminal_table(rows))
    if args.telemetry:
        print(f"telemetry: {out / 'runs'}/ (a folder a run); render one: gradguard report FOLDER")
    missing = len(configs) - len(runs)
    if missing:
        print(
            f"{missing} run(s) failed; see the 'error' column of the runs table in {out / DB_NAME}",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    """One run in this process; data-parallel under ``torchrun`` (its environment names the
    rank) or over ``--nproc N`` processes this command starts itself."""
    import os

    from .bench import parallel
    from .bench.config import DEFAULT_SETUP, RunConfig, resolve

    fields = {
        k: getattr(args, k)
        for k in (
            "task",
            "model",
            "optimizer",
            "lr",
            "mitigation",
            "seed",
            "steps",
            "batch_size",
            "faults",
            "threads",
            "device",
        )
    }
    task_options = _key_values(args.task_option, "--task-option")
    # The default net's options (the quick suite's depth and width) go with the default model.
    model_options = {
        **(DEFAULT_SETUP["model_options"] if args.model == DEFAULT_SETUP["model"] else {}),
        **_key_values(args.model_option, "--model-option"),
    }
    cfg = RunConfig.from_dict(
        {
            **{k: v for k, v in fields.items() if v is not None},
            "task_options": task_options,
            "model_options": model_options,
        }
    )
    resolve(cfg)
    if args.nproc < 1:
        raise GradGuardError(f"--nproc must be >= 1, got {args.nproc}")
    if args.out:
        _out_folder(args.out, "--out")
    if parallel.launched_by_torchrun():
        if args.nproc != 1:
            raise GradGuardError(
                "--nproc starts its own processes; under torchrun leave it out "
                "(torchrun's --nproc_per_node sets the number)"
            )
        parallel.check_divisible(cfg.batch_size, int(os.environ["WORLD_SIZE"]))
        return _train_rank(cfg, args.out)
    if args.nproc == 1:
        return _train_one(cfg, args.out)
    # Refuse a bad configuration here, once, rather than in every process.
    parallel.check_divisible(cfg.batch_size, args.nproc)
    try:
        parallel.spawn(args.nproc, _train_rank, cfg, args.out)
    except Exception as e:  # a process failed: its traceback is in the message
        print(f"gradguard: error: a training process failed: {e}", file=sys.stderr)
        return 1
    return 0


def _train_rank(cfg, out: str | None) -> int:
    """One rank of a data-parallel run (under torchrun or spawned by ``--nproc``)."""
    from .bench import parallel

    with parallel.process_group_from_env():
        return _train_one(cfg, out)


def _train_one(cfg, out: str | None) -> int:
    """Train ``cfg``; rank 0 (or the only process) shows the progress bar and prints the result."""
    from tqdm import tqdm

    from .bench import parallel
    from .bench.train import train_run

    ranks = parallel.current()
    main = ranks is None or ranks.is_main
    desc = f"{cfg.task}/{cfg.model} {cfg.mitigation}"
    if ranks is not None:
        desc += f" x{ranks.world_size} ranks"
    with tqdm(total=cfg.steps, unit="step", desc=desc, disable=not main) as bar:
        try:
            result, _ = train_run(cfg, on_step=lambda _s: bar.update(1), log_dir=out)
        except KeyboardInterrupt:
            bar.close()  # before the line, so that it starts a line of its own
            # Every rank is interrupted alike; the main one speaks for them.
            raise Interrupted(
                f"interrupted at step {bar.n} of {cfg.steps}" if main else ""
            ) from None
    if not main:
        return 0
    for k, v in result.items():
        print(f"{k:20s} {v}")
    if out and result.get("skipped_data"):
        from .policies.rollback import write_skip_batches

        print(f"skipped steps in {write_skip_batches(result['skipped_data'], out)}")
    if out:
        print(f"telemetry in {out}; render it with: gradguard report {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .diagnose.html import open_run, render_report, terminal_summary
    from .diagnose.rules import diagnose

    if args.out:
        _out_folder(args.out, "--out")
    run = open_run(args.run_dir)
    findings = diagnose(run)
    path = render_report(run, findings, args.out or run.path.parent)
    print(terminal_summary(run, findings, path))
    return 0


def _key_values(items: list[str] | None, flag: str) -> dict:
    """``KEY=VALUE`` flags as a dict; values read as JSON when they parse (12, 1.5, true), else
    as text (relu)."""
    import json

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GradGuardError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} depth=12")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


_ADVISE_BENCH_FLAGS = (
    "task",
    "model",
    "optimizer",
    "batch_size",
    "momentum",
    "weight_decay",
    "threads",
)
_DEVICE_HELP = (
    "where each torch run trains: cpu (default), cuda or cuda:N (the runs of a bench share it; "
    "--workers sets how many at once); part of the run's config"
)
_THREADS_HELP = (
    "CPU threads each run trains with (default 1), whatever the cores and workers: part of the "
    "run's config, so its figures are the same on any machine"
)


def _cmd_advise(args: argparse.Namespace) -> int:
    from .advice import advise
    from .advice.advisor import ProbeFailed

    settings = {k: getattr(args, k) for k in _ADVISE_BENCH_FLAGS if getattr(args, k) is not None}
    task_options = _key_values(args.task_option, "--task-option")
    model_options = _key_values(args.model_option, "--model-option")
    if task_options:
        settings["task_options"] = task_options
    if model_options:
        settings["model_options"] = model_options
    if args.entry and settings:
        flags = ", ".join("--" + k.replace("_", "-") for k in settings)
        raise GradGuardError(
            f"--entry is your own setup; {flags} describe a bench setup: give one or the other"
        )
    if args.out:
        _out_folder(args.out, "--out")
    try:
        advice = advise(
            entry=args.entry,
            lr=args.lr,
            budget=args.budget,
            out=args.out,
            workers=args.workers,
            seeds=args.seeds,
            stress=tuple(args.stress),
            steps=args.steps,
            percentile=args.percentile,
            progress=not args.no_progress,
            **settings,
        )
    except ProbeFailed as e:
        print(f"gradguard advise: {e}", file=sys.stderr)
        return 1
    print(advice.to_json() if args.json else advice)
    return 0


def _option_flags(parser: argparse.ArgumentParser, where: str = "") -> None:
    parser.add_argument(
        "--task-option",
        action="append",
        metavar="KEY=VALUE",
        help=f"task option, e.g. T=20 (gradguard tasks lists them){where}",
    )
    parser.add_argument(
        "--model-option",
        action="append",
        metavar="KEY=VALUE",
        help=f"model option, e.g. depth=12; repeat the flag for several (gradguard models){where}",
    )


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _print_registry(infos: dict) -> None:
    for name, info in infos.items():
        extra = f"  (inputs: {info.inputs})" if hasattr(info, "inputs") else ""
        print(f"{name}{extra}\n    {info.summary}")
        for o in info.options:
            print(f"    {o.name}={o.default!r}  {_type_name(o.type)}")


def _cmd_tasks(_args: argparse.Namespace) -> int:
    from .bench.tasks import task_infos

    _print_registry(task_infos())
    return 0


def _cmd_models(_args: argparse.Namespace) -> int:
    from .bench.models import model_infos

    _print_registry(model_infos())
    return 0


def _add_listing_parsers(sub: argparse._SubParsersAction) -> None:
    """The subcommands that list what exists: policies, tasks, models."""
    sub.add_parser("policies", help="list the mitigation policies").set_defaults(func=_cmd_policies)
    sub.add_parser("tasks", help="list the bench's tasks, their options and defaults").set_defaults(
        func=_cmd_tasks
    )
    sub.add_parser(
        "models", help="list the bench's model families, their options and defaults"
    ).set_defaults(func=_cmd_models)


def _add_check_parser(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser("check", help="validate a policy spec")
    check.add_argument("spec", help="e.g. 'skip_nonfinite+zclip:z_thresh=2.0'")
    check.set_defaults(func=_cmd_check)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench", help="compare mitigations over a grid (default: the quick suite on digits)"
    )
    bench.add_argument("--suite", help="named suite (default quick)")
    bench.add_argument("--grid", help="TOML file with [base] settings and [grid] axes")
    for name, typ in _AXIS_FLAGS.items():
        if name != "seed":
            bench.add_argument(
                f"--{name}", type=typ, nargs="+", help=f"override the suite's {name} axis"
            )
    bench.add_argument("--seed", type=int, nargs="+", help="override the seeds")
    _option_flags(bench, " (added to each grid's own)")
    bench.add_argument("--seeds", type=int, help="use seeds 0..N-1")
    bench.add_argument("--steps", type=int)
    bench.add_argument("--batch-size", type=int)
    bench.add_argument("--threads", type=int, help=_THREADS_HELP)
    bench.add_argument("--device", help=_DEVICE_HELP)
    bench.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    bench.add_argument(
        "--out", help="results folder (default results/bench-SUITE); rerun to resume"
    )
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument(
        "--telemetry",
        action="store_true",
        help="record each run's telemetry in a folder named for it, "
        "OUT/runs/TASK-MODEL-MITIGATION-lrLR-seedN-HASH (optimizer and faults too where not the "
        "default); then: gradguard report OUT/runs/NAME",
    )
    bench.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: worker processes here; ray: one Ray task per run (pip install gradguard[ray])",
    )
    bench.add_argument(
        "--ray-address",
        help="the Ray cluster (ray://head:10001, auto); default $RAY_ADDRESS, else a local Ray",
    )
    bench.set_defaults(func=_cmd_bench)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    from .bench.config import DEFAULT_SETUP, OPTIMIZERS  # plain data: no torch

    train = sub.add_parser(
        "train",
        help="train one configuration with a progress bar",
        description="Train one configuration. With no flags: the bench's default setup, the quick "
        "suite's net (a 12-layer plain MLP, depth=12 width=64, on digits, SGD with momentum 0.9) "
        "at LR 0.1, where it diverges unguarded in most seeds, under the default Guard. "
        "gradguard tasks / gradguard models list what else exists.",
    )
    train.add_argument(
        "--task",
        default=DEFAULT_SETUP["task"],
        help="a task (gradguard tasks); default %(default)s",
    )
    train.add_argument(
        "--model",
        default=DEFAULT_SETUP["model"],
        help="a model family (gradguard models); default %(default)s, with depth=12 width=64",
    )
    train.add_argument(
        "--optimizer",
        default=DEFAULT_SETUP["optimizer"],
        choices=OPTIMIZERS,
        help="default %(default)s (momentum 0.9)",
    )
    train.add_argument("--lr", type=float, default=DEFAULT_SETUP["lr"], help="default %(default)s")
    _option_flags(train)
    train.add_argument(
        "--mitigation",
        "--policy",
        default="default",
        help="a policy spec or variant; 'none' = no guard; default %(default)s",
    )
    train.add_argument("--seed", type=int, default=0, help="default %(default)s")
    train.add_argument(
        "--faults",
        default="none",
        help="faults to inject, e.g. 'nan:p=0.01+spike:scale=1e4,p=0.02'",
    )
    _add_train_run_flags(train, DEFAULT_SETUP)
    train.set_defaults(func=_cmd_train)


def _add_train_run_flags(train: argparse.ArgumentParser, defaults: dict) -> None:
    """``train``'s flags for how the run goes (length, batch, threads, output, processes)."""
    train.add_argument("--steps", type=int, default=defaults["steps"], help="default %(default)s")
    train.add_argument(
        "--batch-size", type=int, default=defaults["batch_size"], help="default %(default)s"
    )
    train.add_argument("--threads", type=int, default=1, help=_THREADS_HELP)
    train.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    train.add_argument("--out", help="record telemetry to this folder (then: gradguard report OUT)")
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel over N local processes (DDP; --batch-size is the global batch). "
        "Under torchrun leave it out: torchrun --nproc_per_node N -m gradguard train ...",
    )


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "report", help="write report.html (diagnosis, events, figures) from a run's telemetry"
    )
    report.add_argument(
        "run_dir", help="the folder a Guard's log_dir wrote (holds telemetry.jsonl)"
    )
    report.add_argument("--out", help="folder for report.html and the figures (default: RUN_DIR)")
    report.set_defaults(func=_cmd_report)


def _add_advise_parser(sub: argparse._SubParsersAction) -> None:
    adv = sub.add_parser(
        "advise",
        help="choose the mitigation for a setup: LR probe, candidate policies under stress, "
        "within a budget",
        description="Probe a setup (a bench task/model, or your own entry point) within a budget: "
        "an unguarded LR range probe, then each candidate policy at your LR and at x3/x10 over a "
        "few seeds; print the recommended policy, its code line, the evidence and the diagnosis. "
        "Rerun with the same --out to resume.",
    )
    adv.add_argument(
        "--entry",
        help="your own setup: package.module:function returning model, optimizer factory, "
        "loss(model, batch) and data (see examples/advise_entry.py)",
    )
    adv.add_argument("--task", help="bench task (default digits)")
    adv.add_argument("--model", help="bench model (default mlp)")
    adv.add_argument("--optimizer", help="bench optimizer (default sgd)")
    adv.add_argument("--lr", type=float, help="your learning rate (--entry: default its own)")
    adv.add_argument("--batch-size", type=int)
    adv.add_argument("--threads", type=int, help=_THREADS_HELP + " (bench setups)")
    adv.add_argument("--momentum", type=float)
    adv.add_argument("--weight-decay", type=float)
    _option_flags(adv)
    _add_advise_probe_flags(adv)
    adv.set_defaults(func=_cmd_advise)


def _add_advise_probe_flags(adv: argparse.ArgumentParser) -> None:
    """``advise``'s flags for the probe itself: its budget, output, runs and answer."""
    adv.add_argument(
        "--budget", default="300s", help="wall clock (300s, 5min) or training steps (2000steps)"
    )
    adv.add_argument(
        "--out", help="results folder (default results/advise-SETTING); rerun to resume"
    )
    adv.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    adv.add_argument("--seeds", type=int, default=2, help="seeds per policy and LR (default 2)")
    adv.add_argument(
        "--stress",
        type=float,
        nargs="*",
        default=[3.0, 10.0],
        help="LR multiples each policy must survive besides x1 (default 3 10)",
    )
    adv.add_argument("--steps", type=int, help="steps per run at most (default 300)")
    adv.add_argument(
        "--percentile",
        type=float,
        default=90.0,
        help="clip threshold: this percentile of the healthy run's gradient norms (default 90)",
    )
    adv.add_argument("--json", action="store_true", help="print the answer as JSON")
    adv.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradguard", description="Prevent, detect, diagnose and mitigate exploding gradients."
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # The order here is the order ``gradguard --help`` lists them in.
    _add_listing_parsers(sub)
    _add_check_parser(sub)
    _add_bench_parser(sub)
    _add_train_parser(sub)
    _add_report_parser(sub)
    _add_advise_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except GradGuardError as e:
        print(f"gradguard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, the work shut down: gradguard.errors.Interrupted
        line = str(e) if isinstance(e, Interrupted) else "interrupted"
        if line:
            print(line, file=sys.stderr)
        return 130
    except OSError as e:  # a path the arguments name: a folder for a file, unwritable, ...
        where = f": {e.filename}" if e.filename else ""
        print(f"gradguard: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
