"""Pre-quantized torchao checkpoints (written by transformers' `save_pretrained`): each quantized weight is
stored flattened (`<layer>._weight_qdata`, `_weight_scale`, ...) with its tensor subclass described in the
shard's metadata. Checked against the model before any weight is read, gathered per layer while streaming,
and rebuilt with the quantizer's own deserialize op (torchao's `unflatten_tensor_state_dict`), as
transformers' loader does.

The metadata is untrusted: torchao looks its classes up in a closed table, but resolves a `torch.dtype`
node with `getattr(torch, name)`; every such name is checked against the dtypes torchao writes first.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers.integrations.accelerate import get_device

from pipeline.checkpoints.checkpoint import CheckpointError
from pipeline.core.context import LoadContext

DTYPES = ("float16", "bfloat16", "float32", "int8", "uint8", "int32", "float8_e4m3fn", "float8_e5m2")


def _dtype_names(node: Any) -> list[str]:
    """Every name a `{"_type": "torch.dtype", "_data": NAME}` node below `node` gives."""
    if isinstance(node, dict):
        if node.get("_type") == "torch.dtype":
            return [str(node.get("_data"))]
        return [n for v in node.values() for n in _dtype_names(v)]
    if isinstance(node, list):
        return [n for v in node for n in _dtype_names(v)]
    return []


def read_metadata(ctx: LoadContext) -> dict[str, Any]:
    """The shards' metadata, set on the quantizer (its deserialize op reads it), every dtype name checked; returns
    the parsed entries."""
    from safetensors import safe_open

    metadata: dict[str, str] = {}
    for f in ctx.checkpoint.files:
        with safe_open(str(f), framework="pt") as shard:
            metadata.update(shard.metadata() or {})
    parsed = {}
    for key, value in metadata.items():
        try:
            parsed[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            continue
        bad = [n for n in _dtype_names(parsed[key]) if n not in DTYPES]
        if bad:
            raise CheckpointError(
                f"{ctx.checkpoint.path}: safetensors metadata {key!r} names dtype {bad[0]!r}; "
                f"valid: {', '.join(DTYPES)}"
            )
    ctx.quantizer.metadata = metadata
    return parsed


def suffixes(quantizer: Any) -> dict[str, str]:
    """Each flattened tensor's suffix -> the parameter it belongs to ('_weight_qdata' -> 'weight')."""
    return {s: name for name, names in quantizer.serialized_names.items() for s in names}


def stored_state(ctx: LoadContext) -> dict[str, set[str]]:
    """Per quantized parameter (`<layer>.weight`), the flattened tensors the shard headers hold; raises, before
    any weight is read, when the metadata describes a quantized parameter whose qdata is not stored."""
    parsed = read_metadata(ctx)
    quantized = {k for k, v in parsed.items() if "." in k and isinstance(v, dict) and v.get("_type") != "Tensor"}
    params = suffixes(ctx.quantizer)
    stored: dict[str, set[str]] = {}
    for key in ctx.checkpoint.tensor_names:
        module, _, suffix = key.rpartition(".")
        if suffix in params:
            stored.setdefault(f"{module}.{params[suffix]}", set()).add(suffix)
    lacking = sorted(w for w in quantized if not any(s.endswith("_qdata") for s in stored.get(w, ())))
    if lacking:
        raise CheckpointError(
            f"{ctx.checkpoint.path}: pre-quantized torchao checkpoint: {len(lacking)} quantized weight(s) the "
            f"metadata describes are not stored, e.g. {lacking[0]} (no _qdata); the checkpoint is incomplete"
        )
    return stored


class PrequantizedGroups:
    """Collects a weight's flattened tensors until its set is complete, then rebuilds the torchao tensor with
    the quantizer's deserialize op."""

    def __init__(self, ctx: LoadContext) -> None:
        self.ctx = ctx
        self.expected = stored_state(ctx)
        self.params = suffixes(ctx.quantizer)
        self.pending: dict[str, dict[str, list[torch.Tensor]]] = {}

    def _weight(self, key: str) -> tuple[str, str] | None:
        module, _, suffix = key.rpartition(".")
        weight = f"{module}.{self.params.get(suffix)}"
        return (weight, suffix) if suffix in self.expected.get(weight, ()) else None

    def claims(self, key: str) -> bool:
        return self._weight(key) is not None

    def add(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        weight, suffix = self._weight(key)
        ctx = self.ctx
        device = get_device(ctx.load_config.device_map, weight, valid_torch_device=True)
        group = self.pending.setdefault(weight, {})
        group[suffix] = [tensor.to(device)]
        if set(group) != self.expected[weight]:
            return {}
        del self.pending[weight]
        op = ctx.quantizer.get_load_operations()["deserialize"](ctx.quantizer)
        return op.convert(group, source_patterns=sorted(group), model=ctx.model, full_layer_name=weight)
