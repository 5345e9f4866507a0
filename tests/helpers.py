"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def entry(record: dict, stage: str) -> dict:
    """A run record's entry for `stage` (the runner's `setup` comes first, then the stages in order)."""
    return next(s for s in record["stages"] if s["stage"] == stage)
