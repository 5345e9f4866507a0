"""Faster CPU drop-ins for bitsandbytes' quantization ops, byte-identical to them.

Replaces, on CPU:

* ``torch.ops.bitsandbytes.quantize_4bit`` (nf4 / fp4). bitsandbytes runs its generic torch
  kernel there, where ``torch.bucketize`` does a scalar binary search per element: a Llama-7B
  shaped fp16 weight goes at ~0.1 GB/s (nf4) / ~0.08 GB/s (fp4) on 2 cores, ~0.06 per core.
* ``torch.ops.bitsandbytes.int8_vectorwise_quant`` (LLM.int8 weights, ``Int8Params``): eager
  passes with full-size float32 temporaries, ~0.45 GB/s on 2 cores.

Each is a small C function (``qkernels.c``: AVX2/F16C where the CPU has it, portable C elsewhere) that reads
the 16-bit weight as it is, with no float32 copy, and writes the outputs once; see
``benchmarks/quantize_rate.py`` for the rates. It needs no compiler at run time: ``setup.py`` builds it at
install (``_qkernels*.so`` next to this file); a checkout that was not installed builds it on first use
(~1 s, once per source version) into ``$XDG_CACHE_HOME/qload/kernels`` (``~/.cache``). Where neither is
possible (no C compiler), these functions run bitsandbytes' own op instead, exact and slow, and say so once
in the log; ``describe()`` says which ran, for the record. (They were ``torch.compile`` kernels before:
10-20 s of inductor the first time on a machine, ~2 s per process after, and a C++ compiler at run time.)

The C functions are called through ctypes, which releases the GIL: a tensor is cut into chunks of whole
blocks (rows for int8) that ``threads()`` Python threads quantize side by side.

* ``torch.ops.bitsandbytes.quantize_blockwise`` on the 4-bit absmax, minus its mean (double quantization,
  ``compress_statistics``): bitsandbytes' native kernel makes a centred float32 copy first, then runs its
  OpenMP loop, whose scalar steps cost ~5-30 ms per Llama-7B MLP weight on 2 loaded cores, as much as the
  4-bit kernel itself. Ours reads the absmax and subtracts the offset as it goes (``quantize_blockwise``).
  The offset itself is torch's ``absmax.mean()``: its bits depend on torch's thread count and vector width
  (cascade sums per thread, combined in float32), which only torch itself reproduces for sure. ``serial_mean``
  has torch compute those same per-thread sums one after the other on the calling thread: a parallel region
  there would leave torch's OpenMP threads spinning (~3 ms, libgomp's default) through the next weight's
  kernel, on the cores its threads need (7B nf4_double on 2 cores: ~9% of the stream).

Output bytes equal bitsandbytes', including ties on the bucket midpoints, zeros, -0.0, all-zero
blocks, inf and the tail block.  Only NaN statistics differ in bits: ours are the canonical quiet
NaN, bitsandbytes' depend on which reduction kernel torch picked.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # as qkernels.c's enum

# Elements per C call (a multiple of every blocksize): chunks small enough that a thread slowed by another
# process on its core leaves its share to the others, large enough that a call (~10 us) is noise.
_CHUNK = 1 << 21

SOURCE = Path(__file__).with_name("qkernels.c")
PREBUILT = "_qkernels"  # setup.py's extension name (a plain shared library, loaded with ctypes)
COMPILE_FLAGS = ["-O3", "-ffp-contract=off", "-shared", "-fPIC"]  # no fused multiply-add: exact float32 steps
COMPILERS = ("cc", "gcc", "clang")


def source_id() -> str:
    """The hash of qkernels.c that a library built from it reports (`qload_source_id`)."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qload" / "kernels"


def compiler() -> str | None:
    """The C compiler a build would use: $CC, else the first of cc, gcc, clang on PATH."""
    for name in ([os.environ["CC"]] if os.environ.get("CC") else []) + list(COMPILERS):
        found = shutil.which(name)
        if found:
            return found
    return None


