"""The project's own error types: every bad input raises one of these with a message that names
the problem and the fix."""

from __future__ import annotations


class GradGuardError(Exception):
    """Base class of every error gradguard raises on purpose."""


class SpecError(GradGuardError, ValueError):
    """A policy spec (string, name or parameter) is malformed, unknown or out of range."""


class ConfigError(GradGuardError, ValueError):
    """A Guard was built or used with arguments that cannot work together."""


class SnapshotError(GradGuardError, OSError):
    """A rollback snapshot could not be written (the message names the folder and the fix). Also
    an ``OSError``: the disk's own error (a full disk, a lost permission) is its cause."""


class TrainingHalted(GradGuardError):
    """The Guard stopped training on purpose: going on could only corrupt or stall the run.

    ``reason`` is a short machine-readable tag (``nonfinite_weights``, ``nonfinite_hyperparameter``,
    ``nonfinite_state``, ``stalled``, ``rollback_exhausted``, ``runaway_exhausted``) that
    training loops record as the run's outcome; the message says what the Guard saw and what to
    change.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class IntegrityError(TrainingHalted):
    """A step would leave (or left) a non-finite weight or optimizer state, and the chain has no
    ``rollback`` to restore the last good state."""


class StallError(TrainingHalted):
    """Too many optimizer steps in a row were skipped: the run is not training any more."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a bench, advise or train command after it shut its work down cleanly:
    every run is stored whole or not at all, and no run is left claimed. The message is the one
    line the command line prints (``interrupted: 3 of 8 runs done; rerun the same command to
    resume``). A ``KeyboardInterrupt``, so code that catches that still catches this."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
