"""Diagnose: per-layer telemetry, events, where an explosion starts, its likely cause, a report.

guard = gradguard.Guard(model, opt, "default", log_dir="runs/x")   # telemetry
report = guard.step(loss=loss, replay=lambda: loss_fn(model(x), y))  # localize NaNs
guard.close()
gradguard.diagnose.write_report("runs/x")                             # or: gradguard report runs/x
"""

from .events import EventDetector
from .localize import Localization, localize_static, replay
from .records import RunLog, load_run
from .rules import RULES, Finding, diagnose, list_rules, rule_info, rule_infos
from .telemetry import Telemetry

__all__ = [
    "RULES",
    "EventDetector",
    "Finding",
    "Localization",
    "RunLog",
    "Telemetry",
    "diagnose",
    "list_rules",
    "load_run",
    "localize_static",
    "replay",
    "rule_info",
    "rule_infos",
    "terminal_summary",
    "write_report",
]


def __getattr__(name: str):
    # The report pulls in matplotlib: imported only when asked for, so a Guard with log_dir
    # (which imports this package) does not pay for it.
    if name in ("write_report", "terminal_summary"):
        from . import html

        return getattr(html, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
