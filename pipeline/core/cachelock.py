"""Build something in a shared cache once, however many processes (on however many hosts) need it at once.

Sweep jobs on a cluster share `cache_dir` over a network filesystem. When several need the same synthetic
checkpoint, the packaged SmolLM2 or the same verify reference before it exists, one builds it and the
others wait for it, then use it. The lock is a file beside the target, `.<name>.lock`, created atomically
by hard-linking a fully written temporary file to that name (`link` fails if the name exists, and is atomic
on NFS as well as locally, where `O_EXCL` was not always), so that a lock file is never seen half-written.
It holds its owner's host, pid, process start time and a random token.

An owner that is gone leaves a stale lock, which the next process takes over: on the owner's own host the
pid tells (a dead process, or the pid reused by a younger one); from another host, the lock's heartbeat
does (the owner touches the file every `HEARTBEAT_S` seconds; one untouched for `STALE_S` is stale). A
takeover is itself serialized by a second lock file, so two waiters cannot both take over and build.

What a builder leaves when killed is only its `.<name>.partial-<pid>` sibling (`pipeline.core.publish`): the
target appears by rename when complete, never before. Whoever holds the lock next removes such leftovers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0  # how often a holder touches its lock
STALE_S = 60.0  # a lock from another host untouched this long belongs to a holder that is gone
TAKEOVER_STALE_S = 30.0  # a takeover guard older than this was left by a process killed while taking over

# what this process built or waited for, in order (run.json's `cache` list, see `pipeline.isolate`)
_EVENTS: list[dict[str, Any]] = []


def events() -> list[dict[str, Any]]:
    """The cache builds this process did or waited for: target, built (bool), waited_s, build_s, took_over."""
    return list(_EVENTS)


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def _me() -> dict[str, Any]:
    proc = psutil.Process()
    return {"host": socket.gethostname(), "pid": proc.pid, "start": proc.create_time(), "token": uuid.uuid4().hex}


def _read(lock: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None  # gone meanwhile, or not ours to understand
    return data if isinstance(data, dict) else None


def _create(path: Path, content: dict[str, Any]) -> bool:
    """Create `path` holding `content`, atomically and only if it does not exist; True if this call made it."""
    tmp = path.with_name(f"{path.name}.{content['host']}.{content['pid']}.{content['token'][:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(content).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        # NFS may report an error for a link that did happen: the temporary file's link count tells
        return os.stat(tmp).st_nlink == 2
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _alive(owner: dict[str, Any]) -> bool:
    """Whether a process on this host is the owner: its pid runs and started when the owner's did."""
    try:
        proc = psutil.Process(int(owner["pid"]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - float(owner["start"])) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError, ValueError):
        return False


def _stale(lock: Path, owner: dict[str, Any] | None, stale_s: float) -> bool:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: try again
    if owner is None:
        return age > stale_s  # unreadable (another program's?) and untouched: nobody keeps it
    if owner.get("host") == socket.gethostname():
        return not _alive(owner)
    return age > stale_s


def _take_over(lock: Path, owner: dict[str, Any] | None, me: dict[str, Any]) -> bool:
    """Remove a stale lock, unless someone else is taking it over or it changed meanwhile."""
    guard = lock.with_name(f"{lock.name}.takeover")
    if not _create(guard, me):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_S:
                guard.unlink()
        return False
    try:
        if _read(lock) == owner:  # the same stale owner, not a fresh lock taken since we looked
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            return True
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            guard.unlink()


def _heartbeat(lock: Path, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        with contextlib.suppress(OSError):
            os.utime(lock)


def _remove_leftovers(target: Path) -> list[str]:
    """Partial builds of `target` by processes that were killed (only the lock's holder may call this)."""
    removed = []
    for p in target.parent.glob(f".{target.name}.partial-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p.name)
    return removed


@contextmanager
def exclusive(
    target: Path, poll_s: float = 0.5, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S
) -> Iterator[dict[str, Any]]:
    """Hold the build lock of `target` (waiting while a live owner holds it); yields facts about the wait."""
    target = Path(target)
    lock = lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = _me()
    t0 = time.perf_counter()
    facts: dict[str, Any] = {"target": str(target), "took_over": None}
    announced = False
    while not _create(lock, me):
        owner = _read(lock)
        if _stale(lock, owner, stale_s):
            if _take_over(lock, owner, me):
                who = f"{owner.get('host')} pid {owner.get('pid')}" if owner else "an unreadable lock"
                facts["took_over"] = who
                log.warning("cache lock %s: its owner (%s) is gone; taking over", lock, who)
            continue
        if not announced and owner is not None:
            log.info("waiting for %s pid %s, which is building %s", owner.get("host"), owner.get("pid"), target)
            announced = True
        time.sleep(poll_s)
    facts["waited_s"] = round(time.perf_counter() - t0, 3)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop, heartbeat_s), name="cachelock-heartbeat", daemon=True)
    beat.start()
    try:
        facts["removed_partials"] = _remove_leftovers(target)
        yield facts
    finally:
        stop.set()
        beat.join()
        if _read(lock) == me:
            lock.unlink()
        else:  # we were thought gone (paused longer than stale_s) and someone took over: theirs now
            log.warning("cache lock %s was taken over while this process held it", lock)


def build_once(target: Path, complete: Callable[[Path], bool], build: Callable[[], Any]) -> bool:
    """Make sure `target` exists: if it is not `complete`, build it under the lock unless another process
    did so while this one waited. Returns whether this process built it; the event goes into `events()`."""
    target = Path(target)
    if complete(target):
        return False
    with exclusive(target) as facts:
        built = not complete(target)
        if built:
            t0 = time.perf_counter()
            build()
            facts["build_s"] = round(time.perf_counter() - t0, 3)
        facts["built"] = built
        _EVENTS.append(facts)
    return built
