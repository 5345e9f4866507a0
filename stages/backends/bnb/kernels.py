"""Faster CPU drop-ins for bitsandbytes' quantization ops, byte-identical to them.

Replaces, on CPU:

* ``torch.ops.bitsandbytes.quantize_4bit`` (nf4 / fp4). bitsandbytes runs its generic torch
  kernel there, where ``torch.bucketize`` does a scalar binary search per element: a Llama-7B
  shaped fp16 weight goes at ~0.1 GB/s (nf4) / ~0.08 GB/s (fp4) on 2 cores, ~0.06 per core.
* ``torch.ops.bitsandbytes.int8_vectorwise_quant`` (LLM.int8 weights, ``Int8Params``): eager
  passes with full-size float32 temporaries, ~0.45 GB/s on 2 cores.

Each becomes one ``torch.compile`` (inductor C++) kernel: ~1.8 GB/s per core for nf4 and fp4
(nf4 ~3.5 GB/s on 2 idle cores), ~1.2-1.6 GB/s per core for int8 (~3.8 on 2); see
``benchmarks/quantize_rate.py``.  Compiling costs ~10 s of inductor start-up plus ~5 s per
4-bit kernel the first time on a machine, ~2 s per process once inductor's on-disk cache has it.
A kernel compiles per quant_type (again, once, when a second blocksize appears) and, for int8,
per input dtype.  ``quantize_blockwise`` (double-quant statistics) is left alone: bitsandbytes
runs it natively at ~1 GB/s on 1/64 of the data, ~1 ms per 4096x4096 weight.

OpenMP's default spin-waiting makes the 2-thread 4-bit kernel 2-8x slower than 1 thread while
another process keeps a core busy; ``OMP_WAIT_POLICY=PASSIVE`` (set before torch starts) avoids it.

Output bytes equal bitsandbytes', including ties on the bucket midpoints, zeros, -0.0, all-zero
blocks, inf and the tail block.  Only NaN statistics differ in bits: ours are the canonical quiet
NaN, bitsandbytes' depend on which reduction kernel torch picked.
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.core import progress

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Elements per compiled call. The float32 copy of a chunk (16 MiB) stays in L3, and few calls
# mean few OpenMP barriers: with another process busy on one of the 2 cores each barrier can wait
# a scheduler time slice, and 1 Mi-element chunks then ran ~3x slower than these.
# Converting to float32 first beat fusing the conversion into the kernel: with 16-bit input
# inductor read the even / odd elements through scalar gathers (~1.5x slower).
_CHUNK = 1 << 22


# quant_type -> (the 15 bucket midpoints, the code index of each of the 16 buckets), filled on
# first use for both types at once: the compiled kernel reads it as constants and is guarded on it.
_TABLES: dict[str, tuple[tuple[float, ...], tuple[int, ...]]] = {}


def _load_tables() -> None:
    """Midpoints and bucket order computed exactly as bitsandbytes' CPU/default kernel does."""
    from bitsandbytes.functional import get_4bit_type

    for quant_type in QUANT_TYPES:
        code = get_4bit_type(quant_type, device="cpu")
        order = torch.argsort(code)
        midpoints = (code[order[:-1]] + code[order[1:]]) / 2
        _TABLES[quant_type] = tuple(midpoints.tolist()), tuple(order.tolist())


def _select(bits: list[torch.Tensor], values: list[float]) -> torch.Tensor | float:
    """values[k], k spelled by the boolean tensors in bits (most significant first)."""
    if not bits:
        return values[0]
    half = len(values) // 2
    return torch.where(bits[0], _select(bits[1:], values[half:]), _select(bits[1:], values[:half]))


def _codes(v: torch.Tensor, quant_type: str) -> torch.Tensor:
    """torch.bucketize(v, midpoints) mapped to code indices, with 4 compares instead of 15."""
    midpoints, order = _TABLES[quant_type]
    bits: list[torch.Tensor] = []
    for level in range(4):
        step = 8 >> level
        threshold = _select(bits, [midpoints[lo + step - 1] for lo in range(0, 16, 2 * step)])
        # not (v <= t) rather than v > t: NaN goes to the last bucket, as in bucketize.
        bits.append(~(v <= threshold))
    bucket = sum(b.to(torch.int32) << (3 - i) for i, b in enumerate(bits))
    if order == tuple(range(16)):
        return bucket
    # order[bucket] as a 16-nibble table held in two int32 constants; a where-tree over the
    # 16 leaves ran as fast but took twice as long to compile.
    lo, hi = (sum(c << 4 * i for i, c in enumerate(part)) for part in (order[:8], order[8:]))
    table = torch.where(bits[0], torch.full_like(bucket, _int32(hi)), torch.full_like(bucket, _int32(lo)))
    return (table >> ((bucket & 7) << 2)) & 15


def _int32(u: int) -> int:
    """The signed int32 with the bits of the 32-bit unsigned u."""
    return u - (1 << 32) if u >= 1 << 31 else u


