"""Pre-quantized HQQ checkpoints (written by transformers' `save_pretrained`): each quantized layer's stored
tensors (the packed W_q, scale, zero, the bias, and the settings hqq encodes as small tensors), checked against
the model before any weight is read, gathered per layer while streaming, and made into the `HQQLinear` that
hqq's own `load_state_dict` would make of them.

Why our own decoding: hqq's `load_state_dict` turns the stored `compute_dtype` and `unpack_view_dtype` strings
into dtypes with `eval`, which would run whatever a checkpoint writes there; a checkpoint is untrusted input.
Here every setting is decoded from a closed table and checked (dtype names, packing, nbits, shapes), and the
layer is built from the decoded values. transformers 5.24 itself cannot load these checkpoints on a CPU (its
HQQ quantizer has no load operation: every HQQ tensor is "unexpected", every weight "missing", left random),
so tests/test_hqq.py compares against the model that was saved and hqq's own `load_state_dict` of the same
tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.integrations.accelerate import get_device

from pipeline.checkpoints.checkpoint import CheckpointError
from pipeline.core.context import LoadContext
from stages.backends.base import stored_per_layer
from stages.backends.hqq import packed_bytes

# what HQQLinear.state_dict writes per layer (hqq/core/quantize.py state_dict_keys); bias only when it has one
STATE = (
    "W_q",
    "nbits",
    "group_size",
    "shape",
    "scale",
    "zero",
    "axis",
    "packing",
    "unpack_view_dtype",
    "view_as_float",
    "quant_scale",
    "quant_zero",
    "compute_dtype",
    "bias",
    "offload_meta",
    "encoded_state_dict",
    "stores_quant_config",
    "channel_wise",
    "optimize",
    "round_zero",
)
REQUIRED = {"W_q", "nbits", "group_size", "shape", "scale", "zero", "axis", "packing"}
FLAGS = ("view_as_float", "quant_scale", "quant_zero", "offload_meta", "channel_wise", "optimize", "round_zero")
# the dtype names hqq writes (str(torch.dtype)), decoded by table, never evaluated
DTYPES = {
    "torch.float16": torch.float16,
    "torch.bfloat16": torch.bfloat16,
    "torch.float32": torch.float32,
    "torch.uint8": torch.uint8,
    "torch.int32": torch.int32,
}


def _split(key: str) -> tuple[str, str] | None:
    module, _, suffix = key.rpartition(".")
    return (module, suffix) if module and suffix in STATE else None


def quantized_layers(ctx: LoadContext) -> list[str]:
    """The skeleton's linear layers transformers' HQQ quantizer tagged (`quant_config`): what the checkpoint
    must hold quantized."""
    return [
        n
        for n, m in ctx.model.named_modules()
        if isinstance(m, torch.nn.Linear) and getattr(m, "quant_config", None) is not None
    ]


def stored_state(ctx: LoadContext) -> dict[str, set[str]]:
    """Per quantized layer, the HQQ tensors the shard headers hold; raises, before anything is read, when a
    layer lacks what it needs (it could only load as garbage)."""
    layers = quantized_layers(ctx)
    return stored_per_layer(ctx, _split, layers, REQUIRED, "their HQQ tensors")


def _text(t: torch.Tensor) -> str:
    return "".join(chr(int(i)) for i in t.reshape(-1).tolist())


def _int(t: torch.Tensor) -> int:
    return int(t.reshape(-1)[0].item())


def decode(module: str, group: dict[str, torch.Tensor], linear: torch.nn.Linear, where: str) -> dict[str, Any]:
    """One layer's stored tensors as the W_q, bias, meta and weight settings hqq's layer holds, each checked
    (the message names the layer and the key)."""
    from hqq.core.quantize import Quantizer

    def bad(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{where}: {module}.{key}: {why}")

    nbits, group_size, axis = _int(group["nbits"]), _int(group["group_size"]), _int(group["axis"])
    if nbits not in (1, 2, 3, 4, 8):
        raise bad("nbits", f"{nbits}; HQQ packs 1, 2, 3, 4 or 8 bits")
    packing = _text(group["packing"])
    if packing != Quantizer.bit_to_packing[nbits]:
        raise bad("packing", f"{packing!r} for {nbits} bits; hqq packs them as {Quantizer.bit_to_packing[nbits]!r}")
    dtypes = {}
    for key in ("compute_dtype", "unpack_view_dtype"):
        if key in group:
            name = _text(group[key])
            if name not in DTYPES:
                raise bad(key, f"{name!r}; valid: {', '.join(DTYPES)}")
            dtypes[key] = DTYPES[name]
    shape = torch.Size(group["shape"].tolist())
    if shape != linear.weight.shape:
        raise bad("shape", f"{tuple(shape)}; the model's layer is {tuple(linear.weight.shape)}")
    numel = shape.numel()
    if axis not in (0, 1) or group_size <= 0 or numel % group_size:
        raise bad("group_size", f"{group_size} (axis {axis}) does not divide the weight's {numel} values")
    w_q = group["W_q"]
    want = Quantizer.unpack_view_dtype[packing]
    if w_q.dtype != want or w_q.numel() * w_q.element_size() != packed_bytes(numel, nbits, group_size, axis):
        raise bad("W_q", f"{tuple(w_q.shape)} {w_q.dtype}; {nbits}-bit {tuple(shape)} packs into {want}")
    groups = (numel // group_size, 1) if axis == 1 else (1, numel // group_size)
    for key in ("scale", "zero"):
        t = group[key]
        if tuple(t.shape) != groups or not t.dtype.is_floating_point:
            raise bad(key, f"{tuple(t.shape)} {t.dtype}; expected a float {groups}, one per group of {group_size}")
    flags = {k: bool(_int(group[k])) for k in FLAGS if k in group}
    if flags.get("quant_scale") or flags.get("quant_zero") or flags.get("offload_meta"):
        raise bad("quant_scale", "quantized or offloaded scale/zero (deprecated in hqq) are not read")
    bias = group.get("bias")
    if (bias is None) != (linear.bias is None):
        raise bad("bias", "stored" if bias is not None else "missing, the model's layer has one")
    meta = {
        "nbits": nbits,
        "group_size": group_size,
        "shape": shape,
        "scale": group["scale"],
        "zero": group["zero"],
        "axis": axis,
        "packing": packing,
        "unpack_view_dtype": dtypes.get("unpack_view_dtype", want),
        "view_as_float": flags.get("view_as_float", False),
        "quant_scale": False,
        "quant_zero": False,
    }
    if "compute_dtype" in dtypes:
        meta["compute_dtype"] = dtypes["compute_dtype"]
    # hqq's load_state_dict keeps every stored setting in meta, the weight's quant params too
    meta.update({k: flags[k] for k in ("channel_wise", "optimize", "round_zero") if k in flags})
    weight_params = {
        "nbits": nbits,
        "channel_wise": flags.get("channel_wise", True),
        "group_size": group_size,
        "optimize": flags.get("optimize", True),
        "round_zero": flags.get("round_zero", False),
        "axis": axis,
        "view_as_float": meta["view_as_float"],
    }
    return {"W_q": w_q, "bias": bias, "meta": meta, "weight_quant_params": weight_params}


def make_layer(decoded: dict[str, Any], compute_dtype: torch.dtype, device: str) -> Any:
    """The HQQLinear hqq's `load_state_dict` makes of these values (its steps, without its `eval`)."""
    from hqq.core.quantize import HQQLinear

    config = {"weight_quant_params": decoded["weight_quant_params"], "scale_quant_params": None,
              "zero_quant_params": None, "offload_meta": False}  # fmt: skip
    layer = HQQLinear(None, config, del_orig=True, compute_dtype=compute_dtype, device=device, initialize=False)
    layer.quant_config = {**config}
    del layer.quant_config["offload_meta"]  # popped by HQQLinear's constructor
    layer.W_q, layer.bias, layer.offload_meta, layer.meta = decoded["W_q"], decoded["bias"], False, decoded["meta"]
    layer.cuda(device)  # scale, zero and bias to the compute dtype, W_q a Parameter, as load_state_dict ends
    layer.ready = True
    layer.in_features, layer.out_features = layer.meta["shape"][::-1]
    return layer


