"""What the bench's two registries (models and tasks) share beyond every registry's record
shape (:mod:`gradguard.registries`): the check of an option's value against its annotation.

A registered builder declares its options as keyword parameters with a default and an annotation
(``int``, ``float``, ``bool`` or a ``Literal`` of choices); :func:`options_of` reads them into
:class:`OptionInfo` records and :func:`check_type` checks a value against one before the call.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from ..errors import ConfigError
from ..registries import OptionInfo, options_of, summary_of

__all__ = ["OptionInfo", "check_type", "options_of", "summary_of"]


def check_type(where: str, key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint`` (a ``Literal``, ``bool``, ``int`` or
    ``float``; anything else passes). A float option takes an int, returned as a float."""
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {', '.join(choices)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}={value!r} is not a boolean (use True or False)")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}={value!r} is not an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}={value!r} is not a number")
        return float(value)
    return value
