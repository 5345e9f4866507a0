"""The reference streamer: transformers' own weight loader, the one `from_pretrained` runs.

It loads into the same skeleton with the same device map, so swapping `stages/stream` between this and
the bounded streamer compares the loaders alone.

Pickle shards (model.allow_pickle=true) it reads itself, by the file suffix: transformers 5's
`load_state_dict` calls `torch.load(weights_only=True)`, memory-mapped for zip-format files, and maps every
shard before loading any tensor, so a pickle checkpoint may stay resident up to its whole size here.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.core import progress
from pipeline.core.context import LoadContext
from stages.stream.base import StreamStage


class TransformersStreamer(StreamStage):
    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        model = ctx.require("model", self.kind)
        if ctx.pre_quantized and ctx.backend is not None:
            ctx.backend.check_prequantized(ctx)
        ctx.load_config = self.load_config(ctx)
        if not (self.cfg.progress and progress.enabled()):
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        files = [str(f) for f in ctx.checkpoint.files]
        ctx.loading_info, ctx.disk_offload_index = type(model)._load_pretrained_model(
            model, None, files, ctx.load_config
        )
        info = ctx.loading_info
        return {
            "shards": len(files),
            "shard_bytes": sum(f.stat().st_size for f in ctx.checkpoint.files),
            "tensors": len(model.state_dict()) - len(info.missing_keys),
        }
