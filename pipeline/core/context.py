"""The one object the stages share: each stage reads what earlier stages set and fills in its own part."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.quantizers import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from pipeline.checkpoints.checkpoint import Checkpoint
    from pipeline.core.schema import RunConfig


@dataclass
class LoadContext:
    """State of one load, in the order the stages fill it."""

    cfg: RunConfig
    # config_merge
    checkpoint: Checkpoint | None = None
    model_config: PretrainedConfig | None = None
    quantization_config: QuantizationConfigMixin | None = None
    pre_quantized: bool = False
    # the quantization backend (stages/backends/) the request or the checkpoint names; None: unquantized
    backend: Any = None
    dtype: torch.dtype | None = None
    # quantizer
    quantizer: HfQuantizer | None = None
    # env_check: the device map as requested ("auto", "sequential", a dict), after the quantizer's update
    requested_device_map: str | dict[str, Any] | None = None
    max_memory: dict[Any, int] | None = None
    # preprocess
    model: PreTrainedModel | None = None
    # device_map
    device_map: dict[str, Any] | None = None
    # stream: the loader settings and what the streamer saw, for postprocess to finish
    load_config: Any = None
    loading_info: Any = None
    disk_offload_index: dict | None = None
    # anything a stage wants in the run record beyond its metrics, by stage kind
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def require(self, name: str, stage: str) -> Any:
        """An attribute an earlier stage must have set; a clear error when a swapped-in stage did not."""
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"stage {stage!r} needs ctx.{name}, which no earlier stage set")
        return value
