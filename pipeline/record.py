"""Run records: `stages.jsonl` grows a line as each stage ends; `run.json` is written once, atomically.

A crash or a kill therefore leaves every finished stage on disk and never a half-written `run.json`.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "value"):  # enums
        return obj.value
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
