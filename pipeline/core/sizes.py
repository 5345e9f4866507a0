"""Sizes: the one parser of size strings ('500MB', '24GiB', bytes) and the one way sizes are printed."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int, key: str) -> int:
    """'10GB' -> 10**9 bytes, '24GiB' -> 24 * 2**30, 1000 -> 1000; the error names the key and the forms."""
    match = _SIZE.match(str(value).strip()) if not isinstance(value, bool) else None
    if match is None:
        raise ValueError(f"{key}={value!r} is not a size; use bytes or a number with a unit: 500MB, 24GB, 24GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def gib(n: float) -> str:
    """Bytes as GiB, or MiB below a GiB."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"
