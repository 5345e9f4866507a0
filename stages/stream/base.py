"""What both streamers share: the loader settings transformers' finishing steps expect."""

from __future__ import annotations

from typing import Any

from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.modeling_utils import LoadStateDictConfig

from pipeline.core.context import LoadContext
from pipeline.core.schema import StreamConfig
from stages.base import Stage
from stages.stream.plan import StreamPlan, plan


class StreamStage(Stage):
    kind = "stream"
    cfg: StreamConfig
    # the memory model (stream/plan.py) is this streamer's own, or only an estimate of it
    plan_is_exact = False
    prefetch, kernel = 0, "quantizer"

    def plan(self, ctx: LoadContext, base: int, device_map: dict[str, Any]) -> StreamPlan:
        """What this streamer would hold, device by device, reading no weight (plan=true asks this). The model
        is the bounded streamer's with this stage's own settings; a streamer with another loop says so in
        `plan_is_exact`."""
        from stages.stream.memory import return_freed_memory

        return_freed_memory()  # as the stream does first: the kernel probe's allocations then behave like the load's
        return plan(ctx, base, device_map, self.prefetch, self.kernel)

    @staticmethod
    def load_config(ctx: LoadContext) -> LoadStateDictConfig:
        model = ctx.require("model", "stream")
        return LoadStateDictConfig(
            pretrained_model_name_or_path=str(ctx.checkpoint.path),
            sharded_metadata={"weight_map": ctx.checkpoint.weight_map} if ctx.checkpoint.weight_map else None,
            device_map=ctx.require("device_map", "stream"),
            disk_offload_folder=ctx.cfg.device_map.offload_folder,
            dtype=ctx.dtype,
            dtype_plan=model._get_dtype_plan(ctx.dtype),
            hf_quantizer=ctx.quantizer,
            weight_mapping=get_model_conversion_mapping(model, None, ctx.quantizer),
        )
