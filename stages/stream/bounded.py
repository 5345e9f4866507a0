"""Our streamer: shards one at a time, tensors one at a time, each quantized on the fly and placed.

Memory stays near the quantized model plus a tensor or two: tensors are read with `pread` (safetensors'
`pread` backend) instead of through a memory map, so no page of a shard stays resident in the process
once its tensor is quantized, and the full-precision copy is dropped before the next tensor is read.
The quantize and deserialize steps are transformers' own conversion ops, so the weights are the ones
`from_pretrained` produces.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    rename_source_key,
    set_param_for_module,
)
from transformers.integrations.accelerate import get_device, offload_weight
from transformers.modeling_utils import LoadStateDictInfo

from pipeline.checkpoint import CheckpointError
from pipeline.context import LoadContext
from stages.stream.base import StreamStage


class BoundedStreamer(StreamStage):
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
        # the model's own key mapping, without the quantizer's deserialize converters (those are ours to do)
        mapping = get_model_conversion_mapping(model, None, None)
        renamings = [w for w in mapping if isinstance(w, WeightRenaming)]
        converters = [w for w in mapping if isinstance(w, WeightConverter)]
        groups = _PrequantizedGroups(ctx) if ctx.pre_quantized else None
        offload_index: dict = {}

        def place(name: str, value: torch.Tensor) -> None:
            device = get_device(cfg.device_map, name)
            if device == "disk":
                offload_weight(value, name, cfg.disk_offload_folder, offload_index)
                info.missing_keys.discard(name)
            else:
                set_param_for_module(model, name, value, info, quantizer)

        shard_stats, total_bytes, tensors = [], 0, 0
        size = sum(f.stat().st_size for f in ctx.checkpoint.files)
        bar = tqdm(total=size, unit="B", unit_scale=True, desc="Streaming shards", disable=not self.progress)
        for shard in ctx.checkpoint.files:
            t0, shard_bytes, shard_tensors = time.perf_counter(), 0, 0
            with safe_open(shard, framework="pt", device="cpu", backend="pread") as f:
                for key in f.keys():
                    target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
                    if pattern is not None:
                        raise CheckpointError(
                            f"{shard.name}: tensor {key!r} needs a weight conversion ({pattern}) that the bounded "
                            "streamer does not do; use stages/stream=transformers for this architecture"
                        )
                    tensor = f.get_tensor(key)
                    shard_bytes += tensor.numel() * tensor.element_size()
                    shard_tensors += 1
                    bar.update(tensor.numel() * tensor.element_size())
                    if groups is not None and groups.claims(key):
                        for name, value in groups.add(key, tensor).items():
                            place(name, value)
                    elif target not in expected:
                        info.unexpected_keys.add(key)
                    else:
                        place(target, self._convert(ctx, target, tensor, expected[target]))
                    del tensor
            total_bytes += shard_bytes
            tensors += shard_tensors
            shard_stats.append(
                {
                    "shard": shard.name,
                    "tensors": shard_tensors,
                    "bytes": shard_bytes,
                    "wall_s": round(time.perf_counter() - t0, 4),
                }
            )
        bar.close()
        if groups is not None:
            groups.check_complete()
        ctx.loading_info, ctx.disk_offload_index = info, (offload_index or None)
        return {
            "shards": len(shard_stats),
            "bytes_read": total_bytes,
            "tensors": tensors,
            "per_shard": shard_stats,
        }

    @staticmethod
    def _convert(ctx: LoadContext, name: str, tensor: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        """Cast, place and (when the quantizer says so) quantize one tensor, as transformers' loader does."""
        quantizer, model = ctx.quantizer, ctx.model
        device = get_device(ctx.load_config.device_map, name, valid_torch_device=True)
        if quantizer is not None and not quantizer.pre_quantized and quantizer.param_needs_quantization(model, name):
            value = tensor.to(device=device, dtype=ctx.dtype)
            return quantizer.get_quantize_ops().convert({name: value}, model=model, full_layer_name=name)[name]
        dtype = _planned_dtype(ctx.load_config.dtype_plan, name) or (
            empty.dtype if empty.dtype.is_floating_point and tensor.dtype.is_floating_point else None
        )
        return tensor.to(device=device, dtype=dtype)


def _planned_dtype(dtype_plan: dict, name: str) -> torch.dtype | None:
    """A dtype the model pins for this parameter (`_keep_in_fp32_modules` and the like)."""
    import re

    for pattern, dtype in dtype_plan.items():
        if re.search(pattern, name):
            return dtype
    return None


class _PrequantizedGroups:
    """Collects a pre-quantized weight and its companion tensors (absmax, quant map, SCB, ...) until the
    module's set is complete, then rebuilds the quantized parameter with the quantizer's deserialize op."""

    def __init__(self, ctx: LoadContext) -> None:
        self.ctx = ctx
        self.suffixes = sorted(
            (s for names in ctx.quantizer.serialized_names.values() for s in names), key=len, reverse=True
        )
        keys: set[str] = set()
        for shard in ctx.checkpoint.files:
            with safe_open(shard, framework="pt", device="cpu", backend="pread") as f:
                keys.update(f.keys())
        self.expected: dict[str, set[str]] = {}
        for key in keys:
            split = self._split(key)
            if split:
                self.expected.setdefault(split[0], set()).add(split[1])
        # a module is quantized in the checkpoint only if some companion beside its weight is stored
        self.expected = {m: s for m, s in self.expected.items() if s - {"weight"}}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def _split(self, key: str) -> tuple[str, str] | None:
        for s in self.suffixes:
            if key.endswith("." + s):
                return key[: -len(s) - 1], s
        return None

    def claims(self, key: str) -> bool:
        split = self._split(key)
        return split is not None and split[0] in self.expected

    def add(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        module, suffix = self._split(key)
        name = f"{module}.weight"
        device = get_device(self.ctx.load_config.device_map, name, valid_torch_device=True)
        group = self.pending.setdefault(module, {})
        group[suffix] = tensor.to(device)
        if set(group) != self.expected[module]:
            return {}
        del self.pending[module]
        op = self.ctx.quantizer.get_load_operations()["deserialize"](self.ctx.quantizer)
        out = op.convert(group, model=self.ctx.model, full_layer_name=name)
        return {f"{module}.{k}": v for k, v in out.items()}

    def check_complete(self) -> None:
        if self.pending:
            module, have = next(iter(self.pending.items()))
            missing = sorted(self.expected[module] - set(have))
            raise CheckpointError(
                f"pre-quantized checkpoint: {len(self.pending)} module(s) lack quantization state, e.g. "
                f"{module} has no {', '.join(missing)}"
            )
