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

    def is_quantized_module(self, module: torch.nn.Module) -> bool:
        return type(module).__module__.startswith("optimum.quanto")
