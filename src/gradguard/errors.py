"""The project's own error types: every bad input raises one of these with a message that names
the problem and the fix."""

from __future__ import annotations


class GradGuardError(Exception):
    """Base class of every error gradguard raises on purpose."""


class SpecError(GradGuardError, ValueError):
    """A policy spec (string, name or parameter) is malformed, unknown or out of range."""


class ConfigError(GradGuardError, ValueError):
    """A Guard was built or used with arguments that cannot work together."""
