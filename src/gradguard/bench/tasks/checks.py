"""Option checks the task builders share, and their seeded random generators."""

from __future__ import annotations

import numpy as np

from ...errors import ConfigError


def _check_int(name: str, value: object, *, minimum: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}: {name} must be >= {minimum}, got {value}; pass a larger one")
    return int(value)


def _check_float(name: str, value: object, *, low: float, high: float, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
    if not (low <= float(value) <= high):
        raise ConfigError(f"{where}: {name} must lie in [{low}, {high}], got {value}")
    return float(value)


def _seeded(seed: int, stream: int) -> np.random.Generator:
    """An independent generator per (seed, split): the test set does not change when the
    training size does."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))
