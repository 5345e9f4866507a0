"""hqq's quantization of one weight on the CPU, bit for bit, in a fraction of its time and memory.

hqq's `Quantizer.quantize` with its default optimizer (`optimize_weights_proximal_legacy`) makes a float32 copy
of the weight and, for up to 20 iterations, about twenty full-size float32 temporaries: on a CPU each op streams
the whole weight through memory, and the process briefly holds several times the weight. This module runs
the same ops, in the same order, on the same float32 values, on blocks of rows that stay in the CPU's cache,
into buffers allocated once; the fp16 -> fp32 conversion is exact, so each block is converted when it is used.
Two things are not blocked, because blocking would change their result: the early-stopping error is the mean
of the whole |W_f - W_r| (a float32 reduction whose summation order depends on the tensor's size), so its
elements are written into one full-size buffer and reduced there, as hqq does; and the per-group means are
row reductions, which blocking by rows leaves alone. tests/test_hqq.py checks W_q, scale and zero equal to
hqq's own `HQQLinear` for each nbits, several group sizes and shapes.

Only hqq's default path is done here (channel-wise groups, optimizer on, packed, no quantized scale/zero,
no offloaded meta, axis 1, a CPU); `fast_settings` says when, and anything else goes to `HQQLinear` itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

# Elements per block: at most torch's parallel grain size (32768), so each op on a block runs on the calling thread
# (small OpenMP regions stall on a busy machine) and blocks are spread over our own threads instead; 128 KB of
# float32 per buffer, four buffers and the block's input stay in a core's L2 cache.
BLOCK_ELEMENTS = 1 << 15

# hqq's optimize_weights_proximal_legacy defaults (hqq/core/optimize.py)
LP_NORM, BETA, ITERS = 0.7, 1e1, 20


def fast_settings(quant_config: dict[str, Any], device: str) -> dict[str, Any] | None:
    """The weight settings when this module reproduces hqq for `quant_config`, else None (use HQQLinear)."""
    params = quant_config.get("weight_quant_params") or {}
    if (
        torch.device(device).type != "cpu"
        or quant_config.get("scale_quant_params") is not None
        or quant_config.get("zero_quant_params") is not None
        or quant_config.get("offload_meta")
        or params.get("nbits") not in (1, 2, 3, 4, 8)
        or params.get("group_size") is None
        or params.get("axis") != 1
        or not params.get("channel_wise", True)
        or not params.get("optimize", True)
        or params.get("view_as_float", False)
    ):
        return None
    return params


def _blocks(rows: int, width: int, threads: int) -> list[list[slice]]:
    """Row blocks of at most BLOCK_ELEMENTS, in `threads` contiguous runs (one per thread)."""
    step = max(1, BLOCK_ELEMENTS // width)
    blocks = [slice(r, min(r + step, rows)) for r in range(0, rows, step)]
    per = -(-len(blocks) // threads)
    return [blocks[i : i + per] for i in range(0, len(blocks), per)]


def _each(pool: ThreadPoolExecutor | None, fn: Callable[[list[slice]], None], runs: list[list[slice]]) -> None:
    if pool is None:
        for run in runs:
            fn(run)
    else:
        list(pool.map(fn, runs))  # list(): raises a worker's exception here


def quantize_weight(
    weight: torch.Tensor, nbits: int, group_size: int, round_zero: bool = False
) -> tuple[torch.Tensor, dict[str, Any]]:
    """`hqq.core.quantize.Quantizer.quantize(weight, nbits, channel_wise=True, group_size, optimize=True,
    round_zero, axis=1, bitpack=True)` on a CPU: the packed W_q and its meta (scale and zero in float32, as hqq
    leaves them before `HQQLinear` casts them to the compute dtype). Axis 1 only: hqq's axis-0 group means
    reduce down columns, in another summation order than a row block's."""
    from hqq.core.quantize import Quantizer

    shape = weight.shape
    if weight.numel() % group_size:  # hqq asserts the same
        raise ValueError(f"HQQ group_size {group_size} does not divide the weight's {tuple(shape)} values")
    # one group per row, hqq reduces along axis 1; detached rather than under inference_mode, which is per thread
    src = weight.detach().reshape([-1, group_size])
    lo, hi = 0, round(2**nbits - 1)
    blocks = -(-src.numel() // BLOCK_ELEMENTS)
    threads = max(1, min(torch.get_num_threads(), blocks // 4))  # a pool pays off from a few blocks a thread
    runs = _blocks(src.shape[0], group_size, threads)
    with ThreadPoolExecutor(len(runs)) if len(runs) > 1 else contextlib.nullcontext() as pool:
        low, high = torch.empty(src.shape[0], 1), torch.empty(src.shape[0], 1)

        def min_max(run: list[slice]) -> None:
            for b in run:
                low[b] = src[b].float().min(axis=1, keepdim=True)[0]
                high[b] = src[b].float().max(axis=1, keepdim=True)[0]

        _each(pool, min_max, runs)
        _min, _max = low, high
        denom = _max - _min
        scale = hi / denom
        scale = torch.where(denom.abs() <= 1e-4, torch.full_like(scale, 1.0), scale)
        scale = scale.clamp(max=2e4)
        zero = -_min * scale
        if round_zero:
            zero = torch.round(zero)

        zero = _optimize(pool, src, runs, scale, zero, lo, hi)

        w_q = torch.empty(src.shape, dtype=torch.uint8)  # values 0..2**nbits - 1: exact in uint8

        def final(run: list[slice]) -> None:
            for b in run:
                w_q[b] = torch.round(src[b].float() * scale[b] + zero[b]).clamp_(lo, hi)

        _each(pool, final, runs)
    scale = 1.0 / scale
    meta = {
        "nbits": nbits,
        "group_size": group_size,
        "shape": shape,
        "scale": scale,
        "zero": zero,
        "axis": 1,
        "packing": Quantizer.bit_to_packing[nbits],
    }
    meta["unpack_view_dtype"] = Quantizer.unpack_view_dtype[meta["packing"]]
    meta["view_as_float"] = False
    return Quantizer.pack[meta["packing"]](w_q), meta


def _optimize(
    pool: ThreadPoolExecutor | None,
    src: torch.Tensor,
    runs: list[list[slice]],
    scale: torch.Tensor,
    zero: torch.Tensor,
    lo: int,
    hi: int,
) -> torch.Tensor:
    """hqq's `optimize_weights_proximal_legacy` (its steps quoted beside each line), block by block: the zero
    point after the iteration whose error stopped improving, as hqq returns it."""
    errors = torch.empty(src.shape)  # |W_f - W_r|, reduced whole as hqq does
    best = torch.tensor(torch.inf)
    for _ in range(ITERS):
        new_zero = torch.empty_like(zero)

        def iterate(run: list[slice], zero: torch.Tensor = zero, new_zero: torch.Tensor = new_zero) -> None:
            buf = [torch.empty(run[0].stop - run[0].start, src.shape[1]) for _ in range(4)]
            for b in run:
                wf = src[b].float()  # W_f = tensor.to(float32)
                wq, wr, x, out = (t[: b.stop - b.start] for t in buf)
                s, z = scale[b], zero[b]
                torch.mul(wf, s, out=wq).add_(z).round_().clamp_(lo, hi)  # W_q = round(W_f * scale + zero).clamp_
                torch.sub(wq, z, out=wr).div_(s)  # W_r = (W_q - zero) / scale
                torch.sub(wf, wr, out=x)  # shrink_lp_op(W_f - W_r, beta, lp_norm):
                torch.abs(x, out=out)  # out = abs(x)
                errors[b] = out  # current_error = abs(W_f - W_r).mean()
                torch.pow(out, LP_NORM - 1, out=wr).mul_(1.0 / BETA)  # (1.0 / beta) * out.pow(lp_norm - 1)
                out.sub_(wr).clamp_min_(0.0).mul_(torch.sign(x, out=x))  # .sub_(..).clamp_min_(0.0).mul_(sign(x))
                torch.sub(wf, out, out=x).mul_(s)  # (W_f - W_e) * scale
                torch.sub(wq, x, out=x)  # W_q - (W_f - W_e) * scale
                new_zero[b] = torch.mean(x, axis=1, keepdim=True)  # zero = mean(..., axis=axis, keepdim=True)

        _each(pool, iterate, runs)
        zero = new_zero
        current = errors.mean().float()
        if current < best:
            best = current
        else:
            break
    return zero


def make_layer(
    weight: torch.Tensor, bias: torch.Tensor | None, quant_config: dict[str, Any], compute_dtype: torch.dtype
) -> Any:
    """The `HQQLinear` that `HQQLinear(linear, quant_config, compute_dtype=..., device="cpu")` makes of this
    weight and bias, quantized by `quantize_weight`; its own constructor does the rest (casts, bias, flags)."""
    from hqq.core.quantize import HQQLinear

    params = fast_settings(quant_config, "cpu")
    assert params is not None, "make_layer: settings outside hqq's default path; use HQQLinear"
    layer = HQQLinear(None, quant_config, del_orig=True, compute_dtype=compute_dtype, device="cpu", initialize=False)
    del layer.linear_layer  # as HQQLinear deletes the layer it quantized
    w_q, meta = quantize_weight(weight, params["nbits"], params["group_size"], params.get("round_zero", False))
    layer.in_features, layer.out_features = weight.t().shape
    meta.update({"quant_scale": False, "quant_zero": False})
    layer.W_q, layer.meta = w_q, meta
    layer.cuda("cpu")  # HQQLinear.quantize's last step: scale/zero to the compute dtype, W_q a Parameter
    layer.ready = True
    layer.bias = None if bias is None else bias.clone().to(device="cpu", dtype=compute_dtype)
    return layer
