"""Progress on every step that can take more than a second or two, one helper for every layer.

In a terminal a step with a natural fraction (bytes written, bytes streamed) shows a tqdm bar; in a log file
or under a launcher (stderr is not a terminal) it prints a plain line every `INTERVAL_S` seconds and one when
it ends, so a log says how far a long build got without carriage-return noise. A step done within `QUIET_S`
shows neither. A step with no natural
fraction (a kernel's first compile) prints one line when it starts and one saying how long it took.
`progress=false` (the run config's top-level key) turns all of it off: the load process calls `configure`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

INTERVAL_S = 10.0  # seconds between plain lines when stderr is not a terminal
QUIET_S = 1.0  # a step shorter than this shows nothing: no bar in a terminal, no line in a log

_enabled = os.environ.get("QLOAD_PROGRESS", "1") != "0"  # spawned children (the verify reference) inherit it


def configure(enabled: bool) -> None:
    """Turn progress on or off for this process and the processes it spawns."""
    global _enabled
    _enabled = bool(enabled)
    os.environ["QLOAD_PROGRESS"] = "1" if enabled else "0"


def enabled() -> bool:
    return _enabled


def _human(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:,.0f} {unit}".rstrip()
    for suffix in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or suffix == "TB":
            return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.1f} {suffix}"
        n /= 1000
    return f"{n} B"


def _say(line: str, stream: IO[str] | None) -> None:
    """A plain line: to the log when this process logs (Hydra's job logging in the load process), else stderr."""
    log = logging.getLogger("qload.progress")
    if stream is None and log.hasHandlers() and log.isEnabledFor(logging.INFO):
        log.info(line)
    else:
        print(line, file=stream or sys.stderr, flush=True)


def _is_terminal(stream: IO[str] | None) -> bool:
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Bar:
    """A step with a total: `update(n)` as work is done, `close()` at the end (or use it as a context manager)."""

    def __init__(
        self, total: float, desc: str, unit: str = "B", stream: IO[str] | None = None, quiet: bool = False
    ) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.done = 0.0
        self.t0 = self.last = time.monotonic()
        self._tqdm: Any = None
        self._closed = quiet or not _enabled
        if self._closed:
            return
        if _is_terminal(stream):
            from tqdm import tqdm

            self._tqdm = tqdm(
                total=total, desc=desc, unit=unit, unit_scale=True, file=stream or sys.stderr, delay=QUIET_S
            )
        self.lines = 0

    @property
    def is_bar(self) -> bool:
        return self._tqdm is not None

    def update(self, n: float) -> None:
        self.done += n
        if self._closed:
            return
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        now = time.monotonic()
        if now - self.last >= INTERVAL_S:
            self.last = now
            pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            self.lines += 1
            _say(f"{self.desc}: {_human(self.done, self.unit)} of {_human(self.total, self.unit)}{pct}", self.stream)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
            return
        took = time.monotonic() - self.t0
        if took >= QUIET_S or self.lines:
            _say(f"{self.desc}: {_human(self.done, self.unit)} in {took:.1f} s", self.stream)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def step(desc: str, stream: IO[str] | None = None) -> Iterator[None]:
    """A step with no natural fraction: a line as it starts, and one with how long it took."""
    if not _enabled:
        yield
        return
    _say(f"{desc} ...", stream)
    t0 = time.monotonic()
    yield
    _say(f"{desc}: done in {time.monotonic() - t0:.1f} s", stream)
