"""Quantization rate on the CPU: bitsandbytes' ops vs our bnb kernels, in GB/s of input; then every backend's
per-tensor quantize side by side (--backends-only: that table alone), hqq's own `HQQLinear` beside our
bit-identical CPU path (stages/backends/hqq/quantize.py), each checked equal.

    python benchmarks/quantize_rate.py [--threads N] [--repeat N] [--page-cache-mib N] [--backends-only]

Llama-7B shaped fp16 weights (4096x4096, 11008x4096); every row also checks that both give the
same bytes.  Double quantization (compress_statistics: the 4-bit absmax minus its mean, quantized
blockwise with the 8-bit dynamic code) is timed in its parts, bitsandbytes' and ours: torch's mean (kept
in ours: its bits follow torch's thread count), the subtraction, quantize_blockwise. Reading a file from
the page cache is timed too: it bounds how fast weights can stream in.  Times are the best of N; on a
shared machine the median also says how much waiting for a core costs (torch's OpenMP threads in the mean).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections.abc import Callable

import bitsandbytes.functional as F
import torch

from stages.backends.bnb import kernels
from stages.backends.hqq import quantize as hqq_fast

SHAPES = [(4096, 4096), (11008, 4096)]


def best_seconds(repeat: int, fn: Callable[..., object], *args: object) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def seconds(repeat: int, fn: Callable[..., object], *args: object) -> tuple[float, float]:
    """(best, median) of `repeat` timed calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]


def same_bytes(a: tuple, b: tuple) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    pairs = [(x, y) for x, y in zip(a, b, strict=True) if isinstance(x, torch.Tensor)]
    return all(x.shape == y.shape and torch.equal(raw(x), raw(y)) for x, y in pairs)


def page_cache_rate(mib: int) -> float:
    """GB/s of the second of two reads of a fresh temp file (the first puts it in the page cache)."""
    buf = bytearray(mib << 20)
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR", "/tmp")) as f:
        f.write(os.urandom(1 << 20) * mib)
        f.flush()
        seconds = float("inf")
        for _ in range(2):
            with open(f.name, "rb", buffering=0) as r:
                start = time.perf_counter()
                r.readinto(buf)
                seconds = time.perf_counter() - start
    return len(buf) / 1e9 / seconds


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    """An nn.Linear holding `w` (no copy): what each backend's op quantizes."""
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    return lin


