"""What a loaded model really holds in memory, measured: the storage of every tensor it reaches, per device.

`get_memory_footprint()` counts each parameter and buffer as `numel * element_size`: torchao's and
optimum-quanto's tensor subclasses report the element size of their logical dtype (a 1-byte int8 weight is
counted at 2 bytes in fp16), and bitsandbytes' absmax or HQQ's scale and zero, which live beside the
parameter (`Params4bit.quant_state`, `HQQLinear.meta`), are not counted at all. This walks what the modules
hold instead: parameters and buffers, the inner tensors of a tensor subclass (`__tensor_flatten__`, the
protocol torch.compile uses to see through torchao's and quanto's tensors, followed down: quanto's packed
data is itself a subclass), the objects tensors and modules carry (a bnb `QuantState` and its nested state,
`Int8Params.SCB`, HQQ's `meta` dict), and adds each distinct storage once (tied weights share one).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch


def _is_subclass(t: torch.Tensor) -> bool:
    """A wrapper tensor whose bytes are in its inner tensors (torchao, quanto), not in its own storage."""
    return hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter)


def held_bytes(model: torch.nn.Module) -> dict[str, int]:
    """{device: bytes} of the distinct storages of every tensor `model` reaches (meta tensors hold nothing)."""
    storages: dict[tuple[str, int], int] = {}
    seen: dict[int, Any] = {}  # id -> the object, kept alive so that no id is reused by a later temporary dict

    def visit(obj: Any) -> None:
        if id(obj) in seen or isinstance(obj, (torch.nn.Module, type, str, bytes, int, float, bool)) or obj is None:
            return  # modules are walked one by one below
        seen[id(obj)] = obj
        if isinstance(obj, torch.Tensor):
            if _is_subclass(obj):
                for inner in obj.__tensor_flatten__()[0]:
                    visit(getattr(obj, inner))
            elif obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[(str(obj.device), storage.data_ptr())] = storage.nbytes()
            attrs = getattr(obj, "__dict__", None)  # quant_state, SCB, ...
            if isinstance(attrs, dict):
                visit(attrs)
        elif isinstance(obj, dict):
            for value in list(obj.values()):
                visit(value)
        elif isinstance(obj, (list, tuple, set)):
            for value in obj:
                visit(value)
        elif isinstance(getattr(obj, "__dict__", None), dict):  # a QuantState, its nested state2, ...
            visit(vars(obj))

    for module in model.modules():
        visit(module._parameters)
        visit(module._buffers)
        visit({k: v for k, v in vars(module).items() if not k.startswith("_")})  # HQQ's meta, bnb's quant_state
    per_device: Counter = Counter()
    for (device, _), nbytes in storages.items():
        per_device["cpu" if device == "cpu" else device.removeprefix("cuda:")] += nbytes
    return dict(per_device)