def build(out: Path, cc: str, source_hash: str) -> None:
    """Compile qkernels.c into the shared library `out` (written beside it, then renamed: two processes
    building at once both end with a whole file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *COMPILE_FLAGS, f'-DQLOAD_SOURCE_ID="{source_hash}"', str(SOURCE), "-o", tmp, "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path, want: str | None) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    lib.qload_source_id.restype = ctypes.c_char_p
    if want is not None and lib.qload_source_id().decode() != want:
        return None  # built from another version of qkernels.c
    c, i64, p = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.qload_quantize_4bit.argtypes = [p, c, i64, c, p, p, p, p]
    lib.qload_quantize_4bit.restype = None
    lib.qload_int8_rows.argtypes = [p, c, i64, i64, p, p]
    lib.qload_int8_rows.restype = None
    lib.qload_blockwise_lut.argtypes = [p, p]
    lib.qload_blockwise_lut.restype = None
    lib.qload_quantize_blockwise.argtypes = [p, i64, ctypes.c_float, c, p, p, p]
    lib.qload_quantize_blockwise.restype = None
    return lib


@cache
def library() -> tuple[ctypes.CDLL | None, str]:
    """The C kernels and where they came from; (None, why) where there are none."""
    want = source_id() if SOURCE.exists() else None
    prebuilt = Path(__file__).with_name(PREBUILT + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    if prebuilt.exists() and (lib := _open(prebuilt, want)) is not None:
        return lib, "built at install"
    if want is None:
        return None, f"{prebuilt.name} is missing or does not load, and qkernels.c is not here to build it"
    cached = cache_dir() / f"qkernels-{want}.so"
    if cached.exists() and (lib := _open(cached, want)) is not None:
        return lib, f"built on first use, {cached}"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc, clang) to build them, and no build from install"
    try:
        build(cached, cc, want)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", None) or str(err)
        return None, f"building them with {cc} failed: {detail.strip()[-500:]}"
    lib = _open(cached, want)
    return (lib, f"built now with {cc}, {cached}") if lib is not None else (None, f"{cached} does not load")


_said_fallback = False


def _fallback() -> bool:
    """True where there are no C kernels: the caller runs bitsandbytes' op, said once in the log."""
    global _said_fallback
    lib, why = library()
    if lib is not None:
        return False
    if not _said_fallback:
        _said_fallback = True
        log.warning("qload's CPU quantization kernels are not available (%s): using bitsandbytes' own op, "
                    "exact but 10-40x slower", why)  # fmt: skip
    return True


_calls = 0


def used() -> bool:
    """Whether these kernels (or their fallback) quantized anything in this process."""
    return _calls > 0


def describe() -> str:
    """Which kernel quantizes here, for the record's `kernel` fact."""
    lib, why = library()
    if lib is None:
        return f"bitsandbytes' own op (no qload C kernel: {why})"
    return f"qload C kernel ({'avx2' if lib.qload_simd() else 'portable C'}, {threads()} threads, {why})"


def threads() -> int:
    """Threads to quantize with: the cores this process may run on, at most torch's thread setting."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, torch.get_num_threads()))


@cache
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n, thread_name_prefix="qload-quantize")


def _run(calls: list) -> None:
    """Run the C calls (each a zero-argument callable) on the pool, or inline when there is one."""
    n = min(threads(), len(calls))
    if n <= 1:
        for call in calls:
            call()
        return
    for future in [_pool(threads()).submit(call) for call in calls]:
        future.result()


# quant_type -> (the 15 bucket midpoints, the code index of each of the 16 buckets), filled on
# first use for both types at once.
_TABLES: dict[str, tuple[tuple[float, ...], tuple[int, ...]]] = {}
_C_TABLES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _load_tables() -> None:
    """Midpoints and bucket order computed exactly as bitsandbytes' CPU/default kernel does."""
    from bitsandbytes.functional import get_4bit_type

    for quant_type in QUANT_TYPES:
        code = get_4bit_type(quant_type, device="cpu")
        order = torch.argsort(code)
        midpoints = (code[order[:-1]] + code[order[1:]]) / 2
        _TABLES[quant_type] = tuple(midpoints.tolist()), tuple(order.tolist())


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


def _check(name: str, value: object, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"unsupported {name} {value!r}; valid values: {', '.join(map(str, valid))}")


