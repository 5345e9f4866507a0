"""Which device maps a bitsandbytes load can take, checked before transformers' own, vaguer, check.

bitsandbytes keeps quantized weights either all on the CPU or on accelerators. A map that sends some
modules to `cpu` or `disk` next to others (a GPU, or the disk next to the CPU) needs
`llm_int8_enable_fp32_cpu_offload`, under which transformers leaves the modules an *explicit* map sends to
cpu/disk unquantized. A policy map (auto, balanced, ...) is computed after the skeleton is quantized, so
under it the offloaded modules are still quantized placeholders: on the CPU bitsandbytes runs them, but a
quantized weight written to disk comes back unusable, so that case is refused too.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.schema import QuantConfig

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


def check_quantized_offload(device_map: dict[str, Any], quantizer: Any, quant: QuantConfig, where: str) -> None:
    """Refuse a map bitsandbytes cannot load as asked, naming the settings that would make it loadable."""
    if quantizer is None or set(device_map.values()) <= {"cpu"}:
        return
    off = [m for m, d in device_map.items() if d in OFFLOAD_DEVICES]
    if not off or quant.llm_int8_enable_fp32_cpu_offload:
        return
    places = "/".join(sorted({str(device_map[m]) for m in off}))
    elsewhere = sorted({str(v) for v in device_map.values()} - {str(device_map[m]) for m in off})
    raise ValueError(
        f"{where} sends {compact_names(off)} to {places}"
        + (f" next to modules on {', '.join(elsewhere)}" if elsewhere else "")
        + f", with quant={quant.name}: bitsandbytes keeps quantized weights all on the CPU or all on "
        "accelerators. Either give the devices room (device_map.max_memory), or set "
        "quant.llm_int8_enable_fp32_cpu_offload=true with an explicit map (device_map=explicit "
        "device_map.map=...): the modules it sends to cpu/disk then stay unquantized"
    )


def check_no_quantized_on_disk(device_map: dict[str, Any], quantized: list[str], top_level: list[str]) -> None:
    """Refuse quantized modules mapped to disk (a policy map under llm_int8_enable_fp32_cpu_offload)."""
    holding = [
        k
        for k, d in device_map.items()
        if d == "disk" and any(not k or q == k or q.startswith(k + ".") for q in quantized)
    ]
    if holding:
        raise ValueError(
            f"the device map sends quantized modules ({compact_names(holding)}) to disk, where bitsandbytes' "
            "weights cannot be offloaded. Under quant.llm_int8_enable_fp32_cpu_offload=true, only modules an "
            "explicit map sends to cpu/disk stay unquantized: use this map as an explicit one, "
            f"{as_override(device_map, top_level)}, or give the devices room (device_map.max_memory)"
        )


def device_of(device_map: dict[str, Any], name: str) -> Any:
    """The device of a module: its own entry or its closest ancestor's."""
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            return None
        name = name.rpartition(".")[0]
