"""What every stage is: a small class built from its config, called once with the shared context."""

from __future__ import annotations

from typing import Any

from pipeline.core.context import LoadContext
from pipeline.core.schema import StageConfig


class Stage:
    """One step of a load. Reads what earlier stages put in the context, adds its own part, and returns
    facts worth keeping in the run record (JSON-serializable), or None. Built from its config: the schema
    dataclass that `stages.registry` names for it, the one home of its settings and their defaults."""

    kind: str = ""

    def __init__(self, cfg: StageConfig) -> None:
        self.cfg = cfg

    def __call__(self, ctx: LoadContext) -> dict[str, Any] | None:
        raise NotImplementedError
