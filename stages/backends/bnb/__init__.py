"""bitsandbytes: 4-bit (nf4/fp4, optionally double-quantized) and LLM.int8(), through transformers'
`BitsAndBytesConfig`; on the CPU our byte-identical kernels (kernels.py, quantize.py) replace its slow
generic path; pre-quantized checkpoints are read layer by layer (prequantized.py)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from pipeline.core.dtypes import torch_dtype
from pipeline.core.lazy_compile import compile_on_first_call
from pipeline.core.placement import OFFLOAD_DEVICES, as_override, compact_names, device_of
from pipeline.core.schema import BnbQuantConfig, DtypeName, QuantMethod
from stages.backends.base import Backend, BackendUnavailable, quantized_on_disk

STORAGE = {"uint8": torch.uint8, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _quantize_4bit(x: torch.Tensor, blocksize: int, quant_type: str) -> Any:
    from stages.backends.bnb import kernels

    return kernels.quantize_4bit(x, blocksize, quant_type)


class BnbBackend(Backend):
    name = "bitsandbytes"
    packages = ("bitsandbytes",)
    install = "pip install -U 'bitsandbytes>=0.48' (CPU support)"
    saved_methods = ("bitsandbytes",)
    offload_hint = (
        " (with device_map=explicit and quant.llm_int8_enable_fp32_cpu_offload=true, which keeps them unquantized)"
    )

    @classmethod
    def saved_method(cls, saved: dict[str, Any]) -> str | None:
        return "bitsandbytes" if saved.get("load_in_4bit") or saved.get("load_in_8bit") else None

    def hf_config(self, quant: BnbQuantConfig, dtype: torch.dtype) -> Any:
        from transformers import BitsAndBytesConfig

        compute = (
            dtype
            if quant.bnb_4bit_compute_dtype == DtypeName.auto
            else torch_dtype(quant.bnb_4bit_compute_dtype, "quant.bnb_4bit_compute_dtype")
        )
        return BitsAndBytesConfig(
            load_in_4bit=quant.method == QuantMethod.bnb_4bit,
            load_in_8bit=quant.method == QuantMethod.bnb_8bit,
            bnb_4bit_quant_type=quant.bnb_4bit_quant_type.value,
            bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=STORAGE[quant.bnb_4bit_quant_storage.value],
            llm_int8_threshold=quant.llm_int8_threshold,
            llm_int8_has_fp16_weight=quant.llm_int8_has_fp16_weight,
            llm_int8_skip_modules=list(quant.llm_int8_skip_modules) if quant.llm_int8_skip_modules else None,
            llm_int8_enable_fp32_cpu_offload=quant.llm_int8_enable_fp32_cpu_offload,
        )

    def check_environment(self, ctx: Any, device_map: Any, facts: dict[str, Any]) -> None:
        """transformers' own check that bitsandbytes is installed and has a backend for a device here, its
        message prefixed with what was asked, what is installed and the two ways out."""
        try:
            if not self.missing_packages():  # else the base class says which package is missing
                with compile_on_first_call():  # its import-time torch.compile: ~0.85 s of ~0.9 s
                    import bitsandbytes  # noqa: F401  (transformers' check below imports it first otherwise)
            super().check_environment(ctx, device_map, facts)
        except (ImportError, RuntimeError) as err:
            if isinstance(err, BackendUnavailable) and "cannot run here" in str(err):
                raise
            here = "cuda, cpu" if facts["devices"]["cuda"] else "cpu"
            installed = facts["versions"].get("bitsandbytes") or "not installed"
            raise BackendUnavailable(
                f"quant={ctx.cfg.quant.name} needs bitsandbytes with a backend for a device here ({here}); "
                f"bitsandbytes: {installed}. Fix: {self.install}, or load unquantized with quant=none. "
                f"transformers says: {err}"
            ) from None
        facts["bnb_backend"] = "cuda" if torch.cuda.is_available() else "cpu"

    def is_quantized_module(self, module: torch.nn.Module) -> bool:
        return type(module).__module__.startswith("bitsandbytes")

    def quant_state_bytes(self, param: Any, numel: int, shape: tuple[int, ...] | None = None) -> int:
        """absmax per block (4-bit: float32; double-quantized: uint8 plus the second-level state, a float32
        absmax per 256 blocks, its offset and its own 256-entry float32 code), the 16-entry code, or int8's
        per-row scale."""
        if hasattr(param, "blocksize") and hasattr(param, "compress_statistics"):
            blocks = -(-numel // param.blocksize)
            if param.compress_statistics:
                return blocks + 4 * -(-blocks // 256) + 4 + 4 * 256 + 64
            return 4 * blocks + 64
        if type(param).__name__ == "Int8Params":
            return 4 * param.shape[0]
        return 0

    def transient_bytes(self, param: Any, numel: int) -> int:
        if getattr(param, "compress_statistics", False):  # float32 absmax, then absmax - offset, then shrunk
            return 2 * 4 * -(-numel // param.blocksize)
        return 0

    def kernel_kind(self, param: Any) -> str | None:
        return "int8" if type(param).__name__ == "Int8Params" else "4bit"

    def probe_kernels(self, ctx: Any, device_map: dict[str, Any], kernel: str) -> dict[str, Any]:
        from stages.backends.bnb import kernels
        from stages.stream.probe import probe

        if ctx.quantizer is None or ctx.quantizer.pre_quantized or kernel == "quantizer":
            return {}
        for name, param in ctx.model.named_parameters():
            on_cpu = str(device_of(device_map, name.rpartition(".")[0])) == "cpu"
            if not on_cpu or not ctx.quantizer.param_needs_quantization(ctx.model, name):
                continue
            if hasattr(param, "blocksize"):
                call = partial(_quantize_4bit, blocksize=param.blocksize, quant_type=param.quant_type)
                return {"4bit": probe(call, ctx.dtype)}
            cast = 2 if ctx.dtype != torch.float16 else 0
            return {"int8": probe(lambda x: kernels.int8_vectorwise_quant(x.to(torch.float16)), ctx.dtype, cast)}
        return {}

    def check_device_map(self, ctx: Any, device_map: dict[str, Any], where: str, explicit: bool) -> None:
        """bitsandbytes keeps quantized weights either all on the CPU or on accelerators. A map that sends some
        modules to `cpu` or `disk` next to others (a GPU, or the disk next to the CPU) needs
        `llm_int8_enable_fp32_cpu_offload`, under which transformers leaves the modules an *explicit* map sends
        to cpu/disk unquantized."""
        quant = ctx.cfg.quant
        if ctx.quantizer is None or set(device_map.values()) <= {"cpu"}:
            return
        off = [m for m, d in device_map.items() if d in OFFLOAD_DEVICES]
        if not off or quant.llm_int8_enable_fp32_cpu_offload:
            return
        places = "/".join(sorted({str(device_map[m]) for m in off}))
        elsewhere = sorted({str(v) for v in device_map.values()} - {str(device_map[m]) for m in off})
        raise ValueError(
            f"{where} sends {compact_names(off)} to {places}"
            + (f" next to modules on {', '.join(elsewhere)}" if elsewhere else "")
            + f", with quant={quant.name}: bitsandbytes keeps quantized weights all on the CPU or all on "
            "accelerators. Either give the devices room (device_map.max_memory), or set "
            "quant.llm_int8_enable_fp32_cpu_offload=true with an explicit map (device_map=explicit "
            "device_map.map=...): the modules it sends to cpu/disk then stay unquantized"
        )

    def check_loaded_map(self, ctx: Any, device_map: dict[str, Any], quantized: list[str], top: list[str]) -> None:
        """A policy map (auto, balanced, ...) is computed after the skeleton is quantized, so under it the
        offloaded modules are still quantized placeholders: a quantized weight written to disk comes back
        unusable, so that case is refused."""
        holding = quantized_on_disk(device_map, quantized)
        if holding:
            raise ValueError(
                f"the device map sends quantized modules ({compact_names(holding)}) to disk, where bitsandbytes' "
                "weights cannot be offloaded. Under quant.llm_int8_enable_fp32_cpu_offload=true, only modules an "
                "explicit map sends to cpu/disk stay unquantized: use this map as an explicit one, "
                f"{as_override(device_map, top)}, or give the devices room (device_map.max_memory)"
            )

    def cpu_kernel(self) -> str | None:
        from stages.backends.bnb import kernels

        return kernels.describe() if kernels.used() else None

    def stored_transposed(self, model: Any, quantizer: Any, name: str) -> bool:
        from stages.backends.bnb.quantize import stored_transposed

        return stored_transposed(model, quantizer, name)

    def quantize(
        self, model: Any, quantizer: Any, name: str, value: torch.Tensor, kernel: str, missing: set[str]
    ) -> dict[str, torch.Tensor]:
        from stages.backends.bnb.quantize import quantize

        return {name: quantize(model, quantizer, name, value, kernel)}

    def prequantized_groups(self, ctx: Any) -> Any:
        from stages.backends.bnb.prequantized import PrequantizedGroups

        return PrequantizedGroups(ctx)

    def check_prequantized(self, ctx: Any) -> None:
        from stages.backends.bnb.prequantized import stored_state

        stored_state(ctx)  # every quantized layer's state is in the checkpoint, checked before reading
