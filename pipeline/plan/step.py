"""`plan=true`: what a load would take, from the meta skeleton alone, without reading a weight.

The runner runs the stages up to `device_map` (config merge, quantizer, env check, the quantized skeleton on
the meta device, the device map) and then this step, which adds up what each module will hold as the
quantizer stores it, replays the bounded streamer on those sizes (plan_stream.py) to predict the load's peak
RSS, and measures the fast CPU kernels' own cost where the load will use them (plan_probe.py). Its facts go
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
from stages.stream.plan import read_order, replay
from stages.stream.probe import KernelCost, probe

PLAN_KINDS = STAGE_KINDS[: STAGE_KINDS.index("device_map") + 1]
GPU_SIZES_GIB = (24, 40, 80)
# the run record's top-level `plan`: the figures a report across runs needs
SUMMARY = (
    "footprint_bytes",
    "quant_state_bytes",
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

    `stream` is the run's `stages.stream` config: the peak is modeled on the bounded streamer with its
    `prefetch` and `kernel`; another streamer is planned as if it were that one, and the facts say so."""

    kind = "plan"

    def __init__(self, stream: Any) -> None:
        self.target = str(stream.get("_target_", ""))
        self.prefetch = int(stream.get("prefetch", 2))
        kernel = stream.get("kernel", "auto")
        self.kernel = str(getattr(kernel, "value", kernel))

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        from stages.stream.memory import return_freed_memory  # the streamer's package: imported when needed

        base = psutil.Process().memory_info().rss  # where the stream stage would start
        return_freed_memory()  # as the streamer does first: the probe's allocations then behave like the load's
        model, quantizer = ctx.require("model", self.kind), ctx.quantizer
        module_sizes, leaf_sizes = compute_module_sizes(model, quantizer)
        over = ctx.facts.get("device_map", {}).get("does_not_fit")
        # a map that does not fit sends what is over the budgets to disk: plan the load that would fit, with
        # those modules on the CPU, as a larger budget would place them
        mapped = {m: "cpu" if d == "disk" else d for m, d in ctx.device_map.items()} if over else ctx.device_map
        kernels = self._probe_kernels(ctx, mapped)
        reads = read_order(ctx)
        load = replay(ctx, reads, base, self.prefetch, kernels, device_map=mapped)
        one_gpu = replay(ctx, reads, base, self.prefetch, {}, device_map={"": 0})
        per_device: Counter = Counter(load.quant_state)
        for leaf, size in leaf_sizes.items():  # buffers too (rotary tables): they are in no checkpoint
            per_device[str(device_of(mapped, leaf))] += int(size)
        single = int(one_gpu.peak["0"])
        unquantized = unquantized_modules(model, quantizer, leaf_sizes)
        return {
            "model": ctx.cfg.model.name,
            "quant": ctx.cfg.quant.name,
            "dtype": str(ctx.dtype).removeprefix("torch."),
            "architecture_from": ctx.facts.get("config_merge", {}).get("architecture_from"),
            "footprint_bytes": int(module_sizes[""]),
            "quant_state_bytes": int(sum(load.quant_state.values())),
            "per_device_bytes": {d: int(b) for d, b in per_device.items() if b},
            "device_map": ctx.device_map,
            "largest_layer": largest_layer(model, module_sizes),
            "unquantized": unquantized,
            "unquantized_bytes": unquantized["bytes"],
            "base_rss_bytes": int(base),
            "predicted_peak_bytes": int(load.peak["cpu"]),
            "predicted_peak_bytes_per_device": {d: int(v) for d, v in load.peak.items()},
            "peak_at_tensor": load.peak_at,
            "largest_transient": {"tensor": load.largest_transient[0], "bytes": int(load.largest_transient[1])},
            "single_gpu_peak_bytes": single,
            "fits_single_gpu_gib": {str(g): single <= g * 2**30 for g in GPU_SIZES_GIB},
            "fits": over is None,
            "over_bytes": over["over_bytes"] if over else 0,
            "does_not_fit": over,
            "streamer": self.target,
            "peak_model": "bounded streamer"
            + ("" if self.target.endswith("BoundedStreamer") else " (not the one set)"),
            "prefetch": self.prefetch,
            "kernels": {k: c.to_dict() for k, c in kernels.items()},
            "tensors": len(reads),
        }

    def _probe_kernels(self, ctx: LoadContext, device_map: dict[str, Any]) -> dict[str, KernelCost]:
        """Measure the fast CPU kernel the load will run, if it runs one: a CPU-placed weight to quantize,
        a bounded streamer with kernel auto or fast."""
        if ctx.quantizer is None or ctx.quantizer.pre_quantized or self.kernel == "bnb":
            return {}
        for name, param in ctx.model.named_parameters():
            on_cpu = str(device_of(device_map, name.rpartition(".")[0])) == "cpu"
            if not on_cpu or not ctx.quantizer.param_needs_quantization(ctx.model, name):
                continue
            if hasattr(param, "blocksize"):
                return {"4bit": probe("4bit", ctx.dtype, param.blocksize, param.quant_type)}
            return {"int8": probe("int8", ctx.dtype)}
        return {}


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
