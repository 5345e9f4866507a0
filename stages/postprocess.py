"""Stage 7: finish the model: tied weights and missing buffers, dispatch hooks, quantizer postprocess, eval."""

from __future__ import annotations

from typing import Any

from transformers.integrations.accelerate import accelerate_dispatch

from pipeline.checkpoint import CheckpointError
from pipeline.context import LoadContext
from stages.base import Stage


class Finalize(Stage):
    kind = "postprocess"

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        model = ctx.require("model", self.kind)
        load_config = ctx.require("load_config", self.kind)
        # ties weights, materializes non-persistent buffers (rotary tables), settles missing/unexpected keys
        info = type(model)._finalize_model_loading(model, load_config, ctx.require("loading_info", self.kind))
        missing = sorted(info.missing_keys)
        if missing:
            raise CheckpointError(
                f"{ctx.checkpoint.path}: {len(missing)} weight(s) of the model are not in the checkpoint, e.g. "
                f"{', '.join(missing[:3])}; refusing to leave them randomly initialized"
            )
        devices = set(ctx.device_map.values())
        dispatched = len(devices) > 1 or "disk" in devices
        if dispatched:
            accelerate_dispatch(
                model,
                ctx.quantizer,
                ctx.device_map,
                load_config.disk_offload_folder,
                ctx.disk_offload_index,
                False,
            )
        if ctx.quantizer is not None:
            model.hf_quantizer = ctx.quantizer
            ctx.quantizer.postprocess_model(model)
        model.eval()
        return {
            "footprint_bytes": model.get_memory_footprint(),
            "unexpected_keys": sorted(info.unexpected_keys)[:20],
            "mismatched_keys": [str(k) for k in sorted(info.mismatched_keys)[:20]],
            "dispatch_hooks": dispatched,
        }
