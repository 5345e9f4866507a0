"""`plan=true`: what a load would take, from the meta skeleton alone, without reading a weight.

The runner runs the stages up to `device_map` (config merge, quantizer, env check, the quantized skeleton on
the meta device, the device map) and then this step, which adds up what each module will hold as the
quantizer stores it, and asks the run's stream stage what it would hold (`StreamStage.plan`: the streamer's
memory model, stages/stream/plan.py, which measures the fast CPU kernels' own cost where the load uses them,
stages/stream/probe.py) to predict the load's peak RSS. Its facts go
into the run record (stage `plan`, and a top-level `plan` summary) under run status `planned`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import psutil
from accelerate.utils.modeling import get_max_layer_size
from transformers.integrations.accelerate import compute_module_sizes

from pipeline.core.context import LoadContext
from pipeline.core.placement import compact_names, device_of
from pipeline.core.schema import STAGE_KINDS
from stages.stream.base import StreamStage

PLAN_KINDS = STAGE_KINDS[: STAGE_KINDS.index("device_map") + 1]
GPU_SIZES_GIB = (24, 40, 80)
# the run record's top-level `plan`: the figures a report across runs needs
SUMMARY = (
    "footprint_bytes",
    "quant_state_bytes",
    "held_bytes",
    "held_bytes_per_device",
    "predicted_peak_bytes",
    "per_device_bytes",
    "predicted_peak_bytes_per_device",
    "single_gpu_peak_bytes",
    "fits_single_gpu_gib",
    "fits",
    "over_bytes",
    "largest_layer",
    "unquantized_bytes",
)


def summary(facts: dict[str, Any]) -> dict[str, Any]:
    return {k: facts.get(k) for k in SUMMARY}


class Plan:
    """The planning step: footprint, per-device bytes, unquantized modules, largest layer, predicted peak.

    The peak comes from the run's own stream stage (`StreamStage.plan`), with that stage's settings: the
    memory model lives beside the streamer it models, so the two cannot drift."""

    kind = "plan"

    def __init__(self, stream: StreamStage) -> None:
        self.stream = stream

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        base = psutil.Process().memory_info().rss  # where the stream stage would start
        model, quantizer = ctx.require("model", self.kind), ctx.quantizer
        over = ctx.facts.get("device_map", {}).get("does_not_fit")
        # a map that does not fit sends what is over the budgets to disk: plan the load that would fit, with
        # those modules on the CPU, as a larger budget would place them
        mapped = {m: "cpu" if d == "disk" else d for m, d in ctx.device_map.items()} if over else ctx.device_map
        stream = self.stream.plan(ctx, base, mapped)
        # the backend's sizes: what get_memory_footprint will count once loaded (stages/backends/)
        module_sizes, leaf_sizes = (
            ctx.backend.module_sizes(model, quantizer) if ctx.backend is not None else compute_module_sizes(model, None)
        )
        load = stream.load
        per_device: Counter = Counter(load.quant_state)
        for leaf, size in leaf_sizes.items():  # buffers too (rotary tables): they are in no checkpoint
            per_device[str(device_of(mapped, leaf))] += int(size)
        single = int(stream.one_gpu.peak["0"])
        unquantized = unquantized_modules(model, quantizer, leaf_sizes)
        target = type(self.stream).__module__ + "." + type(self.stream).__name__
        return {
            "model": ctx.cfg.model.name,
            "quant": ctx.cfg.quant.name,
            "dtype": str(ctx.dtype).removeprefix("torch."),
            "architecture_from": ctx.facts.get("config_merge", {}).get("architecture_from"),
            "footprint_bytes": int(module_sizes[""]),
            "quant_state_bytes": int(sum(load.quant_state.values())),
            "per_device_bytes": {d: int(b) for d, b in per_device.items() if b},
            # what the loaded model really holds (every tensor's storage: quantized data and its state), from the
            # backend's own size model; the footprint above counts torchao's and quanto's weights at their
            # logical dtype and leaves bitsandbytes' and HQQ's state out
            "held_bytes": int(sum(load.held.values())),
            "held_bytes_per_device": {d: int(b) for d, b in load.held.items() if b},
            "device_map": ctx.device_map,
            "largest_layer": largest_layer(model, module_sizes),
            "unquantized": unquantized,
            "unquantized_bytes": unquantized["bytes"],
            "base_rss_bytes": int(base),
            "predicted_peak_bytes": int(load.peak["cpu"]),
            # weights left as views of the checkpoint's pages (stages/stream/reader.py): in the footprint, not in
            # the RSS until read
            "mapped_bytes": int(sum(load.mapped.values())),
            "predicted_peak_bytes_per_device": {d: int(v) for d, v in load.peak.items()},
            "peak_at_tensor": load.peak_at,
            "largest_transient": {"tensor": load.largest_transient[0], "bytes": int(load.largest_transient[1])},
            "single_gpu_peak_bytes": single,
            "fits_single_gpu_gib": {str(g): single <= g * 2**30 for g in GPU_SIZES_GIB},
            "fits": over is None,
            "over_bytes": over["over_bytes"] if over else 0,
            "does_not_fit": over,
            "streamer": target,
            "peak_model": "its own" if self.stream.plan_is_exact else "the bounded streamer's (an estimate)",
            "prefetch": self.stream.prefetch,
            "kernels": {k: c.to_dict() for k, c in stream.kernels.items()},
            "tensors": stream.tensors,
        }


def largest_layer(model: Any, module_sizes: dict[str, int]) -> dict[str, Any]:
    """The largest unit accelerate places whole (a decoder layer, the embeddings, lm_head): the room it keeps
    free on the main device, and a lower bound on any single device's budget."""
    top = (
        list(model.named_parameters(recurse=False))
        + list(model.named_children())
        + list(model.named_buffers(recurse=False))
    )
    size, names = get_max_layer_size(top, module_sizes, model._no_split_modules)
    return {"names": compact_names(names), "count": len(names), "bytes": int(size)}


def unquantized_modules(model: Any, quantizer: Any, leaf_sizes: dict[str, int]) -> dict[str, Any]:
    """Modules that keep their weights in the run's dtype: embeddings, lm_head, modules the quantizer skips
    (named one by one) and the small ones, norms mostly (counted together)."""
    named: dict[str, int] = {}
    others = {"count": 0, "bytes": 0, "types": set()}
    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params or name not in leaf_sizes:
            continue
        if quantizer is not None and any(quantizer.param_needs_quantization(model, f"{name}.{p}") for p, _ in params):
            continue
        if any(t.dim() >= 2 for _, t in params):
            named[name] = int(leaf_sizes[name])
        else:
            others["count"] += 1
            others["bytes"] += int(leaf_sizes[name])
            others["types"].add(type(module).__name__)
    others["types"] = sorted(others["types"])
    if quantizer is None:  # nothing is quantized: list the sum, not every linear layer
        total = sum(named.values()) + others["bytes"]
        return {
            "bytes": total,
            "modules": {"(all: quant=none)": total},
            "others": {"count": 0, "bytes": 0, "types": []},
        }
    skipped = sorted(getattr(quantizer, "modules_to_not_convert", None) or [])
    return {"bytes": sum(named.values()) + others["bytes"], "modules": named, "others": others, "skipped": skipped}
