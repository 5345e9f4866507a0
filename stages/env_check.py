"""Stage 3: is this load possible here? Library versions, devices, the quantization backend (its package, the
scheme on this machine), the requested map."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from transformers.integrations.accelerate import check_and_set_device_map

from pipeline.core.context import LoadContext
from pipeline.core.schema import DeviceMapConfig, Policy
from stages.base import Stage

PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "hydra-core")


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Versions of the packages every load needs, and of the backend's own (`extra`)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES + extra:
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


class EnvCheck(Stage):
    kind = "env_check"

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "versions": package_versions(ctx.backend.packages if ctx.backend is not None else ()),
            "python": platform.python_version(),
            "devices": devices(),
        }
        absent = absent_gpus(ctx.cfg.device_map, ctx.cfg.plan)
        if absent:
            facts["planned_gpus_not_here"] = absent
        requested = check_and_set_device_map(requested_map(ctx.cfg.device_map))
        if isinstance(requested, dict) and ctx.backend is not None:
            ctx.backend.check_device_map(ctx, requested, "device_map.map", explicit=True)
        if ctx.backend is not None:
            # the package, the scheme on this machine, then transformers' own check: before any weight is read
            ctx.backend.check_environment(ctx, requested, facts)
            facts["backend"] = ctx.backend.name
        if ctx.quantizer is not None:
            requested = ctx.quantizer.update_device_map(requested)
        ctx.requested_device_map = requested
        facts["requested_device_map"] = requested
        return facts
