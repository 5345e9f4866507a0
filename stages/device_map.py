"""Stage 5: where each module goes, from accelerate's inference over the quantized skeleton.

Sizes are counted as the quantizer will store them (0.5 byte per 4-bit weight, 1 per int8), because the
skeleton already holds the quantized placeholders and transformers' sizing asks the quantizer. Modules
accelerate cannot place within the budgets go to `disk`: without `device_map.offload_folder` that means the
model does not fit, and a load stops here, before a weight is read, saying by how much; a plan records it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import get_max_memory
from transformers.integrations import accelerate as hf_accelerate

from pipeline.core.context import LoadContext
from pipeline.core.placement import compact_names, device_of
from pipeline.core.schema import Policy
from pipeline.core.sizes import gib, parse_size
from stages.base import Stage


class DoesNotFit(ValueError):
    """The model is larger than the devices' budgets and no disk offload was asked for."""


def parse_max_memory(raw: dict[Any, str] | None) -> dict[Any, int] | None:
    """{0: '20GiB', 'cpu': '60GiB'} -> {0: bytes, 'cpu': bytes}; errors name the key and the valid forms."""
    if not raw:
        return None
    parsed = {
        int(k) if str(k).isdigit() else str(k): parse_size(v, f"device_map.max_memory.{k}") for k, v in raw.items()
    }
    try:
        return get_max_memory(parsed)
    except ValueError as err:
        raise ValueError(f"device_map.max_memory={dict(raw)}: {err}") from None


def infer_map(model: Any, requested: Any, max_memory: dict | None, quantizer: Any) -> tuple[dict, dict | None]:
    """The map and the budgets it was fitted to: transformers' `_get_device_map` less its closing
    `validate_environment`, so that our check (with the settings that fix it) runs first."""
    if not isinstance(requested, str):
        return requested, max_memory
    no_split = model._no_split_modules
    if requested == "sequential":
        budget = hf_accelerate.get_max_memory(dict(max_memory) if max_memory else None)
    else:
        budget = hf_accelerate.get_balanced_memory(
            model,
            max_memory=dict(max_memory) if max_memory else None,
            no_split_module_classes=no_split,
            hf_quantizer=quantizer,
            low_zero=requested == "balanced_low_0",
        )
    if quantizer is not None:
        budget = quantizer.adjust_max_memory(budget)
    device_map = hf_accelerate.infer_auto_device_map(
        model,
        max_memory=budget,
        no_split_module_classes=no_split,
        hf_quantizer=quantizer,
        no_placement_params=getattr(model, "_no_placement_params", None),
    )
    return device_map, budget


@contextmanager
def absent_gpus_expected() -> Iterator[None]:
    """A plan for GPUs this machine lacks: accelerate's 'Device N is not available' is expected, not news."""
    log = logging.getLogger("accelerate.utils.modeling")
    drop = logging.Filter()
    drop.filter = lambda record: "is not available" not in record.getMessage()  # type: ignore[method-assign]
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class AccelerateDeviceMap(Stage):
    kind = "device_map"

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        model = ctx.require("model", self.kind)
        cfg = ctx.cfg
        with absent_gpus_expected() if cfg.plan else nullcontext():
            ctx.max_memory = parse_max_memory(cfg.device_map.max_memory)
            device_map, budget = infer_map(model, ctx.requested_device_map, ctx.max_memory, ctx.quantizer)
        ctx.device_map = {k: (v if isinstance(v, (int, str)) else str(v)) for k, v in device_map.items()}
        module_sizes, leaf_sizes = (
            ctx.backend.module_sizes(model, ctx.quantizer)
            if ctx.backend is not None
            else hf_accelerate.compute_module_sizes(model, ctx.quantizer)
        )
        per_device: Counter = Counter()
        for leaf, size in leaf_sizes.items():
            per_device[str(device_of(ctx.device_map, leaf))] += size
        facts: dict[str, Any] = {
            "device_map": ctx.device_map,
            "planned_bytes_per_device": dict(per_device),
            "max_memory": {str(k): v for k, v in (ctx.max_memory or {}).items()} or None,
            "budget_bytes": {str(k): int(v) for k, v in (budget or {}).items()} or None,
        }
        over = [m for m, d in ctx.device_map.items() if d == "disk"]
        if over and not cfg.device_map.offload_folder and cfg.device_map.policy == Policy.explicit:
            raise ValueError(
                f"device_map.map sends {compact_names(over)} to disk, but device_map.offload_folder is not set; "
                "set it to a folder for the offloaded weights (DIR), or map those modules to cpu or a GPU"
            )
        if over and not cfg.device_map.offload_folder:
            facts["does_not_fit"] = shortfall(over, module_sizes, budget, cfg, ctx.backend)
            if not cfg.plan:
                raise DoesNotFit(facts["does_not_fit"]["message"])
            return facts  # a plan records it; what the backend would say of the offload no longer matters
        if ctx.quantizer is not None and ctx.backend is not None:
            where = f"device_map={cfg.device_map.policy.value}"
            ctx.backend.check_device_map(ctx, ctx.device_map, where, explicit=cfg.device_map.policy == Policy.explicit)
            ctx.backend.validate_map(ctx.quantizer, ctx.device_map)
            top_level = [name for name, _ in model.named_children()]
            ctx.backend.check_loaded_map(ctx, ctx.device_map, quantized_modules(model, ctx.quantizer), top_level)
        if over and not cfg.plan:
            Path(cfg.device_map.offload_folder).expanduser().mkdir(parents=True, exist_ok=True)
        return facts


def quantized_modules(model: Any, quantizer: Any) -> list[str]:
    """Modules whose weight the quantizer will quantize."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), torch.nn.Parameter)
        and quantizer.param_needs_quantization(model, f"{name}.weight")
    ]


def shortfall(
    over: list[str], module_sizes: dict[str, int], budget: dict | None, cfg: Any, backend: Any = None
) -> dict[str, Any]:
    """How much of the model accelerate could not place within the budgets, and which modules."""
    over_bytes = int(sum(module_sizes[m] for m in over))
    total = int(module_sizes[""])
    budgets = ", ".join(f"{k} {gib(v)}" for k, v in (budget or {}).items() if k != "disk")
    quantized = ", the quantizer 10% for its buffers" if cfg.quant.quantized else ""
    explicit = backend.offload_hint if backend is not None else ""
    message = (
        f"model={cfg.model.name} quant={cfg.quant.name} does not fit: {gib(over_bytes)} of its {gib(total)} "
        f"({compact_names(over)}) are over the budgets ({budgets}; accelerate keeps room for the largest layer "
        f"on the main device{quantized}). Fix: raise device_map.max_memory by at least {gib(over_bytes)}, "
        f"choose a smaller quant, or offload those modules to disk with device_map.offload_folder=DIR{explicit}"
    )
    return {"over_bytes": over_bytes, "over_modules": over, "message": message}
