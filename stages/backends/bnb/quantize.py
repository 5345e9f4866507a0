"""How the bounded streamer turns one full-precision weight into its quantized parameter.

Two choices, picked by `stages.stream.kernel`:
- `quantizer`: transformers' own quantize op (`Params4bit(...).to(device)`, `Int8Params(...).to(device)`), which
  runs bitsandbytes' kernel for the device: its CUDA kernel on a GPU, its generic torch code on a CPU.
- `fast`: the same parameters built from `kernels.py`, our byte-identical CPU kernels, 20-40x faster than
  bitsandbytes' CPU path. Only for weights placed on the CPU; anything else goes to `quantizer`.
`auto` (the default) is `fast` for CPU-placed weights and `quantizer` elsewhere.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState, create_dynamic_map, get_4bit_type, name2qmap
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import get_module_from_name

from stages.backends.bnb import kernels


def quantize(model, quantizer, name: str, value: torch.Tensor, kernel: str) -> torch.Tensor:
    """The quantized parameter for `name` from its full-precision `value` (already on its device)."""
    if kernel == "quantizer" or value.device.type != "cpu":
        return quantizer.get_quantize_ops().convert({name: value}, model=model, full_layer_name=name)[name]
    module, _ = get_module_from_name(model, name)
    placeholder = model.get_parameter_or_buffer(name)
    if is_conv1d(module):  # as transformers' op does for GPT-2 style
        value = value.T
    if isinstance(placeholder, bnb.nn.Params4bit):
        return _params4bit(module, placeholder, value)
    if isinstance(placeholder, bnb.nn.Int8Params):
        return _int8params(placeholder, value)
    raise TypeError(f"{name}: no fast kernel for {type(placeholder).__name__}; use stages.stream.kernel=quantizer")


def is_conv1d(module) -> bool:
    """A bitsandbytes layer that replaced a `Conv1D` (GPT-2 style), whose checkpoint weight is (in, out)."""
    return issubclass(getattr(module, "source_cls", object), Conv1D)


def stored_transposed(model, quantizer, name: str) -> bool:
    """Whether the checkpoint holds `name` transposed against its quantized placeholder: a `Conv1D` weight that
    the quantize op (ours or transformers') transposes before quantizing."""
    if quantizer is None or quantizer.pre_quantized or not quantizer.param_needs_quantization(model, name):
        return False
    return is_conv1d(get_module_from_name(model, name)[0])


def _params4bit(module, placeholder: bnb.nn.Params4bit, w: torch.Tensor) -> bnb.nn.Params4bit:
    """What `Params4bit._quantize` builds through `bitsandbytes.functional.quantize_4bit`, with our kernel."""
    w = w.contiguous()
    packed, absmax = kernels.quantize_4bit(w, placeholder.blocksize, placeholder.quant_type, placeholder.quant_storage)
    code = get_4bit_type(placeholder.quant_type, device=w.device)
    common = dict(shape=w.shape, dtype=w.dtype, blocksize=placeholder.blocksize, code=code)
    if placeholder.compress_statistics:
        # bitsandbytes: offset = absmax.mean(); quantize_blockwise(absmax - offset, blocksize=256). The mean is
        # torch's, its bits too, with no parallel region; the rest is our kernel, same bytes, no centred copy.
        offset = kernels.serial_mean(absmax)
        qabsmax, state2 = _quantize_statistics(absmax, offset)
        state = QuantState(absmax=qabsmax, quant_type=placeholder.quant_type, offset=offset, state2=state2, **common)
    else:
        state = QuantState(absmax=absmax, quant_type=placeholder.quant_type, **common)
    module.quant_state = state
    module._is_hf_initialized = True
    return bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=placeholder.blocksize,
        compress_statistics=placeholder.compress_statistics,
        quant_type=placeholder.quant_type,
        quant_storage=placeholder.quant_storage,
        module=module,
        bnb_quantized=True,
    )


def _quantize_statistics(absmax: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, QuantState]:
    """What `bitsandbytes.functional.quantize_blockwise(absmax - offset, blocksize=256)` returns on CPU: the 8-bit
    codes and the nested state (its absmax, a copy of the dynamic code it quantized with)."""
    if "dynamic" not in name2qmap:  # the table bitsandbytes' call would make and keep
        name2qmap["dynamic"] = create_dynamic_map().to(absmax.device)
    code = name2qmap["dynamic"]
    qabsmax, absmax2 = kernels.quantize_blockwise(absmax, code, 256, offset)
    return qabsmax, QuantState(
        absmax=absmax2, code=code.to(absmax.device, copy=True), blocksize=256, dtype=absmax.dtype
    )


def _int8params(placeholder: bnb.nn.Int8Params, w: torch.Tensor) -> bnb.nn.Int8Params:
    """What `Int8Params._quantize` builds (fp16 rows, per-row absmax scale), with our kernel."""
    if placeholder.has_fp16_weights:
        return bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=True)
    cb, scb, _ = kernels.int8_vectorwise_quant(w.contiguous().to(torch.float16))
    return bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
