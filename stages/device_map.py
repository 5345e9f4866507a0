"""Stage 5: where each module goes, from accelerate's inference over the quantized skeleton.

Sizes are counted as the quantizer will store them (0.5 byte per 4-bit weight, 1 per int8), because the
skeleton already holds the quantized placeholders and transformers' sizing asks the quantizer.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from accelerate.utils import get_max_memory
from transformers.integrations.accelerate import _get_device_map, compute_module_sizes

from pipeline.context import LoadContext
from stages.base import Stage


def parse_max_memory(raw: dict[str, str] | None) -> dict[Any, int] | None:
    """{'0': '20GiB', 'cpu': '60GiB'} -> {0: bytes, 'cpu': bytes}; errors name the key and the valid forms."""
    if not raw:
        return None
    parsed: dict[Any, Any] = {}
    for key, size in raw.items():
        device = int(key) if str(key).isdigit() else str(key)
        if not isinstance(device, int) and device not in ("cpu", "disk", "mps") and not device.startswith("cuda"):
            raise ValueError(f"device_map.max_memory: unknown device {key!r}; use a GPU index (0, 1, ...), cpu or disk")
        parsed[device] = size
    try:
        return get_max_memory(parsed)
    except ValueError as err:
        raise ValueError(f"device_map.max_memory={dict(raw)}: {err}") from None


class AccelerateDeviceMap(Stage):
    kind = "device_map"

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        model = ctx.require("model", self.kind)
        ctx.max_memory = parse_max_memory(ctx.cfg.device_map.max_memory)
        device_map = _get_device_map(model, ctx.requested_device_map, ctx.max_memory, ctx.quantizer)
        ctx.device_map = {k: (v if isinstance(v, (int, str)) else str(v)) for k, v in device_map.items()}
        _, leaf_sizes = compute_module_sizes(model, ctx.quantizer)
        per_device: Counter = Counter()
        for leaf, size in leaf_sizes.items():
            per_device[str(_device_of(ctx.device_map, leaf))] += size
        return {
            "device_map": ctx.device_map,
            "planned_bytes_per_device": dict(per_device),
            "max_memory": {str(k): v for k, v in (ctx.max_memory or {}).items()} or None,
        }


def _device_of(device_map: dict[str, Any], name: str) -> Any:
    """The device of a module: its own entry or its closest ancestor's."""
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            return "?"
        name = name.rpartition(".")[0]
