"""What every stage is: a small class built from its config, called once with the shared context."""

from __future__ import annotations

from typing import Any

from pipeline.core.context import LoadContext


class Stage:
    """One step of a load. Reads what earlier stages put in the context, adds its own part, and returns
    facts worth keeping in the run record (JSON-serializable), or None."""

    kind: str = ""

    def __call__(self, ctx: LoadContext) -> dict[str, Any] | None:
        raise NotImplementedError