class PrequantizedGroups:
    """Collects each quantized layer's stored HQQ tensors until its set is complete, then swaps the skeleton's
    layer for the HQQLinear they make (nothing to place: the layer holds them)."""

    def __init__(self, ctx: LoadContext) -> None:
        self.ctx = ctx
        self.expected = stored_state(ctx)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def claims(self, key: str) -> bool:
        split = _split(key)
        return split is not None and split[0] in self.expected and split[1] in self.expected[split[0]]

    def add(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        module, suffix = _split(key)
        group = self.pending.setdefault(module, {})
        group[suffix] = tensor
        if set(group) != self.expected[module]:
            return {}
        del self.pending[module]
        ctx = self.ctx
        linear = ctx.model.get_submodule(module)
        device = str(get_device(ctx.load_config.device_map, f"{module}.weight", valid_torch_device=True))
        decoded = decode(module, group, linear, str(ctx.checkpoint.path))
        layer = make_layer(decoded, ctx.dtype, device)
        layer.name = getattr(linear, "name", module)
        parent, _, child = module.rpartition(".")
        setattr(ctx.model.get_submodule(parent) if parent else ctx.model, child, layer)
        ctx.loading_info.missing_keys.discard(f"{module}.weight")
        ctx.loading_info.missing_keys.discard(f"{module}.bias")
        return {}
