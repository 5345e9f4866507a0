"""A point where a fault test can hold a run, so that a signal lands inside a stage instead of racing it.

With `QLOAD_HOLD=<point>:<file>` in the environment, the first time the run reaches `<point>` it creates
`<file>` and waits there until it is interrupted or killed. Unset (always, outside tests), it costs one
dictionary lookup. It reads no config: a config cannot turn it on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def hold(point: str) -> None:
    """Wait here forever if the environment asks to hold at `point`; otherwise return at once."""
    name, _, file = os.environ.get("QLOAD_HOLD", "").partition(":")
    if name != point or not file:
        return
    Path(file).touch()
    while True:
        time.sleep(0.05)
