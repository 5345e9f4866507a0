"""Stage 1: find the checkpoint, read its config, and merge the requested quantization with a saved one."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import CONFIG_MAPPING, AutoConfig
from transformers.quantizers.auto import AutoHfQuantizer

from pipeline.checkpoints import checkpoint
from pipeline.core.context import LoadContext
from pipeline.core.dtypes import torch_dtype
from pipeline.core.schema import DtypeName, ModelConfig, QuantConfig
from stages import backends
from stages.base import Stage


def requested_quantization(quant: QuantConfig, dtype: torch.dtype) -> Any:
    """The transformers quantization config a quant group asks for, built by its backend (None: quant=none)."""
    backend = backends.for_quant(quant)
    return backend.hf_config(quant, dtype) if backend is not None else None


def _differences(requested: Any, merged: Any) -> dict[str, Any]:
    """Requested settings the merged config does not carry: what the checkpoint's own config overrode."""
    if requested is None:
        return {}
    want, got = requested.to_dict(), merged.to_dict()
    return {k: {"requested": v, "used": got.get(k)} for k, v in want.items() if got.get(k) != v}


class ConfigMerge(Stage):
    kind = "config_merge"

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        cfg = ctx.cfg
        # a plan reads what is here and never downloads or builds: without a local copy, the YAML architecture
        path = (
            checkpoint.find_local(cfg.model, cfg.cache_dir) if cfg.plan else checkpoint.locate(cfg.model, cfg.cache_dir)
        )
        if path is None:
            config = architecture_config(cfg.model)
        else:
            allow_pickle = cfg.model.allow_pickle
            ctx.checkpoint = (
                _scan_for_plan(path, allow_pickle) if cfg.plan else checkpoint.scan(path, allow_pickle=allow_pickle)
            )
            config = read_config(path, cfg.model.trust_remote_code)
        ctx.model_config = config

        if cfg.dtype.name == DtypeName.auto:
            saved = getattr(config, "dtype", None)
            ctx.dtype = saved if isinstance(saved, torch.dtype) else torch_dtype(saved or "fp32", "config.json dtype")
        else:
            ctx.dtype = torch_dtype(cfg.dtype.name, "dtype")

        ctx.backend = backends.for_quant(cfg.quant)
        requested = ctx.backend.hf_config(cfg.quant, ctx.dtype) if ctx.backend is not None else None
        saved_q = getattr(config, "quantization_config", None)
        facts: dict[str, Any] = {
            "checkpoint": ctx.checkpoint.to_record() if ctx.checkpoint else None,
            "architecture_from": "model YAML" if path is None else "config.json",
            "dtype": str(ctx.dtype).removeprefix("torch."),
        }
        if saved_q is not None:
            where = str(path / "config.json") if path is not None else f"model.architecture of model={cfg.model.name}"
            ctx.backend = _check_saved_quantization(saved_q, cfg.quant, where)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # we record what was ignored instead of warning about it
                merged = AutoHfQuantizer.merge_quantization_configs(saved_q, requested)
            ctx.pre_quantized = True
            facts["quantization_from"] = "checkpoint"
            facts["ignored_request"] = _differences(requested, merged)
        else:
            merged = requested
            facts["quantization_from"] = "request" if requested is not None else "none"
        ctx.quantization_config = merged
        if merged is not None:
            config.quantization_config = merged
        facts["quantization_config"] = merged.to_dict() if merged is not None else None
        facts["backend"] = ctx.backend.name if ctx.backend is not None else None
        facts["architecture_from_checkpoint"] = _arch_overrides(cfg.model.architecture, config)
        if path is not None:
            facts["architecture"] = built_architecture(path)
        facts["trust_remote_code"] = cfg.model.trust_remote_code
        return facts


