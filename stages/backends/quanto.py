"""optimum-quanto: int8/int4/int2/float8 weights through transformers' `QuantoConfig` and its quantize op
(the layer's weight placed, then `freeze()` quantizes it). Pure torch on a CPU; cannot be saved."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.core.schema import QuantoQuantConfig
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

    def is_quantized_module(self, module: torch.nn.Module) -> bool:
        return type(module).__module__.startswith("optimum.quanto")
