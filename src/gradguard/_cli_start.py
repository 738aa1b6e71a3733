"""Ctrl-C while the command line is still starting: one line and status 130, no traceback.

``python -m gradguard`` and the ``gradguard`` script import the package (and torch with it, a
few seconds) before :func:`gradguard.cli.main` can catch anything; a KeyboardInterrupt there would
print a traceback. So the package's first import, when it is the command line's, installs
:func:`_quit` for SIGINT (on import of this module, the package's first); ``main`` puts Python's own handler back when it starts and ignores
SIGINT again once its work is done (only the interpreter's teardown is left). A program that
imports gradguard as a library is left alone.
"""

from __future__ import annotations

import os
import signal
import sys

LINE = "interrupted; rerun the same command to resume"
installed = False


def _quit(_signum: int, _frame: object) -> None:
    # Nothing has started yet (no run, no worker, no file): there is nothing to clean up.
    os.write(2, (LINE + "\n").encode())
    os._exit(130)


def _is_cli() -> bool:
    # While ``python -m gradguard`` imports the package, sys.argv[0] is still "-m".
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or os.path.basename(argv0) in ("gradguard", "gradguard.exe")


def install() -> None:
    global installed
    if _is_cli() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _quit)
        installed = True


def started() -> None:
    """``main`` runs: Ctrl-C raises KeyboardInterrupt again, which ``main`` turns into its line."""
    if installed and signal.getsignal(signal.SIGINT) is _quit:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def finished() -> None:
    """``main``'s work is done and said: a Ctrl-C now would only interrupt the teardown."""
    if installed:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


install()
