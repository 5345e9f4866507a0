"""Dtype names users write, mapped to torch dtypes by a fixed table (never `getattr(torch, name)`)."""

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
SAFETENSORS_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def torch_dtype(name: object, key: str) -> torch.dtype:
    """The torch dtype for `name`; the error names the config key and the valid names."""
    name = getattr(name, "value", name)  # a DtypeName enum member or its string
    if isinstance(name, torch.dtype) and name in SAFETENSORS_DTYPE:
        return name
    if name not in TORCH_DTYPES:
        raise ValueError(f"{key}={name!r} is not a dtype; valid: {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]
