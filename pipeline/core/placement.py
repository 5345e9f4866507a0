"""Device-map helpers every backend's placement rules use: names of offloaded modules, a map as an override,
the device of a module. The rules themselves (what a backend can offload) live with each backend
(stages/backends/)."""

from __future__ import annotations

from typing import Any

OFFLOAD_DEVICES = ("cpu", "disk")


def compact_names(names: list[str], limit: int = 6) -> str:
    """'model.layers.3', 'model.layers.4', ... -> 'model.layers.3-9, lm_head' (runs of numbered siblings)."""
    groups: list[list] = []
    for name in names:
        stem, _, last = name.rpartition(".")
        if last.isdigit() and groups and groups[-1][0] == stem and groups[-1][2] == int(last) - 1:
            groups[-1][2] = int(last)
            continue
        groups.append([stem, int(last), int(last)] if last.isdigit() else [name or "the whole model", None, None])
    parts = [g[0] if g[1] is None else f"{g[0]}.{g[1]}" + (f"-{g[2]}" if g[2] != g[1] else "") for g in groups]
    return ", ".join(parts[:limit]) + (f", ... ({len(parts) - limit} more)" if len(parts) > limit else "")


def as_override(device_map: dict[str, Any], top_level: list[str]) -> str:
    """The map as a command-line override that reproduces it as an explicit map; the whole-model key '' (which
    Hydra's override grammar cannot write) becomes the model's top-level modules, `top_level`."""
    entries = {n: device_map[""] for n in top_level} if "" in device_map else {}
    entries |= {k: v for k, v in device_map.items() if k}
    body = ", ".join(f"{k}: {v}" for k, v in entries.items())
    return f"device_map=explicit device_map.map='{{{body}}}'"


def device_of(device_map: dict[str, Any], name: str) -> Any:
    """The device of a module: its own entry or its closest ancestor's; a module no entry covers (an explicit
    map may leave out a module with no weights, such as `model.rotary_emb`) goes where transformers puts it,
    the CPU (`expand_device_map`)."""
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            return "cpu"
        name = name.rpartition(".")[0]
