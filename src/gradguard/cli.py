"""The ``gradguard`` command line.

    gradguard policies            list the policies, their parameters and defaults
    gradguard check SPEC          validate a policy spec and print the chain it builds
    gradguard demo [--lr ...]     a deep plain net on handwritten digits, with and without guards

Bad arguments exit with status 2 and one readable line, no traceback.
"""

from __future__ import annotations

import argparse
import inspect
import sys

from . import __version__
from .errors import GradGuardError
from .policies import available_policies, parse_spec, policy_class


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2
        self.exit(2, f"gradguard: error: {message}\n")


def _cmd_policies(_args: argparse.Namespace) -> int:
    for name in available_policies():
        cls = policy_class(name)
        sig = inspect.signature(cls.__init__)
        params = ", ".join(
            f"{p.name}={p.default!r}" for p in sig.parameters.values() if p.name != "self"
        )
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        print(f"{name}({params})\n    {summary}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    chain = parse_spec(args.spec)
    for p in chain:
        print(p.spec())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_POLICIES, format_table, run_demo

    policies = args.policy or list(DEMO_POLICIES)
    for p in policies:
        if p != "none":
            parse_spec(p)  # fail before any training on a bad spec
    results = []
    for lr in args.lr:
        if not lr > 0:
            raise GradGuardError(f"--lr must be > 0, got {lr}")
        for seed in range(args.seeds):
            for p in policies:
                results.append(run_demo(p, lr=lr, seed=seed, steps=args.steps))
                print(
                    format_table(results[-1:]).splitlines()[-1]
                    if len(results) > 1
                    else format_table(results[-1:]),
                    flush=True,
                )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradguard", description="Prevent, detect, diagnose and mitigate exploding gradients."
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("policies", help="list the mitigation policies").set_defaults(func=_cmd_policies)
    check = sub.add_parser("check", help="validate a policy spec")
    check.add_argument("spec", help="e.g. 'skip_nonfinite+zclip:z_thresh=2.0'")
    check.set_defaults(func=_cmd_check)
    demo = sub.add_parser(
        "demo", help="deep plain net on handwritten digits, with and without guards"
    )
    demo.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=[0.1],
        help="learning rates (default 0.1, where the unguarded net diverges)",
    )
    demo.add_argument("--seeds", type=int, default=1)
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument(
        "--policy", action="append", help="policy spec to compare (repeatable); 'none' = no guard"
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GradGuardError as e:
        print(f"gradguard: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
