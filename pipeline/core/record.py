"""Run records: `stages.jsonl` grows a line as each stage ends; `run.json` is written once, atomically.

A crash or a kill therefore leaves every finished stage on disk and never a half-written `run.json`. When
a record cannot be written (disk full, out of memory), both writers raise RecordError, naming the file and
the OS error, and leave neither a partial line nor a temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import socket
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[2]  # this repository (for the git state in records)

# A run folder's date and time, as conf/config.yaml's hydra.run.dir writes them (`${now:...}`, Hydra's
# `datetime.now().strftime`): every run folder, the CLI's, the Python API's and a replay's, sorts one way.
DATE_FORMAT, TIME_FORMAT = "%Y-%m-%d", "%H-%M-%S-%f"


def run_folder(root: Path, suffix: str = "", now: datetime | None = None) -> Path:
    """`root/<date>/<time><suffix>`, the layout of hydra.run.dir (e.g. `runs/2026-11-30/05-22-11-123456_x`)."""
    now = now or datetime.now()
    return Path(root) / now.strftime(DATE_FORMAT) / (now.strftime(TIME_FORMAT) + suffix)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "value"):  # enums
        return obj.value
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


class RecordError(RuntimeError):
    """A run record could not be written: the disk is full, memory ran out, the folder cannot be written."""

    def __init__(self, path: Path, error: BaseException, note: str = "") -> None:
        self.path, self.error = Path(path), error
        super().__init__(f"cannot write the run record {path}: {_reason(error)}{f' ({note})' if note else ''}")


def _reason(error: BaseException) -> str:
    if isinstance(error, MemoryError):
        return "out of memory (MemoryError); free memory and run again"
    if not isinstance(error, OSError) or error.errno is None:
        return f"{type(error).__name__}: {error}"
    hint = "free space or" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder or"
    return f"[Errno {error.errno}] {error.strerror}; {hint} choose another hydra.run.dir"


def _serialize(data: Any, indent: int | None = None) -> bytes:
    return (json.dumps(data, indent=indent, default=_json_default) + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target: the target is either
    the old file or the whole new one. Raises RecordError, leaving no temporary file, if it cannot."""
    tmp = None
    try:
        text = _serialize(data, indent=2)  # before any file exists: running out of memory here leaves nothing
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the record from others sharing a runs/ folder
        try:
            _write_all(fd, text)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except (OSError, MemoryError) as err:
        _discard(tmp)
        raise RecordError(path, err) from err
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def start_jsonl(path: Path) -> None:
    """Empty `path` for a new run: lines a run left in a folder used before are not this run's stages."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    except OSError as err:
        raise RecordError(path, err) from err


def append_jsonl(path: Path, entry: dict) -> None:
    """Append one line and fsync. Raises RecordError if it cannot, after cutting off any part of the line it
    wrote, so that every line in the file stays whole JSON."""
    try:
        line = _serialize(entry)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.fstat(fd).st_size
            try:
                _write_all(fd, line)
            except OSError:
                with contextlib.suppress(OSError):  # a device (/dev/full) cannot be cut; nothing reached it anyway
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)
    except (OSError, MemoryError) as err:
        raise RecordError(path, err) from err


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """The commit of the config repo and whether it had uncommitted changes (None outside a git checkout)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def host() -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def format_table(stages: list[dict], total: dict) -> str:
    """The per-stage table printed at the end of a run."""
    has_gpu = any(s["metrics"].get("cuda_max_allocated_mb") for s in stages)
    head = ["stage", "implementation", "status", "wall s", "cpu s", "peak RSS MB", "end RSS MB"]
    if has_gpu:
        head.append("GPU peak MB")
    rows = []
    for s in stages:
        m = s["metrics"]
        row = [
            s["stage"],
            s["target"].rsplit(".", 1)[-1],
            s["status"],
            f"{m['wall_s']:.3f}",
            f"{m['cpu_s']:.3f}",
            f"{m['rss_peak_mb']:.0f}",
            f"{m['rss_end_mb']:.0f}",
        ]
        if has_gpu:
            row.append(f"{max(m['cuda_max_allocated_mb'].values(), default=0):.0f}")
        rows.append(row)
    t = total
    rows.append(
        [
            "total",
            "",
            "",
            f"{t['wall_s']:.3f}",
            f"{t['cpu_s']:.3f}",
            f"{t['rss_peak_mb']:.0f}",
            f"{t['rss_end_mb']:.0f}",
        ]
        + ([""] if has_gpu else [])
    )
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list) -> str:
        return "  ".join(
            str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *[line(r) for r in rows[:-1]], sep, line(rows[-1])])
