"""optimum-quanto: int8/int4/int2/float8 weights through transformers' `QuantoConfig` and its quantize op
(the layer's weight placed, then `freeze()` quantizes it). Pure torch on a CPU; cannot be saved."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.core.schema import QuantoQuantConfig, QuantoWeights
from stages.backends.base import Backend


class QuantoBackend(Backend):
    name = "optimum-quanto"
    packages = ("optimum-quanto",)
    install = "pip install 'optimum-quanto>=0.2.7'"
    saved_methods = ("quanto",)
    cannot_save = (
        "transformers cannot serialize optimum-quanto weights (QuantoHfQuantizer.is_serializable is False); "
        "keep the full-precision checkpoint and quantize at load"
    )

    def hf_config(self, quant: QuantoQuantConfig, dtype: torch.dtype) -> Any:
        from transformers import QuantoConfig

        return QuantoConfig(weights=quant.weights.value)

    def footprint_bytes(self, model: Any, quantizer: Any, name: str, param: Any) -> int:
        """quanto's QTensor reports its logical dtype's element size, so get_memory_footprint counts a quantized
        weight at full size; the layers' input/output scales are made float32 when the weight is frozen."""
        if name.endswith(("input_scale", "output_scale")):
            return param.numel() * 4
        return param.numel() * param.element_size()

    def stored_bytes(self, model: Any, quantizer: Any, name: str, param: Any, numel: int) -> int:
        return int(numel * quantizer.param_element_size(model, name, param))

    def held_bytes(self, model: Any, quantizer: Any, name: str, param: Any, numel: int) -> int:
        """The QTensor's inner tensors. int8/float8: one byte a weight and a scale per output row. int4/int2:
        the weight grouped in rows of `group_size` (128, less by steps of 32 until it divides the input size;
        per output row when the input is 128 or less, as QModuleMixin picks it), packed 2 or 4 rows a byte along
        the first dimension, and a scale and a shift per row of the grouping. Scales and shifts are in the
        compute dtype."""
        weights = self.quant.weights if self.quant is not None else QuantoWeights.int8
        scale = param.element_size()
        rows = param.shape[0]
        if weights in (QuantoWeights.int8, QuantoWeights.float8):
            return numel + rows * scale
        group = quanto_group_size(numel // rows)
        grouped_rows, cols = (numel // group, group) if group else (rows, numel // rows)
        per_byte = 8 // (4 if weights == QuantoWeights.int4 else 2)
        return -(-grouped_rows // per_byte) * cols + 2 * grouped_rows * scale

    def is_quantized_module(self, module: torch.nn.Module) -> bool:
        return type(module).__module__.startswith("optimum.quanto")


def quanto_group_size(in_features: int) -> int | None:
    """The group size optimum-quanto's QModuleMixin gives an int4/int2 weight with `in_features` inputs (None:
    one scale per output row)."""
    group = 128
    if in_features <= group:
        return None
    while in_features % group and group > 32:
        group -= 32
    return group if in_features % group == 0 else None
