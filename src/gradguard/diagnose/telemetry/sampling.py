"""Which steps the telemetry file keeps: the sampled ones (``every``), and exactly the ``context``
steps before each event and after it, each written once."""

from __future__ import annotations

import math
from collections import deque
from typing import Any


def _keep_auto(step: int) -> bool:
    """``every="auto"``: every step for the first 1000, then every 10th to 10 000, every 100th to
    100 000, ...: a long run's file grows with log(steps)."""
    if step < 1000:
        return True
    stride = 10 ** (int(math.log10(step)) - 2)
    return step % stride == 0


class ContextWindow:
    """The recent steps (the current one and the ``context`` before it), the steps already
    written among them, and the countdown of steps still kept after the last event."""

    def __init__(self, every: int | str, context: int):
        self.every = every
        self.context = context
        self.recent: deque[dict[str, Any]] = deque(maxlen=context + 1)  # + the current step
        self.written: set[int] = set()  # steps written, among the recent ones
        self.after_event = 0

    def sampled(self, step: int) -> bool:
        """Whether the sampling keeps ``step`` (events aside)."""
        return _keep_auto(step) if self.every == "auto" else step % int(self.every) == 0

    def keeps(self, step: int) -> bool:
        """Whether a step without an event is kept: sampled, or soon after an event."""
        return self.after_event > 0 or self.sampled(step)

    def push(self, rec: dict[str, Any]) -> None:
        self.recent.append(rec)

    def before_current(self) -> list[dict[str, Any]]:
        """The recent steps before the current one: an event's context."""
        return list(self.recent)[:-1]

    def last(self) -> list[dict[str, Any]]:
        """The last ``context`` steps: kept at the end of a run."""
        return list(self.recent)[len(self.recent) - self.context :]

    def claim(self, step: int) -> bool:
        """True the first time ``step`` is to be written (then it counts as written)."""
        if step in self.written:
            return False
        self.written.add(step)
        if len(self.written) > 4 * (self.context + 1):  # only recent steps can come up again
            oldest = self.recent[0]["step"] if self.recent else step
            self.written = {s for s in self.written if s >= oldest}
        return True

    def event(self) -> None:
        """An event (or a localization) at the current step: keep the next ``context`` steps."""
        self.after_event = self.context

    def tick(self, incident: bool) -> None:
        """A step without an event uses up one step of the countdown."""
        if self.after_event > 0 and not incident:
            self.after_event -= 1
