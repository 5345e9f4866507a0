"""Pre-quantized bitsandbytes checkpoints: each quantized layer's stored tensors (the packed weight and its
quantization state: absmax, quant map, nested ones, SCB), checked against the model before any weight is read,
then gathered per layer while streaming and rebuilt with the quantizer's own deserialize op."""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import torch
from transformers.integrations.accelerate import get_device
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

from pipeline.core.context import LoadContext
from stages.backends.base import stored_per_layer


def quant_state_names(quantizer: Any) -> set[str]:
    """What a bitsandbytes checkpoint stores for each quantized linear layer, the weight included."""
    qc = quantizer.quantization_config
    if not qc.load_in_4bit:
        return {"weight", "SCB"}
    names = {
        "weight",
        "weight.absmax",
        "weight.quant_map",
        f"weight.quant_state.bitsandbytes__{qc.bnb_4bit_quant_type}",
    }
    return names | ({"weight.nested_absmax", "weight.nested_quant_map"} if qc.bnb_4bit_use_double_quant else set())


def is_bnb(quantizer: Any) -> bool:
    return isinstance(quantizer, (Bnb4BitHfQuantizer, Bnb8BitHfQuantizer))


def _suffixes(quantizer: Any) -> list[str]:
    return sorted((s for names in quantizer.serialized_names.values() for s in names), key=len, reverse=True)


def split_key(key: str, suffixes: list[str]) -> tuple[str, str] | None:
    """'model.layers.0.q_proj.weight.absmax' -> ('model.layers.0.q_proj', 'weight.absmax')."""
    for s in suffixes:
        if key.endswith("." + s):
            return key[: -len(s) - 1], s
    return None


def stored_state(ctx: LoadContext) -> dict[str, set[str]]:
    """Per module, the quantization tensors the shard headers hold; raises when a quantized layer of the model
    lacks any of its set: such a layer could only be loaded as garbage."""
    suffixes = _suffixes(ctx.quantizer)
    layers = [n for n, m in ctx.model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    need = quant_state_names(ctx.quantizer)
    return stored_per_layer(ctx, lambda key: split_key(key, suffixes), layers, need, "their quantization state")


class PrequantizedGroups:
    """Collects a pre-quantized weight and its companion tensors until the module's set is complete, then
    rebuilds the quantized parameter with the quantizer's deserialize op."""

    def __init__(self, ctx: LoadContext) -> None:
        self.ctx, self.suffixes = ctx, _suffixes(ctx.quantizer)
        # a module is quantized in the checkpoint only if some companion beside its weight is stored
        self.expected = {m: s for m, s in stored_state(ctx).items() if s - {"weight"}}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def claims(self, key: str) -> bool:
        split = split_key(key, self.suffixes)
        return split is not None and split[0] in self.expected

    def add(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        module, suffix = split_key(key, self.suffixes)
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
