"""A study's answer, from its trials' records (`trial.json`): the best setting that fits, the Pareto front.

The sweeper prints it when the study ends and the report draws it; both read it here, from the same files,
so the two cannot disagree.
"""

from __future__ import annotations

from typing import Any

from pipeline.search.settings import MAXIMIZED, Objective
from pipeline.search.trial import COMPLETE, PRUNED

MEMORY = Objective.memory.value


def quality_key(trials: list[dict[str, Any]]) -> str | None:
    """The quality objective: the first of a complete trial's values that is not memory."""
    for t in trials:
        for key in t.get("values") or {}:
            if key != MEMORY:
                return key
    return None


def _lower_is_better(key: str, value: float) -> float:
    return -value if Objective(key) in MAXIMIZED else value


def loaded(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials that were loaded and verified (one per setting: a repeat answered by an earlier trial is
    left out). Each of them fits: a setting over the budget is pruned before it loads."""
    return [t for t in trials if t["state"] == COMPLETE and t.get("same_as") is None]


def best(trials: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The loaded trial with the best quality; ties go to less memory, then the earlier trial."""
    found = loaded(trials)
    if not found:
        return None
    return min(found, key=lambda t: (_lower_is_better(key, t["values"][key]), t["memory_bytes"], t["number"]))


def pareto(trials: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The loaded trials that no other beats on both planned memory and quality, by memory."""
    ordered = sorted(loaded(trials), key=lambda t: (t["memory_bytes"], _lower_is_better(key, t["values"][key])))
    front: list[dict[str, Any]] = []
    for t in ordered:
        if not front or _lower_is_better(key, t["values"][key]) < _lower_is_better(key, front[-1]["values"][key]):
            front.append(t)
    return front


def smallest_pruned(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pruned trial with the smallest planned figure: what a budget would have to be for anything to fit."""
    pruned = [t for t in trials if t["state"] == PRUNED and t.get("memory_bytes") is not None]
    return min(pruned, key=lambda t: t["memory_bytes"]) if pruned else None
