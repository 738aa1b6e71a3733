"""The task registry: builders registered by name, their info records, and ``make_task``.

One shape with the other registries (models, diagnosis rules, faults): a frozen :class:`TaskInfo`
per task (name, builder, summary, options), ``list_tasks()`` for the names, ``task_infos()`` for
every record by name and ``task_info(name)`` for one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...errors import ConfigError
from ...registries import InfoRecord
from ..options import OptionInfo, options_of, summary_of
from .base import Task


@dataclass(frozen=True)
class TaskInfo(InfoRecord):
    """One registered task: its name, its builder, its summary (the first paragraph of the
    builder's docstring) and its options (the builder's parameters, with defaults and types)."""

    name: str
    build: Callable[..., Task]
    summary: str
    options: tuple[OptionInfo, ...]


_REGISTRY: dict[str, TaskInfo] = {}


def _register(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    def add(builder: Callable[..., Task]) -> Callable[..., Task]:
        options = options_of(builder, keyword_only=False)
        _REGISTRY[name] = TaskInfo(name, builder, summary_of(builder.__doc__), options)
        return builder

    return add


def available_tasks() -> list[str]:
    """The registered task names, in registration order."""
    return list(_REGISTRY)


def list_tasks() -> list[str]:
    """The registered task names, in registration order (the same as ``available_tasks()``)."""
    return available_tasks()


def task_infos() -> dict[str, TaskInfo]:
    """Every registered task's record by name, in registration order."""
    return dict(_REGISTRY)


def task_info(name: str) -> TaskInfo:
    """The record of task ``name``; an unknown name raises ``ConfigError`` naming the valid ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(available_tasks())}")
    return _REGISTRY[name]


def task_options(name: str) -> dict[str, object]:
    """The options ``make_task(name, ...)`` accepts, with their defaults."""
    return task_info(name).defaults


def make_task(name: str, **options: object) -> Task:
    """Build the task ``name`` with ``options`` (see ``task_options(name)``).

    An unknown name or option, or a value out of range, raises ``ConfigError`` naming the valid
    choices.
    """
    builder = _builder(name)
    valid = task_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in valid.items())
        raise ConfigError(
            f"task {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options (with defaults) are: {listed}"
        )
    task = builder(**options)
    task.options = {**valid, **options}
    return task


def _builder(name: str) -> Callable[..., Task]:
    return task_info(name).build
