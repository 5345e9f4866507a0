"""Stage 2: the quantizer for the merged config, from transformers' `AutoHfQuantizer`."""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import AutoHfQuantizer

from pipeline.core.context import LoadContext
from stages.base import Stage


class AutoQuantizer(Stage):
    kind = "quantizer"

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        if ctx.quantization_config is None:
            return {"quantizer": None}
        ctx.quantizer = AutoHfQuantizer.from_config(ctx.quantization_config, pre_quantized=ctx.pre_quantized)
        ctx.dtype = ctx.quantizer.update_dtype(ctx.dtype)
        return {"quantizer": type(ctx.quantizer).__name__, "pre_quantized": ctx.pre_quantized}
