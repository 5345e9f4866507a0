"""Our streamer: shards one at a time, tensors one at a time, each quantized on the fly and placed.

Memory stays near the quantized model plus a tensor: each tensor is a view of its memory-mapped shard
(reader.py), read by its conversion (the quantize kernel reads the file's pages, no copy in between) and its
pages dropped from the process once converted; a tensor kept as it is (`quant=none`, the unquantized parts of
a quantized load) stays a view of the page cache, as transformers' loader keeps it. Quantizing asks the
backend (stages/backends/): transformers' own quantize op, or a fast kernel of the backend's where it has one;
a pre-quantized checkpoint is read by the backend's own reader; so the weights are the ones `from_pretrained`
produces. Pickle shards (`model.allow_pickle=true`) are copied out of their mapping tensor by tensor, and may
stay resident up to a shard's size while it is read (reader.py).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    rename_source_key,
    set_param_for_module,
)
from transformers.integrations.accelerate import get_device, offload_weight
from transformers.modeling_utils import LoadStateDictInfo

from pipeline.checkpoints.checkpoint import CheckpointError
from pipeline.core import progress
from pipeline.core.context import LoadContext
from pipeline.core.holdpoint import hold
from pipeline.core.schema import BoundedStreamConfig
from stages.stream.base import StreamStage
from stages.stream.convert import Conversions
from stages.stream.memory import return_freed_memory
from stages.stream.reader import read_tensors


class BoundedStreamer(StreamStage):
    cfg: BoundedStreamConfig
    plan_is_exact = True

    def __init__(self, cfg: BoundedStreamConfig) -> None:
        super().__init__(cfg)
        self.kernel, self.prefetch = cfg.kernel.value, cfg.prefetch

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        model = ctx.require("model", self.kind)
        cfg = ctx.load_config = self.load_config(ctx)
        quantizer = ctx.quantizer
        expected = model.state_dict()
        info = LoadStateDictInfo(
            missing_keys=set(expected),
            unexpected_keys=set(),
            mismatched_keys=set(),
            conversion_errors={},
            error_msgs=[],
            skipped_pp_keys=set(),
        )
        ctx.loading_info = info  # a backend's quantize op marks what it placed itself
        # the model's own key mapping, without the quantizer's deserialize converters (those are ours to do)
        mapping = get_model_conversion_mapping(model, None, None)
        renamings = [w for w in mapping if isinstance(w, WeightRenaming)]
        converters = [w for w in mapping if isinstance(w, WeightConverter)]
        if ctx.pre_quantized and ctx.backend is None:
            method = getattr(ctx.quantization_config, "quant_method", None)
            raise CheckpointError(
                f"{ctx.checkpoint.path}: a checkpoint pre-quantized with {getattr(method, 'value', method)}, which "
                "none of our backends reads: use stages/stream=transformers"
            )
        groups = ctx.backend.prequantized_groups(ctx) if ctx.pre_quantized else None
        prefix = model.base_model_prefix
        conversions = Conversions(ctx.checkpoint.tensor_names, renamings, converters, prefix, expected)
        offload_index: dict = {}

        def place(name: str, value: torch.Tensor) -> None:
            device = get_device(cfg.device_map, name)
            if device == "disk":
                offload_weight(value, name, cfg.disk_offload_folder, offload_index)
                info.missing_keys.discard(name)
            else:
                set_param_for_module(model, name, value, info, quantizer)

        return_freed_memory()
        shard_stats: dict[str, dict] = {}
        size = sum(f.stat().st_size for f in ctx.checkpoint.files)
        bar = progress.Bar(size, "Streaming shards", quiet=not self.cfg.progress)
        t0 = time.perf_counter()
        reader = read_tensors(ctx.checkpoint.files, self.prefetch)
        for shard, key, tensor in reader:
            hold("stream")  # fault tests only: a signal then lands mid-stream, a tensor read
            target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
            if target not in expected and key in expected:  # as transformers' loader: a rename that misses
                target, pattern = key, None
            nbytes = tensor.numel() * tensor.element_size()
            if groups is not None and groups.claims(key):
                for name, value in groups.add(key, tensor).items():
                    place(name, value)
            elif pattern is not None and target in conversions.members:
                fused = conversions.add(key, target, pattern, tensor, model, info, ctx.checkpoint.path)
                if fused:  # the group's tensors were read to fuse them: their pages go
                    reader.release(conversions.members[target])
                for name, value in fused.items():
                    if name not in expected:
                        info.unexpected_keys.add(name)
                    else:
                        self._check_and_place(ctx, shard, key, name, value, expected[name], place)
            elif target not in expected:
                info.unexpected_keys.add(key)
            else:
                self._check_and_place(ctx, shard, key, target, tensor, expected[target], place)
            del tensor
            stats = shard_stats.setdefault(shard.name, {"shard": shard.name, "tensors": 0, "bytes": 0})
            stats["tensors"] += 1
            stats["bytes"] += nbytes
            stats["done_s"] = round(time.perf_counter() - t0, 4)
            bar.update(nbytes)
        bar.close()
        ctx.loading_info, ctx.disk_offload_index = info, (offload_index or None)
        # as transformers' loader: the transforms that matched, reversed by save_pretrained
        model._weight_conversions = [w for w in mapping if w.was_used()]
        per_shard = list(shard_stats.values())
        return {
            "shards": len(per_shard),
            "bytes_read": sum(s["bytes"] for s in per_shard),
            "tensors": sum(s["tensors"] for s in per_shard),
            "per_shard": per_shard,
            "kernel": self._kernel_used(ctx),
            "prefetch": self.prefetch,
            **({"conversions": conversions.facts()} if conversions.converted else {}),
        }

    def _kernel_used(self, ctx: LoadContext) -> str:
        """The `kernel` setting, and where a fast CPU kernel was asked for, which one ran (the backend says)."""
        quantizing = ctx.quantizer is not None and not ctx.quantizer.pre_quantized and self.kernel != "quantizer"
        used = ctx.backend.cpu_kernel() if quantizing and ctx.backend is not None else None
        return f"{self.kernel}: {used}" if used else self.kernel

    def _check_and_place(self, ctx: LoadContext, shard, key: str, target: str, tensor, empty, place) -> None:
        backend = ctx.backend
        transposed = backend is not None and backend.stored_transposed(ctx.model, ctx.quantizer, target)
        _check_shape(shard, key, tensor, empty, transposed=transposed)
        for name, value in self._convert(ctx, target, tensor, empty).items():
            place(name, value)

    def _convert(
        self, ctx: LoadContext, name: str, tensor: torch.Tensor, empty: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Cast, place and (when the quantizer says so) quantize one tensor, as transformers' loader does: the
        tensors to place (none when the backend's op placed them itself)."""
        quantizer, model = ctx.quantizer, ctx.model
        device = get_device(ctx.load_config.device_map, name, valid_torch_device=True)
        if quantizer is not None and not quantizer.pre_quantized and quantizer.param_needs_quantization(model, name):
            value = tensor.to(device=device, dtype=ctx.dtype)
            return ctx.backend.quantize(model, quantizer, name, value, self.kernel, ctx.loading_info.missing_keys)
        dtype = _planned_dtype(ctx.load_config.dtype_plan, name) or (
            empty.dtype if empty.dtype.is_floating_point and tensor.dtype.is_floating_point else None
        )
        return {name: tensor.to(device=device, dtype=dtype)}


def _check_shape(shard, key: str, tensor: torch.Tensor, empty: torch.Tensor, transposed: bool = False) -> None:
    """A tensor that does not fit its parameter means a checkpoint of another model (or size).

    `transposed`: the parameter is a quantized placeholder of a `Conv1D` layer (GPT-2 style), which stores its
    weight as (in, out) while the placeholder holds nn.Linear's (out, in); the quantize op transposes it."""
    shape = tensor.shape[::-1] if transposed and tensor.dim() == 2 else tensor.shape
    if shape != empty.shape or (empty.dtype.is_floating_point and not tensor.dtype.is_floating_point):
        raise CheckpointError(
            f"{shard}: tensor {key!r} is {tuple(tensor.shape)} {tensor.dtype}, the model built from config.json "
            f"expects {tuple(empty.shape)} {empty.dtype}"
            + (" (transposed, as a Conv1D weight is stored)" if transposed else "")
            + "; does config.json belong to these weights?"
        )


def _planned_dtype(dtype_plan: dict, name: str) -> torch.dtype | None:
    """A dtype the model pins for this parameter (`_keep_in_fp32_modules` and the like)."""
    import re

    for pattern, dtype in dtype_plan.items():
        if re.search(pattern, name):
            return dtype
    return None