def _blocks_4bit(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes and absmax of a 1-D float32 tensor made of whole blocks."""
    x = x.view(-1, blocksize)
    absmax = x.abs().amax(dim=1, keepdim=True)
    # Same float32 ops as bitsandbytes: multiply by the reciprocal of the clamped absmax.
    scaled = x * absmax.clamp(min=1e-38).reciprocal()
    packed = (_codes(scaled[:, 0::2], quant_type) << 4) | _codes(scaled[:, 1::2], quant_type)
    # inductor's vectorized max makes NaN 0xffffffff; return the usual quiet NaN instead.
    absmax = torch.where(absmax.isnan(), float("nan"), absmax)
    return packed.to(torch.uint8), absmax.squeeze(1)


_compiled_blocks_4bit = torch.compile(_blocks_4bit)


def _tail_4bit(tail: torch.Tensor, pad: bool, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The last, partial block, done like bitsandbytes does it: divide, bucketize, pad with 0."""
    midpoints, order = _TABLES[quant_type]
    absmax = tail.abs().max().clamp(min=1e-38)
    scaled = tail / absmax
    if pad:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    bucket = torch.bucketize(scaled, torch.tensor(midpoints, dtype=torch.float32))
    q = torch.tensor(order, dtype=torch.uint8)[bucket]
    return (q[::2] << 4) | q[1::2], absmax.reshape(1)


_compiled_once: set[str] = set()


def _first_compile(what: str) -> contextlib.AbstractContextManager:
    """A line on the first call of a kernel variant (torch.compile runs then, 10-20 s on 2 cores, with no
    fraction to show) and one with how long it took; later calls say nothing."""
    if what in _compiled_once:
        return contextlib.nullcontext()
    _compiled_once.add(what)
    return progress.step(f"Compiling the CPU {what} quantization kernel (first use in this process)")


def _check(name: str, value: object, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"unsupported {name} {value!r}; valid values: {', '.join(map(str, valid))}")


@torch.no_grad()  # a Parameter must not make dynamo compile a training graph
def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same (packed, absmax) as torch.ops.bitsandbytes.quantize_4bit.default on CPU: packed is
    ((A.numel() + 1) // 2, 1) bytes viewed as quant_storage, absmax float32, one per block."""
    _check("quant_type", quant_type, QUANT_TYPES)
    _check("blocksize", blocksize, BLOCKSIZES)
    _check("dtype", A.dtype, FLOAT_DTYPES)
    _check("device", A.device.type, ("cpu",))
    if not _TABLES:
        _load_tables()
    flat = A.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    # One float32 buffer for all chunks: fresh allocations of it cost page faults (~5%).
    buf = torch.empty(min(full, _CHUNK), dtype=torch.float32) if A.dtype != torch.float32 else None
    for start in range(0, full, _CHUNK):
        stop = min(start + _CHUNK, full)
        x = flat[start:stop] if buf is None else buf[: stop - start].copy_(flat[start:stop])
        if stop - start > blocksize:
            torch._dynamo.maybe_mark_dynamic(x, 0)
            with _first_compile(f"{quant_type} (blocksize {blocksize})"):
                p, a = _compiled_blocks_4bit(x, blocksize, quant_type)
        else:  # dynamo would compile a separate variant for a lone block (a size-1 dim)
            p, a = _blocks_4bit(x, blocksize, quant_type)
        packed[start // 2 : stop // 2] = p.view(-1)
        absmax[start // blocksize : stop // blocksize] = a
    if full < n:
        p, a = _tail_4bit(flat[full:].float(), n % 2 == 1, quant_type)
        packed[full // 2 :] = p
        absmax[-1:] = a
    return packed.view(quant_storage).unsqueeze(1), absmax


def _rows_int8(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and row absmax of a 2-D tensor, with bitsandbytes' default-kernel arithmetic."""
    stats = A.abs().amax(dim=1, keepdim=True).float()
    # 127 / stats as bitsandbytes computes it: Tensor.__rtruediv__ is reciprocal() * 127.
    scaled = A.float() * (stats.reciprocal() * 127.0)
    # Eager .to(int8) turns NaN (from all-zero rows or inf / NaN entries) into 0; the
    # vectorized conversion inductor emits gives -128, so map NaN explicitly.
    q = torch.where(scaled.isnan(), 0.0, torch.round(scaled)).to(torch.int8)
    stats = torch.where(stats.isnan(), float("nan"), stats)
    return q, stats.squeeze(1)


_compiled_rows_int8 = torch.compile(_rows_int8)


@torch.no_grad()
def int8_vectorwise_quant(
    A: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Same (int8 rows, row absmax, outlier columns) as
    torch.ops.bitsandbytes.int8_vectorwise_quant.default on CPU, for 2-D A."""
    _check("dtype", A.dtype, FLOAT_DTYPES)
    _check("device", A.device.type, ("cpu",))
    if A.dim() != 2:
        raise ValueError(f"unsupported A.dim() {A.dim()}; valid values: 2")
    if threshold > 0.0:
        # Outlier extraction is an activation-time path; weights use threshold 0.
        import bitsandbytes  # noqa: F401  (registers the op)

        return torch.ops.bitsandbytes.int8_vectorwise_quant.default(A, threshold)
    A = A.contiguous()
    if min(A.shape) < 2:
        # dynamo would compile a separate variant for a size-1 dim; eager is as exact.
        q, stats = _rows_int8(A)
    else:
        torch._dynamo.maybe_mark_dynamic(A, [0, 1])
        with _first_compile(f"int8 ({str(A.dtype).removeprefix('torch.')})"):
            q, stats = _compiled_rows_int8(A)
    return q, stats, None
