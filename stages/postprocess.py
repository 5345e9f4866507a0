"""Stage 7: finish the model: tied weights and missing buffers, dispatch hooks, quantizer postprocess, eval."""

from __future__ import annotations

from typing import Any

from transformers.integrations.accelerate import accelerate_dispatch

from pipeline.checkpoints.checkpoint import CheckpointError
from pipeline.core.context import LoadContext
from pipeline.core.held import held_bytes
from stages.base import Stage


class Finalize(Stage):
    kind = "postprocess"

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        model = ctx.require("model", self.kind)
        load_config = ctx.require("load_config", self.kind)
        loading_info = ctx.require("loading_info", self.kind)
        if loading_info.mismatched_keys:  # transformers' own loader: said here as the bounded streamer says it
            name, found, wanted = sorted(loading_info.mismatched_keys)[0]
            raise CheckpointError(
                f"{ctx.checkpoint.path}: {len(loading_info.mismatched_keys)} tensor(s) do not fit the model built "
                f"from config.json, e.g. {name!r} is {tuple(found)}, the model expects {tuple(wanted)}; does "
                "config.json belong to these weights?"
            )
        # ties weights, materializes non-persistent buffers (rotary tables), settles missing/unexpected keys
        info = type(model)._finalize_model_loading(model, load_config, loading_info)
        missing = sorted(info.missing_keys)
        if missing:
            raise CheckpointError(
                f"{ctx.checkpoint.path}: {len(missing)} weight(s) of the model are not in the checkpoint, e.g. "
                f"{', '.join(missing[:3])}; refusing to leave them randomly initialized"
            )
        # tensors the model has no place for (after transformers' own ignore rules, e.g. old rotary buffers)
        unexpected = sorted(info.unexpected_keys)
        if unexpected and not self.cfg.allow_unexpected_keys:
            raise CheckpointError(
                f"{ctx.checkpoint.path}: {len(unexpected)} tensor(s) in the checkpoint have no place in the model "
                f"built from config.json, e.g. {', '.join(unexpected[:3])}; the weights belong to another model or "
                "size. To load anyway and record them: stages.postprocess.allow_unexpected_keys=true"
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
        held = held_bytes(model)
        return {
            "footprint_bytes": model.get_memory_footprint(),
            # measured, every tensor's storage (pipeline/core/held.py): what the plan's held_bytes predicts
            "held_bytes_per_device": held,
            "held_bytes": sum(held.values()),
            "unexpected_keys": unexpected[:20],
            "dispatch_hooks": dispatched,
        }
