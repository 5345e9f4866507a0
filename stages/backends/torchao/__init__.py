"""torchao: int8 weight-only, int8 dynamic-activation/int8-weight and float8 weight-only, through
transformers' `TorchAoConfig` and its quantize op (torchao's `quantize_` on each linear layer as its weight
arrives). Its int4 configs need CUDA or XPU in every packing format, so env_check refuses them on a CPU; on
CUDA, int4's default (plain) packing quantizes with the `mslk` package's kernels, so env_check refuses it where
that is not installed (seen on an H200: torchao otherwise raises "Requires mslk >= 1.0.0" in the stream stage).
A checkpoint it saved is read as saved by prequantized.py (the quantizer's own deserialize op)."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from pipeline.core.schema import TorchaoQuantConfig, TorchaoScheme
from stages.backends.base import Backend


def _torchao_config(quant: TorchaoQuantConfig) -> Any:
    """The torchao config object for a scheme name: a closed table, never a user string resolved."""
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if quant.config == TorchaoScheme.int8_weight_only:
        return Int8WeightOnlyConfig()
    if quant.config == TorchaoScheme.int8_dynamic_activation_int8_weight:
        return Int8DynamicActivationInt8WeightConfig()
    if quant.config == TorchaoScheme.float8_weight_only:
        return Float8WeightOnlyConfig()
    return Int4WeightOnlyConfig(group_size=quant.group_size or 128)


class TorchaoBackend(Backend):
    name = "torchao"
    packages = ("torchao",)
    install = "pip install 'torchao>=0.18' (CPU wheel from PyPI; needs no CUDA torch)"
    saved_methods = ("torchao",)

    def hf_config(self, quant: TorchaoQuantConfig, dtype: torch.dtype) -> Any:
        from transformers import TorchAoConfig

        return TorchAoConfig(quant_type=_torchao_config(quant))

    def cannot_run(self, ctx: Any) -> str | None:
        quant = ctx.cfg.quant
        if getattr(quant, "config", None) != TorchaoScheme.int4_weight_only:
            return None
        if not torch.cuda.is_available():
            return (
                "torchao's Int4WeightOnlyConfig packs int4 weights for CUDA or XPU kernels only (every packing "
                "format fails on a CPU), and IntxWeightOnlyConfig int4 stores int8, saving nothing; use "
                "quant=torchao/int8_weight_only, or 4 bits with quant=hqq/b4_g64, quant=quanto/int4 or quant=nf4"
            )
        if importlib.util.find_spec("mslk") is None:
            return (
                "torchao's Int4WeightOnlyConfig quantizes on CUDA with the mslk package's kernels, which is not "
                "installed: pip install mslk, or 4 bits with quant=nf4, quant=hqq/b4_g64 or quant=quanto/int4"
            )
        return None

    def quantized_modules(self, model: Any, quantizer: Any) -> list[tuple[str, torch.nn.Module]]:
        """torchao swaps no module: a linear layer's weight becomes a torchao tensor as it is loaded."""
        return [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)
            and quantizer.param_needs_quantization(model, f"{n}.weight")
        ]

    def footprint_bytes(self, model: Any, quantizer: Any, name: str, param: Any) -> int:
        """torchao's tensors report the element size of their logical dtype: get_memory_footprint counts a
        quantized weight as if it were unquantized (the scales are inside that figure's reach no more)."""
        return param.numel() * param.element_size()

    def quant_state_bytes(self, param: Any, numel: int, shape: tuple[int, ...] | None = None) -> int:
        """Per output row: int8's float32 scale and int8 zero point (torchao's Int8Tensor), float8's float32
        scale (Float8Tensor); int4's scale and zero per group, in bfloat16."""
        rows = (shape or tuple(param.shape))[0]
        scheme = getattr(self.quant, "config", None)
        if scheme == TorchaoScheme.float8_weight_only:
            return rows * 4
        if scheme == TorchaoScheme.int4_weight_only:
            return 2 * 2 * -(-numel // (self.quant.group_size or 128))
        return rows * (4 + 1)

    def held_bytes(self, model: Any, quantizer: Any, name: str, param: Any, numel: int) -> int:
        """The inner tensors (`qdata` and its state): one byte a weight for int8 and float8, half for int4 (an
        estimate: int4 runs on CUDA only, so no load here measures it), plus `quant_state_bytes`."""
        scheme = getattr(self.quant, "config", None)
        data = -(-numel // 2) if scheme == TorchaoScheme.int4_weight_only else numel
        return data + self.quant_state_bytes(param, numel)

    def prequantized_groups(self, ctx: Any) -> Any:
        from stages.backends.torchao.prequantized import PrequantizedGroups

        return PrequantizedGroups(ctx)

    def check_prequantized(self, ctx: Any) -> None:
        from stages.backends.torchao.prequantized import stored_state

        stored_state(ctx)  # dtype names in the metadata checked, every quantized weight stored
