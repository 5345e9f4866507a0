"""The plan as a person reads it: sizes in GiB/MiB, the device map folded into runs of layers."""

from __future__ import annotations

import re
from typing import Any

from pipeline.core.placement import compact_names
from pipeline.core.sizes import gib


def map_by_device(device_map: dict[str, Any]) -> dict[str, str]:
    """{module: device} -> {device: 'model.embed_tokens, model.layers.0-39'}."""
    by: dict[str, list[str]] = {}
    for module, device in device_map.items():
        by.setdefault(str(device), []).append(module or "(whole model)")
    return {d: compact_names(names, limit=12) for d, names in by.items()}


def _repeated(modules: dict[str, int]) -> list[str]:
    """{'model.layers.0.mlp.experts': n, ..., 'model.layers.31.mlp.experts': n} -> ['model.layers.0-31.mlp.experts
    2.62 GiB each']: one entry per name that differs only in its layer number, at one size (MoE experts)."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name, size in modules.items():
        groups.setdefault((re.sub(r"\.\d+\.", ".#.", name, count=1), size), []).append(name)
    out = []
    for (pattern, size), names in groups.items():
        if len(names) == 1:
            out.append(f"{names[0]} {gib(size)}")
            continue
        numbers = [int(re.search(r"\.(\d+)\.", n).group(1)) for n in names]
        span = (
            f"{min(numbers)}-{max(numbers)}" if sorted(numbers) == list(range(min(numbers), max(numbers) + 1)) else None
        )
        label = pattern.replace("#", span) if span else compact_names(names)
        out.append(f"{label} {gib(size)} each")
    return out


def describe(f: dict[str, Any]) -> str:
    """The plan's facts as the lines printed under the stage table."""
    un = f["unquantized"]
    named = ", ".join(_repeated(un["modules"]))
    others = un["others"]
    if others["count"]:
        named += f"{', ' if named else ''}{others['count']} x {'/'.join(others['types'])} {gib(others['bytes'])}"
    layer = f["largest_layer"]
    lines = [
        f"plan: {f['model']} quant={f['quant']} dtype={f['dtype']}, architecture from {f['architecture_from']}; "
        "no weight read",
        f"  footprint           {gib(f['footprint_bytes'])} (as get_memory_footprint() will count it), plus "
        f"{gib(f['quant_state_bytes'])} of quantization state (absmax, scales) it does not count",
        "  per device          " + ", ".join(f"{d} {gib(b)}" for d, b in f["per_device_bytes"].items()),
        f"  holds in memory     {gib(f['held_bytes'])} (every tensor's real storage: quantized data and its state), "
        + ", ".join(f"{d} {gib(b)}" for d, b in f["held_bytes_per_device"].items()),
        f"  largest layer       {layer['names']} ({gib(layer['bytes'])}{' each' if layer['count'] > 1 else ''})",
        f"  unquantized         {gib(un['bytes'])}: {named or 'none'}",
    ]
    for device, modules in map_by_device(f["device_map"]).items():
        lines.append(f"  device map  {device:<7} {modules}")
    t = f["largest_transient"]
    lines.append(
        f"  predicted peak      {gib(f['predicted_peak_bytes'])} RSS for the load, at {f['peak_at_tensor']} "
        f"({gib(f['base_rss_bytes'])} before it; the largest tensor in flight, {t['tensor']}, takes {gib(t['bytes'])} "
        f"read and converted; {f['prefetch']} + 1 read ahead)"
    )
    for device, peak in f["predicted_peak_bytes_per_device"].items():
        if device != "cpu":
            lines.append(
                f"  predicted peak  {device:<3} {gib(peak)} on GPU {device} (weights; CUDA context, activations extra)"
            )
    if f.get("does_not_fit"):
        lines.append(f"  DOES NOT FIT        {f['does_not_fit']['message']}")
        lines.append("                      (footprint per device and peak above: with the modules over on the CPU)")
    gpus = f["fits_single_gpu_gib"]
    lines.append(
        f"  one GPU (peak {gib(f['single_gpu_peak_bytes'])})  "
        + "  ".join(f"{size} GiB: {'fits' if ok else 'no'}" for size, ok in gpus.items())
    )
    return "\n".join(lines)
