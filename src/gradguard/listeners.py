"""What watches a Guard: the listener protocol the core defines and the diagnosis implements.

The Guard tells one listener (``Guard(telemetry=...)``) about each step: before the optimizer
steps (to keep what it needs to measure the update) and after (the step's context, statistics and
report). :class:`gradguard.diagnose.Telemetry` is the listener gradguard ships; the core knows it
only through this protocol, so that nothing in the core imports :mod:`gradguard.diagnose`.

``Guard(log_dir=DIR)`` asks :func:`log_dir_listener` for the listener that records to ``DIR``. The
package installs the factory that builds a ``Telemetry`` (``gradguard/__init__.py``, on import;
the diagnosis itself loads only when a Guard is given a ``log_dir``); another may be installed
with :func:`set_log_dir_listener`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import ConfigError

if TYPE_CHECKING:
    from .guard import Guard
    from .policies.base import StepContext
    from .report import StepReport
    from .stats import GradStats


@runtime_checkable
class StepListener(Protocol):
    """Watches one Guard's steps. Called by the Guard, in this order: :meth:`bind` once; per step
    taken, :meth:`wants_update_ratio` then (if True) :meth:`before_update` just before the
    optimizer steps; per step, taken or skipped, :meth:`after_step`; :meth:`close` once, from
    ``Guard.close()``, unless :attr:`closed` already."""

    @property
    def closed(self) -> bool: ...

    def bind(self, guard: Guard) -> None: ...

    def wants_update_ratio(self, step: int) -> bool: ...

    def before_update(self, stats: GradStats) -> None: ...

    def after_step(
        self,
        guard: Guard,
        ctx: StepContext,
        stats: GradStats,
        report: StepReport,
        stepped: bool,
        localization: dict[str, Any] | None = None,
    ) -> None: ...

    def close(self, counters: Mapping[str, Any] | None = None) -> None: ...


LogDirFactory = Callable[["str | os.PathLike[str]"], StepListener]

_factory: LogDirFactory | None = None


def set_log_dir_listener(factory: LogDirFactory | None) -> LogDirFactory | None:
    """Install the factory behind ``Guard(log_dir=...)``; return the one it replaces."""
    global _factory
    previous, _factory = _factory, factory
    return previous


def log_dir_listener(log_dir: str | os.PathLike[str]) -> StepListener:
    """The listener that records a Guard's steps to ``log_dir``."""
    if _factory is None:
        raise ConfigError(
            "Guard(log_dir=...) needs a telemetry recorder and none is installed (import gradguard "
            "installs gradguard.diagnose's); pass telemetry=gradguard.diagnose.Telemetry(log_dir)"
        )
    return _factory(log_dir)
