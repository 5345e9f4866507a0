"""The dtype tables: names users write and safetensors header names, mapped to torch dtypes by fixed tables
(never `getattr(torch, name)`)."""

from __future__ import annotations

import torch

TORCH_DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
# a safetensors header's dtype names
SAFETENSORS = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_DTYPE = {dtype: name for name, dtype in SAFETENSORS.items()}


def torch_dtype(name: object, key: str) -> torch.dtype:
    """The torch dtype for `name`; the error names the config key and the valid names."""
    name = getattr(name, "value", name)  # a DtypeName enum member or its string
    if isinstance(name, torch.dtype) and name in TORCH_DTYPES.values():
        return name
    if name not in TORCH_DTYPES:
        raise ValueError(f"{key}={name!r} is not a dtype; valid: {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]
