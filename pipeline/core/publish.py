"""Build a folder under a temporary name and rename it into place: readers never see half of it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def building(target: Path) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; when the block ends without error it becomes `target`.

    A process killed half-way leaves only a `.<name>.partial-<pid>` folder, never something that looks
    like a finished `target`. If another process published the same target first, theirs is kept."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        try:
            partial.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
