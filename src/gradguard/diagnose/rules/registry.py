"""The rule registry: the rules in report order, their info records, and ``diagnose``.

One shape with the other registries (bench models and tasks, faults): a frozen :class:`RuleInfo`
per rule (name, rule, summary, options), ``list_rules()`` for the names (the ``cause`` ids),
``rule_infos()`` for every record by name and ``rule_info(name)`` for one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError
from ...registries import InfoRecord, summary_of
from ..records import RunLog
from .base import SEVERITIES, Finding, Rule

#: Every rule, in report order for equal severity. A contract test runs over this list.
RULES: list[Rule] = []


@dataclass(frozen=True)
class RuleInfo(InfoRecord):
    """One registered rule: its name (the ``cause`` id of its findings), the rule itself, its
    one-line summary (its docstring's first line) and its options: none, since a rule's thresholds
    are constants of its module, so always ``()``."""

    name: str
    rule: Rule
    summary: str
    options: tuple[Any, ...] = ()


def register(rule: Rule) -> Rule:
    RULES.append(rule)
    return rule


def list_rules() -> list[str]:
    """The ``cause`` ids of the registered rules."""
    return [r.__name__ for r in RULES]


def rule_infos() -> dict[str, RuleInfo]:
    """Every registered rule's record by name, in report order."""
    return {r.__name__: RuleInfo(r.__name__, r, summary_of(r.__doc__)) for r in RULES}


def rule_info(name: str) -> RuleInfo:
    """The record of rule ``name``; an unknown name raises ``ConfigError`` naming the valid ones."""
    infos = rule_infos()
    if name not in infos:
        raise ConfigError(f"unknown diagnosis rule {name!r}; valid rules: {', '.join(infos)}")
    return infos[name]


def diagnose(run: RunLog, rules: Iterable[Rule] | None = None) -> list[Finding]:
    """The findings for a run, most severe first; empty for a healthy run.

    A rule that fails on an unexpected file is reported as a warning and skipped, so one bad
    field never costs the whole report.
    """
    found: list[Finding] = []
    for rule in RULES if rules is None else rules:
        try:
            f = rule(run)
        except Exception as e:  # a report must survive one rule's bug
            warnings.warn(f"gradguard: diagnosis rule {rule.__name__} failed: {e!r}", stacklevel=2)
            continue
        if f is not None:
            found.append(f)
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(found, key=lambda f: rank.get(f.severity, len(rank)))
