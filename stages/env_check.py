"""Stage 3: is this load possible here? Library versions, devices, the backend, the requested map."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from transformers.integrations.accelerate import check_and_set_device_map

from pipeline.core.context import LoadContext
from pipeline.core.placement import check_quantized_offload
from pipeline.core.schema import DeviceMapConfig, Policy
from stages.base import Stage

PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "safetensors", "hydra-core")


def package_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def requested_map(dm: DeviceMapConfig) -> str | dict[str, Any]:
    """The device map as the user asked for it: a policy name for accelerate, or a module -> device dict."""
    if dm.policy == Policy.cpu:
        return {"": "cpu"}
    if dm.policy == Policy.explicit:
        return {str(k): v for k, v in dict(dm.map).items()}
    return dm.policy.value


def devices() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"cuda": False, "gpus": [], "note": "no GPU: every module goes to the CPU"}
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cuda": True, "gpus": gpus, "cuda_version": torch.version.cuda}


def absent_gpus(dm: DeviceMapConfig, plan: bool) -> list[int]:
    """GPU indices the budget or the explicit map names that this machine lacks: an error for a load, the
    machine being planned for in a plan."""
    named = {int(k) for k in (dm.max_memory or {}) if str(k).isdigit()}
    named |= {int(v) for v in (dm.map or {}).values() if str(v).isdigit()}
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    absent = sorted(i for i in named if i >= here)
    if absent and not plan:
        valid = f"valid: {', '.join(map(str, range(here)))}, cpu, disk" if here else "valid here: cpu, disk"
        raise ValueError(
            f"device_map names GPU {', '.join(map(str, absent))}, but this machine has {here} GPU(s) ({valid}); "
            "to plan a layout for another machine without loading, add plan=true"
        )
    return absent


def check_backend(ctx: LoadContext, requested: Any, facts: dict[str, Any]) -> None:
    """transformers' own check that bitsandbytes is installed and has a backend for a device here, its
    message prefixed with what was asked, what is installed and the two ways out."""
    try:
        ctx.quantizer.validate_environment(device_map=requested, weights_only=True)
    except (ImportError, RuntimeError) as err:
        here = "cuda, cpu" if facts["devices"]["cuda"] else "cpu"
        installed = facts["versions"].get("bitsandbytes") or "not installed"
        raise RuntimeError(
            f"quant={ctx.cfg.quant.name} needs bitsandbytes with a backend for a device here ({here}); "
            f"bitsandbytes: {installed}. Fix: pip install -U 'bitsandbytes>=0.48' (CPU support), or load "
            f"unquantized with quant=none. transformers says: {err}"
        ) from None


class EnvCheck(Stage):
    kind = "env_check"

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "versions": package_versions(),
            "python": platform.python_version(),
            "devices": devices(),
        }
        absent = absent_gpus(ctx.cfg.device_map, ctx.cfg.plan)
        if absent:
            facts["planned_gpus_not_here"] = absent
        requested = check_and_set_device_map(requested_map(ctx.cfg.device_map))
        if isinstance(requested, dict):
            check_quantized_offload(requested, ctx.quantizer, ctx.cfg.quant, "device_map.map")
        if ctx.quantizer is not None:
            check_backend(ctx, requested, facts)
            requested = ctx.quantizer.update_device_map(requested)
            facts["bnb_backend"] = "cuda" if torch.cuda.is_available() else "cpu"
        ctx.requested_device_map = requested
        facts["requested_device_map"] = requested
        return facts
