"""What every quantization backend answers: the fixed set of questions the stages ask.

A backend is one class in one module (or sub-package) of this package, picked by
`quant.backend` from the closed table in `stages/backends/__init__.py`. The stages ask it and never import a
backend's library: each backend imports its own library inside its methods, so a missing package is reported
by env_check (`check_environment`) instead of failing at import.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from transformers.quantizers.auto import AutoHfQuantizer

from pipeline.checkpoints.checkpoint import CheckpointError
from pipeline.core.placement import compact_names
from pipeline.core.schema import QuantConfig


class BackendUnavailable(RuntimeError):
    """The backend's package is missing here, or the scheme cannot run on this machine."""


def installed(packages: tuple[str, ...]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


class Backend:
    """One quantization backend. Defaults are transformers' own quantizer doing the work."""

    name: str = ""
    packages: tuple[str, ...] = ()  # the PyPI distributions it needs, with a minimum in `install`
    install: str = ""  # the pip command that installs them
    saved_methods: tuple[str, ...] = ()  # the `quant_method`s of the pre-quantized checkpoints it reads
    offload_hint: str = ""  # a setting that lets modules a map sends to cpu/disk stay unquantized, if any
    cannot_save: str | None = None  # why `save_pretrained` cannot write its weights, when it cannot

    def __init__(self, quant: QuantConfig | None = None) -> None:
        self.quant = quant

    # config
    def hf_config(self, quant: QuantConfig, dtype: torch.dtype) -> Any:
        """The transformers quantization config this setting asks for."""
        raise NotImplementedError

    def make_quantizer(self, config: Any, pre_quantized: bool) -> Any:
        return AutoHfQuantizer.from_config(config, pre_quantized=pre_quantized)

    # environment
    def missing_packages(self) -> dict[str, str | None]:
        found = installed(self.packages)
        return found if any(v is None for v in found.values()) else {}

    def check_environment(self, ctx: Any, device_map: Any, facts: dict[str, Any]) -> None:
        """Refuse, before any weight is read, a backend whose package is missing or a scheme that cannot run
        here; then transformers' own check."""
        missing = self.missing_packages()
        if missing:
            have = ", ".join(f"{k} {v or 'not installed'}" for k, v in missing.items())
            raise BackendUnavailable(
                f"quant={ctx.cfg.quant.name} needs the {self.name} backend's package(s): {have}. Fix: {self.install}, "
                "or pick another backend (quant=nf4, quant=none)"
            )
        reason = self.cannot_run(ctx)
        if reason:
            raise BackendUnavailable(f"quant={ctx.cfg.quant.name} cannot run here: {reason}")
        if ctx.quantizer is not None:
            ctx.quantizer.validate_environment(device_map=device_map, weights_only=True)

    @classmethod
    def saved_method(cls, saved: dict[str, Any]) -> str | None:
        """The method a saved quantization_config names in this backend's own spelling, if it is this one's."""
        return None

    def cannot_run(self, ctx: Any) -> str | None:
        """Why this scheme cannot run on this machine (a device, a dtype), or None."""
        return None

    def validate_map(self, quantizer: Any, device_map: Any) -> None:
        """transformers' own check of the computed device map."""
        quantizer.validate_environment(device_map=device_map)

    # modules and sizes
    def is_quantized_module(self, module: torch.nn.Module) -> bool:
        """Whether the skeleton's `module` is this backend's quantized placeholder."""
        return False

    def quantized_modules(self, model: Any, quantizer: Any) -> list[tuple[str, torch.nn.Module]]:
        """The skeleton's modules that will hold quantized weights, after `preprocess_model`."""
        return [(n, m) for n, m in model.named_modules() if self.is_quantized_module(m)]

    def quantizes(self, model: Any, quantizer: Any, name: str) -> bool:
        """Whether the load turns the full-precision tensor `name` into a quantized one (the plan's question)."""
        return not quantizer.pre_quantized and quantizer.param_needs_quantization(model, name)

    def cpu_kernel(self) -> str | None:
        """Which fast CPU quantization kernel of the backend's own ran in this process, if any (the record's
        `kernel` fact)."""
        return None

    def quant_state_bytes(self, param: Any, numel: int, shape: tuple[int, ...] | None = None) -> int:
        """Bytes a quantized weight keeps beside its data that `get_memory_footprint` does not count."""
        return 0

    def stored_bytes(self, model: Any, quantizer: Any, name: str, param: Any, numel: int) -> int:
        """Bytes the quantized weight `name` takes in `get_memory_footprint`."""
        return int(numel * quantizer.param_element_size(model, name, param))

    def held_bytes(self, model: Any, quantizer: Any, name: str, param: Any, numel: int) -> int:
        """Bytes the quantized weight `name` really holds once loaded: the storage of its quantized data plus its
        quantization state (pipeline/core/held.py measures the same after a load). By default the stored form is
        counted at its real size (bitsandbytes, HQQ) and the state beside it is what `quant_state_bytes` adds; a
        backend whose tensors report a logical dtype (torchao, quanto) says what its inner tensors take."""
        return self.stored_bytes(model, quantizer, name, param, numel) + self.quant_state_bytes(param, numel)

    def footprint_bytes(self, model: Any, quantizer: Any, name: str, param: Any) -> int:
        """Bytes `get_memory_footprint` will count for parameter or buffer `name` once loaded."""
        return int(param.numel() * quantizer.param_element_size(model, name, param))

    def module_sizes(self, model: Any, quantizer: Any) -> tuple[dict[str, int], dict[str, int]]:
        """accelerate's per-module sizes (all modules, leaves) with this backend's `footprint_bytes`."""
        from transformers.integrations.accelerate import compute_module_sizes

        backend = self

        class Sizes:  # the one hook compute_module_sizes asks a quantizer
            def param_element_size(self, model: Any, name: str, param: Any) -> float:
                return backend.footprint_bytes(model, quantizer, name, param) / max(param.numel(), 1)

        return compute_module_sizes(model, Sizes() if quantizer is not None else None)

    def transient_bytes(self, param: Any, numel: int) -> int:
        """Bytes quantizing one weight allocates beyond its stored form and state (the plan's convert cost)."""
        return 0

    def kernel_kind(self, param: Any) -> str | None:
        """The key of the fast CPU kernel `probe_kernels` measured for this weight, if any."""
        return None

    def probe_kernels(self, ctx: Any, device_map: dict[str, Any], kernel: str) -> dict[str, Any]:
        """Measure the fast CPU kernels the load will run (stages/stream/probe.py); none by default."""
        return {}

    # device map
    def check_device_map(self, ctx: Any, device_map: dict[str, Any], where: str, explicit: bool) -> None:
        """Refuse a map this backend cannot load: by default, quantized weights sent to disk."""
        if not explicit:
            return
        disk = [m for m, d in device_map.items() if d == "disk"]
        if disk:
            raise ValueError(
                f"{where} sends {compact_names(disk)} to disk, with quant={ctx.cfg.quant.name}: {self.name}'s "
                "quantized weights cannot be offloaded to disk. Map them to cpu or a GPU, or give the devices room "
                "(device_map.max_memory)"
            )

    def check_loaded_map(self, ctx: Any, device_map: dict[str, Any], quantized: list[str], top: list[str]) -> None:
        """The map accelerate computed, checked once the skeleton is quantized."""
        holding = quantized_on_disk(device_map, quantized)
        if holding:
            raise ValueError(
                f"the device map sends quantized modules ({compact_names(holding)}) to disk, where {self.name}'s "
                "weights cannot be offloaded; give the devices room (device_map.max_memory)"
            )

    # streaming
    def stored_transposed(self, model: Any, quantizer: Any, name: str) -> bool:
        """Whether the checkpoint holds `name` transposed against its quantized placeholder."""
        return False

    def quantize(
        self, model: Any, quantizer: Any, name: str, value: torch.Tensor, kernel: str, missing: set[str]
    ) -> dict[str, torch.Tensor]:
        """The tensors to place for the full-precision `value` of `name` (already on its device, in the run's
        dtype): transformers' quantize op, which may place the module's parameters itself (then {})."""
        op = quantizer.get_quantize_ops()
        return op.convert({name: [value]}, model=model, full_layer_name=name, missing_keys=missing) or {}

    def prequantized_groups(self, ctx: Any) -> Any:
        """The bounded streamer's reader for a checkpoint pre-quantized by this backend."""
        raise BackendUnavailable(
            f"{ctx.checkpoint.path}: a checkpoint pre-quantized with {self.name}, which the bounded streamer has "
            "no reader for: use stages/stream=transformers"
        )

    def check_prequantized(self, ctx: Any) -> None:
        """Checks on a pre-quantized checkpoint before transformers' loader reads it."""

    def finish(self, ctx: Any) -> None:
        """Anything the backend does after the stream (postprocess)."""


def quantized_on_disk(device_map: dict[str, Any], quantized: list[str]) -> list[str]:
    """The map's entries that send a quantized module (or a module holding one) to disk."""
    return [
        k
        for k, d in device_map.items()
        if d == "disk" and any(not k or q == k or q.startswith(k + ".") for q in quantized)
    ]


def stored_per_layer(
    ctx: Any, split: Callable[[str], tuple[str, str] | None], layers: list[str], need: set[str], what: str
) -> dict[str, set[str]]:
    """Per layer, the suffixes of the tensors a pre-quantized checkpoint's headers hold (`split` turns a key
    into (layer, suffix), or None for a key that is not quantization state); raises, before any weight is read,
    when one of `layers` lacks any of `need`: such a layer could only be loaded as garbage. `what` names the
    state in the message ("their quantization state", "their HQQ tensors")."""
    stored: dict[str, set[str]] = {}
    for key in ctx.checkpoint.tensor_names:
        if parts := split(key):
            stored.setdefault(parts[0], set()).add(parts[1])
    lacking = {n: sorted(gap) for n in sorted(layers) if (gap := need - stored.get(n, set()))}
    if lacking:
        layer, missing = next(iter(lacking.items()))
        raise CheckpointError(
            f"{ctx.checkpoint.path}: pre-quantized checkpoint: {len(lacking)} of {len(layers)} quantized layer(s) "
            f"lack {what}, e.g. {layer} has no {', '.join(missing)} (each layer stores {', '.join(sorted(need))}); "
            "the checkpoint is incomplete or its config.json quantization_config does not describe it"
        )
    return stored