def read_config(path: Path, trust_remote_code: bool) -> Any:
    """config.json through AutoConfig; an unknown architecture or code the repo ships is named as such."""
    where = path / "config.json"
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        try:
            raw = json.loads(where.read_text())
        except ValueError:
            raise checkpoint.CheckpointError(f"{where}: not valid JSON ({err})") from None
        model_type = raw.get("model_type")
        if raw.get("auto_map") and not trust_remote_code:
            raise checkpoint.CheckpointError(
                f"{where}: model_type={model_type!r} comes with Python code of its own (auto_map: "
                f"{', '.join(raw['auto_map'].values())}), which runs only with model.trust_remote_code=true; "
                "read that code before you allow it"
            ) from None
        if model_type not in CONFIG_MAPPING:
            raise checkpoint.CheckpointError(
                f"{where}: model_type={model_type!r} is not an architecture transformers {transformers.__version__} "
                "knows (e.g. llama, mistral, qwen2); upgrade transformers, or check that this is a Hugging Face "
                "model folder"
            ) from None
        raise checkpoint.CheckpointError(f"{where}: {type(err).__name__}: {err}") from None


# config.json keys that say how it was saved, not what the model is
_NOT_ARCHITECTURE = ("_name_or_path", "architectures", "transformers_version", "quantization_config", "auto_map")


def built_architecture(path: Path) -> dict[str, Any]:
    """The architecture of the model built from this checkpoint, as its config.json states it (the run record
    holds it in place of the model YAML's when the weights come from model.path)."""
    raw = json.loads((path / "config.json").read_text())
    return {k: v for k, v in raw.items() if k not in _NOT_ARCHITECTURE}


def _check_saved_quantization(saved: Any, quant: QuantConfig, where: str) -> backends.Backend | None:
    """A checkpoint saved quantized: refuse a method transformers does not know, and a request for one
    backend on weights another method quantized (they cannot be quantized again). Returns our backend for the
    saved method, if we have one."""
    method = backends.saved_method(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        known = method is not None and AutoHfQuantizer.supports_quant_method(
            saved if isinstance(saved, dict) else saved.to_dict()
        )
    if not known:
        raise checkpoint.CheckpointError(
            f"{where}: quantization_config.quant_method={method!r} is not a quantization method transformers "
            f"{transformers.__version__} knows (e.g. torchao, hqq, gptq, awq); remove quantization_config if the "
            "weights are not quantized, or upgrade transformers"
        )
    backend = backends.for_saved(method)
    requested = backends.for_quant(quant)
    if requested is not None and (backend is None or type(backend) is not type(requested)):
        raise checkpoint.CheckpointError(
            f"{where}: the checkpoint is already quantized with {method} (quantization_config.quant_method), and "
            f"quant={quant.name} asks for {requested.name}; quantized weights cannot be quantized again. Load them "
            f"as saved with quant=none"
            + ("" if backend is not None else " stages/stream=transformers")
            + f" ({method}'s own backend installed), or point model.path at the full-precision weights"
        )
    return backend


def architecture_config(model: ModelConfig) -> Any:
    """The config a checkpoint of this model would carry, from the model YAML's `architecture:`; its dtype is
    `model.synthetic.dtype` (each model YAML sets it to the real checkpoint's) unless the architecture names one."""
    arch = dict(model.architecture)
    if not arch.get("model_type"):
        raise checkpoint.CheckpointError(
            f"model={model.name}: no local checkpoint and no model.architecture.model_type to plan from; add the "
            f"architecture to conf/model/{model.name}.yaml or pass model.path=DIR"
        )
    try:
        config = AutoConfig.for_model(**arch)
    except (ValueError, KeyError, TypeError) as err:
        raise checkpoint.CheckpointError(f"model.architecture of model={model.name}: {err}") from None
    if "dtype" not in arch and "torch_dtype" not in arch:
        config.dtype = torch_dtype(model.synthetic.dtype, "model.synthetic.dtype")
    return config


def _scan_for_plan(path: Any, allow_pickle: bool) -> checkpoint.Checkpoint | None:
    """The checkpoint's shards when they are here too (a hub cache may hold config.json alone); weights that
    are here but would be refused by a load are refused by the plan too."""
    if not any(p.suffix in {".safetensors", ".bin"} for p in Path(path).iterdir()):
        return None
    return checkpoint.scan(path, allow_pickle=allow_pickle)


def _arch_overrides(yaml_arch: dict, config: Any) -> dict[str, Any]:
    """Keys where the checkpoint's config.json differs from the model YAML (config.json wins)."""
    return {
        k: {"yaml": v, "config.json": getattr(config, k)}
        for k, v in yaml_arch.items()
        if hasattr(config, k) and getattr(config, k) != v and k != "model_type"
    }
