"""What both streamers share: the loader settings transformers' finishing steps expect."""

from __future__ import annotations

from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.modeling_utils import LoadStateDictConfig

from pipeline.core.context import LoadContext
from stages.base import Stage


class StreamStage(Stage):
    kind = "stream"

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

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
