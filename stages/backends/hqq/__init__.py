"""HQQ (half-quadratic quantization), done by our streamer: transformers 5 cannot quantize with HQQ at load
time (its `HqqHfQuantizer` has no quantize op), so each linear layer is quantized with hqq's own `HQQLinear`
as soon as its weight (and bias) have streamed in, and the layer is swapped for it. On a CPU, hqq's default
path is run by `quantize.py`: the same ops on the same values, bit for bit, a few times faster and in less
memory than `HQQLinear` itself. transformers' quantizer
still tags the skeleton's layers with their settings (`preprocess_model`) and writes `quantization_config`,
so `save_pretrained` writes an HQQ checkpoint, which our bounded streamer reads back (prequantized.py;
transformers 5.24 cannot load it on a CPU).

Sizes (for the device map and the plan): W_q packs `nbits` per weight (3 bits: ten values per int32); scale
and zero are one value each per `group_size` weights, in the compute dtype, kept in the layer's `meta`, which
`get_memory_footprint` does not count.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.core.schema import HqqQuantConfig
from stages.backends.base import Backend, BackendUnavailable


def packed_bytes(numel: int, nbits: int, group_size: int, axis: int = 1) -> int:
    """Bytes of hqq's packed W_q for `numel` weights: the weight is reshaped to (numel / group_size, group_size)
    (axis 1; axis 0: (group_size, numel / group_size)) and packed along its first dimension (hqq.core.bitpack):
    8 / 4 / 2 / 1 bits as 1 / 2 / 4 / 8 rows per uint8, 3 bits as 10 rows per int32."""
    rows, cols = (numel // group_size, group_size) if axis == 1 else (group_size, numel // group_size)
    if nbits == 3:
        return 4 * -(-rows // 10) * cols
    per_byte = 8 // nbits
    return -(-rows // per_byte) * cols


class HqqBackend(Backend):
    name = "hqq"
    packages = ("hqq",)
    install = "pip install 'hqq>=0.2.8' (pure torch on a CPU)"
    saved_methods = ("hqq",)

    def __init__(self, quant: HqqQuantConfig | None = None) -> None:
        super().__init__(quant)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def hf_config(self, quant: HqqQuantConfig, dtype: torch.dtype) -> Any:
        from transformers import HqqConfig

        return HqqConfig(nbits=quant.nbits, group_size=quant.group_size, axis=quant.axis)

    def check_environment(self, ctx: Any, device_map: Any, facts: dict[str, Any]) -> None:
        # transformers' check refuses any map with a CPU in it: it expects hqq's CUDA path; ours runs on the CPU
        missing = self.missing_packages()
        if missing or ctx.quantizer is None:
            super().check_environment(ctx, device_map, facts)

    def validate_map(self, quantizer: Any, device_map: Any) -> None:
        """transformers' HQQ check refuses a CPU in the map; our streamer quantizes on the CPU itself."""

    def is_quantized_module(self, module: torch.nn.Module) -> bool:
        return getattr(module, "quant_config", None) is not None and isinstance(module, torch.nn.Linear)

    def _settings(self) -> tuple[int, int, int]:
        q = self.quant
        return (q.nbits, q.group_size, q.axis) if q is not None else (4, 64, 1)

    def quantizes(self, model: Any, quantizer: Any, name: str) -> bool:
        module = model.get_submodule(name.rpartition(".")[0])
        return not quantizer.pre_quantized and self.is_quantized_module(module) and name.endswith(".weight")

    def stored_bytes(self, model: Any, quantizer: Any, name: str, param: Any, numel: int) -> int:
        module = model.get_submodule(name.rpartition(".")[0])
        if not self.is_quantized_module(module) or not name.endswith(".weight"):
            return numel * param.element_size()
        return packed_bytes(numel, *self._settings())

    def footprint_bytes(self, model: Any, quantizer: Any, name: str, param: Any) -> int:
        """W_q is the layer's one parameter: get_memory_footprint counts it packed (scale and zero live in the
        layer's `meta` dict, which it does not count)."""
        return self.stored_bytes(model, quantizer, name, param, param.numel())

    def quant_state_bytes(self, param: Any, numel: int, shape: tuple[int, ...] | None = None) -> int:
        nbits, group, _ = self._settings()
        return 2 * -(-numel // group) * param.element_size()  # scale and zero, in the compute dtype

    def quantize(
        self, model: Any, quantizer: Any, name: str, value: torch.Tensor, kernel: str, missing: set[str]
    ) -> dict[str, torch.Tensor]:
        from hqq.core.quantize import HQQLinear

        from stages.backends.hqq.quantize import fast_settings, make_layer

        module_name, _, tensor = name.rpartition(".")
        module = model.get_submodule(module_name)
        if not self.is_quantized_module(module):  # a Linear the config skips (lm_head): placed as it is
            return {name: value}
        group = self.pending.setdefault(module_name, {})
        group[tensor] = value
        if "weight" not in group or (module.bias is not None and "bias" not in group):
            missing.discard(name)
            return {}
        del self.pending[module_name]
        if fast_settings(module.quant_config, str(value.device)) is not None:  # hqq's default path on a CPU
            layer = make_layer(group["weight"], group.get("bias"), module.quant_config, value.dtype)
        else:
            linear = torch.nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta"
            )
            linear.weight = torch.nn.Parameter(group["weight"], requires_grad=False)
            if module.bias is not None:
                linear.bias = torch.nn.Parameter(group["bias"], requires_grad=False)
            layer = HQQLinear(
                linear, module.quant_config, del_orig=True, compute_dtype=value.dtype, device=str(value.device)
            )
        layer.name = getattr(module, "name", module_name)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        missing.discard(name)
        missing.discard(f"{module_name}.weight")
        missing.discard(f"{module_name}.bias")
        return {}

    def prequantized_groups(self, ctx: Any) -> Any:
        from stages.backends.hqq.prequantized import PrequantizedGroups

        return PrequantizedGroups(ctx)

    def check_prequantized(self, ctx: Any) -> None:
        """transformers' loader (stages/stream=transformers) cannot read an HQQ checkpoint: its HQQ quantizer has
        no load operation, so every HQQ tensor would be skipped and every weight left random."""
        raise BackendUnavailable(
            f"{ctx.checkpoint.path}: a checkpoint pre-quantized with hqq, which transformers' loader cannot read "
            "(its HQQ quantizer has no load operation: the weights would stay random); use stages/stream=bounded, "
            "which reads it as saved"
        )
