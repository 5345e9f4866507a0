"""Stage 4: the model skeleton on the meta device, its linear layers swapped for quantized placeholders.

No weight memory is allocated here: every parameter stays on `meta` until the stream stage fills it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from transformers import AutoModelForCausalLM
from transformers.models.auto.auto_factory import _get_model_class
from transformers.utils.generic import ContextManagers

from pipeline.checkpoints.checkpoint import CheckpointError
from pipeline.core.context import LoadContext
from stages.base import Stage

log = logging.getLogger(__name__)


def causal_lm_class(config: Any, trust_remote_code: bool) -> type:
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], config.name_or_path)
    mapping = AutoModelForCausalLM._model_mapping
    if type(config) not in mapping:
        known = sorted({c.model_type for c in mapping.keys()})[:12]
        raise CheckpointError(
            f"config.json model_type={config.model_type!r} has no causal-LM class in transformers "
            f"(known include {', '.join(known)}, ...); set model.trust_remote_code=true if the repo ships its own code"
        )
    return _get_model_class(config, mapping)


class MetaSkeleton(Stage):
    kind = "preprocess"

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        config = copy.deepcopy(ctx.require("model_config", self.kind))
        # a plan may have no checkpoint here: the skeleton comes from the architecture alone, and the quantizer
        # gets None, not [] (torchao's reads the first file's metadata of any list it is given)
        files = [str(f) for f in ctx.checkpoint.files] if ctx.checkpoint else None
        config.name_or_path = str(ctx.checkpoint.path) if ctx.checkpoint else ctx.cfg.model.hub_id or ctx.cfg.model.name
        cls = causal_lm_class(config, ctx.cfg.model.trust_remote_code)
        with ContextManagers(cls.get_init_context(ctx.dtype, ctx.quantizer is not None, False, None)):
            model = cls(config)
            if ctx.quantizer is not None:
                ctx.quantizer.preprocess_model(
                    model=model,
                    dtype=ctx.dtype,
                    device_map=ctx.requested_device_map,
                    checkpoint_files=files,
                    use_kernels=False,
                )
        ctx.model = model
        params = list(model.parameters())
        allocated = sum(p.numel() * p.element_size() for p in params if p.device.type != "meta")
        backend = ctx.backend
        quantized = [m for _, m in backend.quantized_modules(model, ctx.quantizer)] if backend is not None else []
        facts = {
            "model_class": cls.__name__,
            "parameters": sum(p.numel() for p in params),
            "weight_bytes_allocated": allocated,
            "quantized_module_types": sorted({type(m).__name__ for m in quantized}),
            "not_converted": sorted(getattr(ctx.quantizer, "modules_to_not_convert", []) or []),
        }
        if ctx.quantizer is not None and backend is not None and not quantized and not ctx.pre_quantized:
            # e.g. Falcon: transformers swaps modules whose type is exactly nn.Linear or Conv1D, not subclasses
            facts["note"] = (
                f"the quantizer replaced no layer of {cls.__name__}: it loads unquantized, as from_pretrained "
                "with this quantization_config does"
            )
            log.warning(facts["note"])
        return facts