def _bnb_op():
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    return torch.ops.bitsandbytes


@torch.no_grad()
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
    global _calls
    _calls += 1
    if _fallback():
        return _bnb_op().quantize_4bit.default(A, blocksize, quant_type, quant_storage)
    lib = library()[0]
    if not _TABLES:
        _load_tables()
    if quant_type not in _C_TABLES:
        midpoints, order = _TABLES[quant_type]
        _C_TABLES[quant_type] = torch.tensor(midpoints, dtype=torch.float32), torch.tensor(order, dtype=torch.uint8)
    midpoints, order = _C_TABLES[quant_type]
    flat = A.detach().reshape(-1).contiguous()
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    src, item, code = flat.data_ptr(), flat.element_size(), _DTYPE_CODE[A.dtype]
    step = max(_CHUNK - _CHUNK % blocksize, blocksize)

    def chunk(start: int, stop: int):
        return lambda: lib.qload_quantize_4bit(
            src + start * item, code, (stop - start) // blocksize, blocksize, midpoints.data_ptr(),
            order.data_ptr(), packed.data_ptr() + start // 2, absmax.data_ptr() + 4 * (start // blocksize),
        )  # fmt: skip

    _run([chunk(start, min(start + step, full)) for start in range(0, full, step)])
    if full < n:
        p, a = _tail_4bit(flat[full:].float(), n % 2 == 1, quant_type)
        packed[full // 2 :] = p
        absmax[-1:] = a
    return packed.view(quant_storage).unsqueeze(1), absmax


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
    global _calls
    _calls += 1
    if threshold > 0.0 or _fallback():
        # Outlier extraction (threshold > 0) is an activation-time path; weights use threshold 0.
        return _bnb_op().int8_vectorwise_quant.default(A, threshold)
    lib = library()[0]
    A = A.detach().contiguous()
    rows, cols = A.shape
    q = torch.empty((rows, cols), dtype=torch.int8)
    stats = torch.empty(rows, dtype=torch.float32)
    src, item, code = A.data_ptr(), A.element_size(), _DTYPE_CODE[A.dtype]
    step = max(1, _CHUNK // max(cols, 1))

    def chunk(start: int, stop: int):
        return lambda: lib.qload_int8_rows(
            src + start * cols * item, code, stop - start, cols, q.data_ptr() + start * cols,
            stats.data_ptr() + 4 * start,
        )  # fmt: skip

    _run([chunk(start, min(start + step, rows)) for start in range(0, rows, step)])
    return q, stats, None


# code table bytes -> bitsandbytes' 65536-entry lookup table for it (in practice one: the dynamic map)
_LUTS: dict[bytes, torch.Tensor] = {}

# Elements per C call of quantize_blockwise: a multiple of every blocksize. Its input is 1/64 of a weight's
# (~0.7 M values for a Llama-7B MLP weight, ~1 ms of C): one call in the calling thread, no pool hand-off.
_BLOCKWISE_CHUNK = 1 << 22


@torch.no_grad()
def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor, blocksize: int = 256, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same (codes, absmax) as torch.ops.bitsandbytes.quantize_blockwise.default(A - offset, code, blocksize)
    on CPU for float32 A (double quantization of the 4-bit absmax: `offset` is its mean, a 0-d float32 tensor),
    without making the centred copy. codes: uint8 shaped as A; absmax: float32, one per block."""
    _check("dtype", A.dtype, (torch.float32,))
    _check("device", A.device.type, ("cpu",))
    if blocksize <= 0:
        raise ValueError(f"unsupported blocksize {blocksize!r}; valid values: positive integers")
    if code.dtype != torch.float32 or code.numel() != 256:
        raise ValueError(f"unsupported code {code.dtype}, {code.numel()} values; valid: 256 float32 values")
    if offset is not None and (offset.dtype != torch.float32 or offset.numel() != 1):
        raise ValueError(f"unsupported offset {offset.dtype}, {offset.numel()} values; valid: one float32")
    global _calls
    _calls += 1
    if _fallback() or not _blockwise_is_bitsandbytes():
        centred = A if offset is None else A - offset
        return _bnb_op().quantize_blockwise.default(centred, code, blocksize)
    return _blockwise(A, code, blocksize, offset)


def _blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int, offset: torch.Tensor | None):
    lib = library()[0]
    code = code.detach().cpu().contiguous()
    key = code.numpy().tobytes()
    if key not in _LUTS:
        lut = torch.empty(1 << 16, dtype=torch.uint8)
        lib.qload_blockwise_lut(code.data_ptr(), lut.data_ptr())
        _LUTS[key] = lut
    lut = _LUTS[key]
    flat = A.detach().reshape(-1).contiguous()
    n = flat.numel()
    out = torch.empty(A.shape, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    off = 0.0 if offset is None else float(offset.item())  # float32 -> double -> float32: exact
    step = max(_BLOCKWISE_CHUNK - _BLOCKWISE_CHUNK % blocksize, blocksize)
    for start in range(0, n, step):
        lib.qload_quantize_blockwise(
            flat.data_ptr() + 4 * start, min(step, n - start), off, blocksize, lut.data_ptr(),
            out.data_ptr() + start, absmax.data_ptr() + 4 * (start // blocksize),
        )  # fmt: skip
    return out, absmax


# at::internal::GRAIN_SIZE: torch's reductions run on one thread below it, and split no finer above it
_GRAIN = 32768


@torch.no_grad()
def serial_mean(x: torch.Tensor) -> torch.Tensor:
    """``x.mean()`` with the very bits torch gives at its thread count, with no OpenMP parallel region: torch's
    reduction cuts the values into one range per thread (``at::parallel_for``: at most one per grain), sums
    each, and adds the sums in thread order; here each range is summed by torch with OpenMP set to one thread,
    on this thread alone (``omp_set_num_threads`` is per thread), the sums added in the same order. Where
    torch's OpenMP runtime is not found, or the tensor is not a contiguous float32 one, ``x.mean()``."""
    threads = torch.get_num_threads()
    parts = min(threads, -(-x.numel() // _GRAIN))
    omp = _openmp()
    if parts <= 1 or omp is None or x.dtype != torch.float32 or not x.is_contiguous():
        return x.mean()
    flat, n = x.view(-1), x.numel()
    omp.omp_set_num_threads(1)
    try:
        if torch.get_num_threads() != 1:  # not the OpenMP runtime torch runs on
            return x.mean()
        size = -(-n // parts)
        total = flat[:size].sum()
        for start in range(size, n, size):
            total = total + flat[start : start + size].sum()
        return total / n
    finally:
        omp.omp_set_num_threads(threads)


@cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime loaded in this process (torch's: libgomp, or Intel's or LLVM's), if exactly one is."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if ".so" in line}
    except OSError:  # not Linux
        return None
    found = {p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp5", "libomp"))}
    if len(found) != 1:
        return None
    try:
        return ctypes.CDLL(found.pop())  # already loaded: the same library, not a second copy
    except OSError:
        return None


@cache
def _blockwise_is_bitsandbytes() -> bool:
    """Whether the installed bitsandbytes quantizes blockwise as our kernel does (0.50's lookup table; its
    earlier releases searched for the nearest code value, which differs next to every midpoint), tried once
    per process on values on and around each midpoint of the dynamic code. Where not, its own op runs,
    said once in the log."""
    from bitsandbytes.functional import create_dynamic_map

    code = create_dynamic_map()
    mid = ((code[:-1] + code[1:]) / 2).sort().values
    probe, down, up = [mid], mid, mid
    for _ in range(8):
        down, up = torch.nextafter(down, torch.tensor(-2.0)), torch.nextafter(up, torch.tensor(2.0))
        probe += [down, up]
    probe = torch.cat([torch.ones(1), torch.cat(probe)])  # absmax 1: each value scales to itself
    ref = _bnb_op().quantize_blockwise.default(probe, code.clone(), 4096)  # a copy: old releases wrote into it
    ours = _blockwise(probe, code, 4096, None)
    same = torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    if not same:
        import bitsandbytes

        log.warning("bitsandbytes %s quantizes blockwise (double quantization) unlike qload's C kernel: "
                    "using its own op there", bitsandbytes.__version__)  # fmt: skip
    return same
