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
        if ctx.backend is not None:
            ctx.quantizer = ctx.backend.make_quantizer(ctx.quantization_config, ctx.pre_quantized)
        else:  # a checkpoint saved by a method none of our backends reads: transformers' own quantizer
            try:
                ctx.quantizer = AutoHfQuantizer.from_config(ctx.quantization_config, pre_quantized=ctx.pre_quantized)
            except ImportError as err:
                method = getattr(ctx.quantization_config, "quant_method", None)
                method = getattr(method, "value", method)
                raise RuntimeError(
                    f"the checkpoint is pre-quantized with {method}, which none of our backends (stages/backends/) "
                    f"reads and whose transformers quantizer cannot start here ({err}); install that method's "
                    "own package (most are GPU-only), or point model.path at the full-precision weights"
                ) from None
        ctx.dtype = ctx.quantizer.update_dtype(ctx.dtype)
        return {
            "quantizer": type(ctx.quantizer).__name__,
            "backend": ctx.backend.name if ctx.backend is not None else None,
            "pre_quantized": ctx.pre_quantized,
        }