def backend_ops() -> dict[str, Callable[[torch.Tensor], object]]:
    """One full-precision weight -> its quantized form, with each backend's own code (what the stream runs)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8
    from optimum.quanto import quantize as quanto_quantize
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    def torchao(config):
        return lambda w: quantize_(_linear(w), config)

    def quanto(qtype):
        def op(w):
            lin = _linear(w)
            quanto_quantize(lin, weights=qtype)
            freeze(lin)

        return op

    def hqq(nbits, group):
        config = BaseQuantizeConfig(nbits=nbits, group_size=group, axis=1)
        return lambda w: HQQLinear(_linear(w), config, compute_dtype=w.dtype, device="cpu")

    def hqq_ours(nbits, group):
        config = BaseQuantizeConfig(nbits=nbits, group_size=group, axis=1)
        return lambda w: hqq_fast.make_layer(w, None, config, w.dtype)

    return {
        "bnb/nf4 (ours)": lambda w: kernels.quantize_4bit(w, 64, "nf4"),
        "bnb/int8 (ours)": lambda w: kernels.int8_vectorwise_quant(w),
        "torchao/int8_weight_only": torchao(Int8WeightOnlyConfig()),
        "torchao/float8_weight_only": torchao(Float8WeightOnlyConfig()),
        "quanto/int8": quanto(qint8),
        "quanto/int4": quanto(qint4),
        "quanto/int2": quanto(qint2),
        "quanto/float8": quanto(qfloat8),
        "hqq/b8_g64 (HQQLinear)": hqq(8, 64),
        "hqq/b8_g64 (ours)": hqq_ours(8, 64),
        "hqq/b4_g64 (HQQLinear)": hqq(4, 64),
        "hqq/b4_g64 (ours)": hqq_ours(4, 64),
        "hqq/b2_g16 (HQQLinear)": hqq(2, 16),
        "hqq/b2_g16 (ours)": hqq_ours(2, 16),
    }


def hqq_same(w: torch.Tensor, a: object, b: object) -> bool:
    """Whether two HQQLinear layers of `w` hold the same W_q, scale and zero."""
    return torch.equal(a.W_q, b.W_q) and all(torch.equal(a.meta[k], b.meta[k]) for k in ("scale", "zero"))


def backend_rates(shape: tuple[int, int], repeat: int) -> None:
    print(f"\nper-tensor quantize, one {shape[0]}x{shape[1]} fp16 weight, best of {repeat} after a warm-up")
    print(f"{'backend/scheme':>28} {'GB/s':>8} {'ms':>9}  same as HQQLinear")
    ops = backend_ops()
    w = torch.randn(shape, dtype=torch.float16) * 0.02
    for name, op in ops.items():
        first = op(w.clone())  # warm-up: compiles or builds the backend's extension on first use
        t = best_seconds(repeat, lambda op=op: op(w.clone()))
        gb = w.numel() * w.element_size() / 1e9
        same = ""
        if name.endswith("(ours)") and name.startswith("hqq/"):
            same = "yes" if hqq_same(w, first, ops[name.replace("(ours)", "(HQQLinear)")](w.clone())) else "NO"
        print(f"{name:>28} {gb / t:8.3f} {t * 1e3:9.1f}  {same}")


def double_quant(shape: tuple[int, int], absmax: torch.Tensor, repeat: int) -> None:
    """compress_statistics=True on one weight's 4-bit absmax: bitsandbytes' steps and ours, in ms (best /
    median), and whether both give the same bytes."""
    code = F.create_dynamic_map()
    offset = absmax.mean()
    centred = absmax - offset
    parts = {
        "mean (torch, both)": (absmax.mean,),
        "absmax - mean (bnb)": (torch.sub, absmax, offset),
        "quantize_blockwise (bnb)": (functools.partial(F.quantize_blockwise, blocksize=256), centred),
        "centred quantize_blockwise (ours)": (kernels.quantize_blockwise, absmax, code, 256, offset),
        "all of it (bnb)": (lambda: F.quantize_blockwise(absmax - absmax.mean(), blocksize=256),),
        "all of it (ours)": (lambda: kernels.quantize_blockwise(absmax, code, 256, absmax.mean()),),
    }
    ref = torch.ops.bitsandbytes.quantize_blockwise.default(centred, code, 256)
    same = same_bytes(kernels.quantize_blockwise(absmax, code, 256, offset), ref)
    label = f"{'x'.join(map(str, shape))} double quant, {absmax.numel()} absmax values, same bytes: "
    print(f"{label}{'yes' if same else 'NO'}")
    for name, (fn, *fn_args) in parts.items():
        best, median = seconds(repeat, fn, *fn_args)
        print(f"{'':>12} {name:>34} {best * 1e3:7.2f} ms best {median * 1e3:7.2f} ms median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=3, help="best of N timed calls (after a warm-up)")
    parser.add_argument("--page-cache-mib", type=int, default=512, help="0 skips the page-cache read")
    parser.add_argument("--backends-only", action="store_true", help="only the per-backend table")
    parser.add_argument("--backend-shape", type=int, nargs=2, default=[4096, 4096])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.backends_only:
        backend_rates(tuple(args.backend_shape), args.repeat)
        return

    ops = {
        "nf4": (
            lambda A: torch.ops.bitsandbytes.quantize_4bit.default(A, 64, "nf4", torch.uint8),
            lambda A: kernels.quantize_4bit(A, 64, "nf4"),
        ),
        "fp4": (
            lambda A: torch.ops.bitsandbytes.quantize_4bit.default(A, 64, "fp4", torch.uint8),
            lambda A: kernels.quantize_4bit(A, 64, "fp4"),
        ),
        "int8": (
            lambda A: torch.ops.bitsandbytes.int8_vectorwise_quant.default(A, 0.0),
            lambda A: kernels.int8_vectorwise_quant(A),
        ),
    }
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeat}; GB/s of fp16 input")
    first = torch.randn(SHAPES[0], dtype=torch.float16)
    for name, (_, ours) in ops.items():
        start = time.perf_counter()
        ours(first)  # opens the C library (built at install, or now into the user cache if it is not there)
        print(f"first call of ours, {name}: {time.perf_counter() - start:.3f} s ({kernels.describe()})")

    print(f"\n{'shape':>12} {'op':>5} {'bnb GB/s':>9} {'ours GB/s':>10} {'ratio':>7}  same bytes")
    for shape in SHAPES:
        A = torch.randn(shape, dtype=torch.float16) * 0.02
        gb = A.numel() * A.element_size() / 1e9
        for name, (bnb, ours) in ops.items():
            same = same_bytes(ours(A), bnb(A))
            t_bnb, t_ours = best_seconds(args.repeat, bnb, A), best_seconds(args.repeat, ours, A)
            print(
                f"{'x'.join(map(str, shape)):>12} {name:>5} {gb / t_bnb:9.3f} {gb / t_ours:10.3f} "
                f"{t_bnb / t_ours:6.1f}x  {'yes' if same else 'NO'}"
            )

        double_quant(shape, kernels.quantize_4bit(A, 64, "nf4")[1], max(args.repeat, 10))

    backend_rates(tuple(args.backend_shape), args.repeat)

    if args.page_cache_mib:
        print(
            f"\npage-cache read (second read of a {args.page_cache_mib} MiB file): "
            f"{page_cache_rate(args.page_cache_mib):.2f} GB/s"
        )


if __name__ == "__main__":
    main()
