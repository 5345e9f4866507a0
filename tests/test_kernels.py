"""stages.stream.kernels against bitsandbytes' own CPU ops, compared byte for byte."""

from __future__ import annotations

import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
import pytest
import torch

from stages.backends.bnb import kernels

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
QUANT_TYPES = ["nf4", "fp4"]


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert torch.equal(raw(ours), raw(ref))


def assert_same_stats(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Bytes equal, except that a NaN only has to be a NaN: bitsandbytes' own NaN bits depend on
    which reduction kernel torch picked (0x7fc00000 or 0x7fffffff)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    nan = ref.isnan()
    assert torch.equal(ours.isnan(), nan)
    assert torch.equal(raw(ours[~nan]), raw(ref[~nan]))


@pytest.fixture(params=["simd", "portable"])
def path(request):
    """Each test on both code paths of the C kernels: AVX2 (where the CPU has it) and portable C."""
    lib = kernels.library()[0]
    if lib is None:
        pytest.skip(f"no C kernels here: {kernels.library()[1]}")
    lib.qload_portable_only(request.param == "portable")
    yield request.param
    lib.qload_portable_only(0)


def check_4bit(A: torch.Tensor, quant_type: str, blocksize: int = 64, storage=torch.uint8) -> None:
    ref = torch.ops.bitsandbytes.quantize_4bit.default(A, blocksize, quant_type, storage)
    ours = kernels.quantize_4bit(A, blocksize, quant_type, storage)
    assert_same(ours[0], ref[0])
    assert_same_stats(ours[1], ref[1])


def check_int8(A: torch.Tensor, threshold: float = 0.0) -> None:
    rq, rs, rcols = torch.ops.bitsandbytes.int8_vectorwise_quant.default(A, threshold)
    q, s, cols = kernels.int8_vectorwise_quant(A, threshold)
    assert_same(q, rq)
    assert_same_stats(s, rs)
    assert (cols is None and rcols is None) or torch.equal(cols, rcols)


def randn(shape, dtype, scale=1.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def anchored(values: torch.Tensor, anchor: float) -> torch.Tensor:
    """values in blocks of 63 after an element equal to anchor, so each block's absmax is anchor
    (when |values| <= anchor) and the scaled values sweep every input value in that range."""
    pad = -len(values) % 63
    values = torch.cat([values, values.new_zeros(pad)]).view(-1, 63)
    return torch.cat([values.new_full((len(values), 1), anchor), values], dim=1).reshape(-1)


def all_values(dtype: torch.dtype, limit: float) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype with |x| <= limit, including -0.0."""
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[x.float().abs() <= limit]


# empty, below / at / above one block, odd sizes (a padded last byte), tails, 0-D to 3-D
SHAPES = [(n,) for n in (0, 1, 2, 3, 63, 64, 65, 127, 128, 2049)]
SHAPES += [(), (0, 64), (7, 9), (3, 100), (1, 64), (2, 64), (5, 3, 33), (1000, 37), (17, 4096 + 30)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_shapes_and_scales(path, quant_type, dtype):
    for i, shape in enumerate(SHAPES):
        for scale in (1e-3, 1.0, 300.0):
            check_4bit(randn(shape, dtype, scale, seed=i), quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_chunk_boundaries(path, quant_type, monkeypatch):
    monkeypatch.setattr(kernels, "_CHUNK", 3 * 4096)  # a multiple of every blocksize
    for dtype in DTYPES:
        for n in (3 * 4096, 3 * 4096 + 64, 3 * 4096 + 65, 7 * 4096 + 1000):
            check_4bit(randn((n,), dtype, seed=n), quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_llama_shape(path, quant_type):
    check_4bit(randn((4096, 4096), torch.float16, 0.02), quant_type)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_every_16bit_value(path, quant_type, dtype):
    # Anchor 1 makes the scaled value the input itself, so every value next to (or on) a
    # midpoint is hit; the other anchors exercise the rounding of x * (1 / absmax).
    for anchor in (1.0, 0.7, 3.0, 1e-3):
        check_4bit(anchored(all_values(dtype, anchor), anchor).to(dtype), quant_type)


def midpoints(quant_type: str) -> torch.Tensor:
    code = bitsandbytes.functional.get_4bit_type(quant_type, device="cpu").sort().values
    return (code[:-1] + code[1:]) / 2


def around(center: torch.Tensor, ulps: int = 15) -> torch.Tensor:
    """center and the `ulps` float32 values on either side of each of its elements."""
    out, down, up = [center], center, center
    for _ in range(ulps):
        down, up = torch.nextafter(down, torch.tensor(-9.0)), torch.nextafter(up, torch.tensor(9.0))
        out += [down, up]
    return torch.cat(out)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_float32_on_and_around_midpoints(path, quant_type):
    # A power-of-two absmax keeps 1 / absmax exact, so midpoint * absmax scales to an exact tie;
    # the others check the rounding of x * (1 / absmax) next to each midpoint.
    for anchor in (1.0, 2.0, 0.25, 2.0**-100, 3.0, 0.7, 10.0 / 3):
        check_4bit(anchored(around(midpoints(quant_type) * anchor), anchor), quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_tail_block_divides(path, quant_type):
    # bitsandbytes scales full blocks by x * (1 / absmax) but the tail block by x / absmax;
    # next to a midpoint the two round to different sides for some x.
    head = randn((64,), torch.float32)
    for anchor in (3.0, 0.7, 10.0 / 3, 0.3):
        for t in midpoints(quant_type):
            tail = torch.cat([torch.tensor([anchor]), around((t * anchor).reshape(1))])
            check_4bit(torch.cat([head, tail]), quant_type)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_special_values(path, quant_type, dtype):
    inf, nan = float("inf"), float("nan")
    A = randn((7, 64), torch.float32)
    A[0] = 0.0  # an all-zero block: absmax 0, scaled by 1 / 1e-38
    A[1] = -0.0
    A[2, ::2] = 0.0
    A[2, 1::2] = -0.0
    A[3, 5] = inf  # absmax inf: the finite values scale to +-0, inf itself to nan
    A[4, 9] = -inf
    A[5, 17] = nan
    A[6, :] = 1e-30  # scaled to ~1e-30 by the 1.0: just above fp4's midpoint at 0
    A[6, 0] = 1.0
    check_4bit(A.to(dtype), quant_type)
    for tail in ([0.0] * 5, [-0.0, 0.0, -0.0], [inf, 1.0, -2.0], [nan, 1.0], [1e-30, 1.0, -1e-30]):
        check_4bit(torch.cat([A.reshape(-1), torch.tensor(tail)]).to(dtype), quant_type)
    if dtype == torch.float32:
        tiny = torch.tensor([1e-45, -1e-45, 1e-39, 0.0] * 32)  # subnormal inputs and absmax
        check_4bit(tiny, quant_type)


@pytest.mark.parametrize(
    "storage", [torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.int32]
)
def test_4bit_quant_storage(storage):
    for quant_type in QUANT_TYPES:
        check_4bit(randn((64, 64), torch.float16), quant_type, storage=storage)
        check_4bit(randn((9, 32), torch.float32, seed=1), quant_type, storage=storage)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_other_blocksizes(path, quant_type):
    for blocksize in kernels.BLOCKSIZES:
        for shape in [(blocksize,), (3 * blocksize + 7,), (37, 2 * blocksize + 2)]:
            check_4bit(randn(shape, torch.float16, seed=blocksize), quant_type, blocksize)
    check_4bit(randn((513, 100), torch.bfloat16), quant_type, 4096)


def test_4bit_views_and_parameters():
    base = randn((130, 200), torch.float16)
    param = torch.nn.Parameter(randn((64, 64), torch.bfloat16))
    for A in (base.t(), base[1:, 3:], base.reshape(-1)[1:6401], param):
        for quant_type in QUANT_TYPES:
            check_4bit(A, quant_type)
    assert not kernels.quantize_4bit(param)[0].requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_shapes_and_special_values(path, dtype):
    for i, shape in enumerate([(1, 7), (7, 1), (3, 100), (513, 257), (64, 4096)]):
        for scale in (1e-3, 1.0, 300.0):
            check_int8(randn(shape, dtype, scale, seed=i))
    A = randn((8, 300), torch.float32)
    A[0] = 0.0  # all-zero row: 0 * (127 / 0) is nan, which bitsandbytes stores as 0
    A[1, 3] = float("inf")
    A[2, 4] = -float("inf")
    A[3, 5] = float("nan")
    A[4, ::2] = -0.0
    A[5] = torch.arange(300) % 255 - 127 + 0.5  # absmax 127.5: an inexact scale
    A[6] = 127.0
    A[6, 1:255] = torch.arange(254) - 126.5  # absmax 127: scale exactly 1, exact .5 ties
    A[7] = 254.0
    A[7, 1:] = torch.arange(299) % 253 - 126  # scale 0.5: odd values tie
    check_int8(A.to(dtype))


def test_int8_llama_shape_and_threshold(path):
    check_int8(randn((4096, 4096), torch.float16, 0.02))
    check_int8(torch.nn.Parameter(randn((64, 96), torch.float16)))
    A = randn((64, 96), torch.float16, 2.0)
    check_int8(A, threshold=6.0)


# ---- double quantization: bitsandbytes' quantize_blockwise(absmax - offset, dynamic code, 256) on CPU ----

DYNAMIC = bitsandbytes.functional.create_dynamic_map()


def check_blockwise(A: torch.Tensor, offset: torch.Tensor | None = None, blocksize: int = 256, code=None) -> None:
    code = DYNAMIC if code is None else code
    centred = A if offset is None else A - offset
    ref = torch.ops.bitsandbytes.quantize_blockwise.default(centred, code, blocksize)
    ours = kernels.quantize_blockwise(A, code, blocksize, offset)
    assert_same(ours[0], ref[0])
    assert_same(ours[1], ref[1])  # bitsandbytes' kernel never stores a NaN absmax: NaN values are skipped


def f32(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


BLOCKWISE_SIZES = [0, 1, 2, 7, 8, 9, 255, 256, 257, 511, 1000, 4095, 65536, 65537, 180224, 704512 + 3]


def test_blockwise_sizes_scales_and_offsets(path):
    for i, n in enumerate(BLOCKWISE_SIZES):
        for scale in (1e-30, 1e-3, 0.05, 300.0):
            A = torch.rand(n, generator=torch.Generator().manual_seed(i)) * scale  # absmax-like: >= 0
            check_blockwise(A, A.mean() if n else f32(0.0)[0])
            check_blockwise(randn((n,), torch.float32, scale, seed=i), f32(scale / 3)[0])
            check_blockwise(A)  # no offset: plain quantize_blockwise


def test_blockwise_other_blocksizes_and_chunks(path, monkeypatch):
    A = torch.rand(70000, generator=torch.Generator().manual_seed(1))
    for blocksize in (64, 100, 128, 255, 512, 4096):
        check_blockwise(A, A.mean(), blocksize)
        check_blockwise(A[: 3 * blocksize + 5], A.mean(), blocksize)
    monkeypatch.setattr(kernels, "_BLOCKWISE_CHUNK", 3 * 256 * 7)  # several C calls, split on whole blocks
    for n in (3 * 256 * 7, 3 * 256 * 7 + 1, 10 * 256 * 7 + 300):
        check_blockwise(A[:n], A[:n].mean())


def lut_edges() -> torch.Tensor:
    """The scaled values where bitsandbytes' table index steps (fma((v + 1) / 2, 65535, 0.5) crosses an
    integer), each with 2 float32 neighbours either side: ties of its rounding and truncation."""
    k = torch.arange(65537, dtype=torch.float64)
    return around(((2 * k - 1) / 65535 - 1).clamp(-1, 1).float(), ulps=2)


def test_blockwise_on_and_around_every_table_edge(path):
    # Anchor 1 (absmax 1, offset 0) makes the scaled value the input itself; 2.0 and 2**-70 keep 1 / absmax
    # exact; 3.0 and 0.7 exercise the rounding of x * (1 / absmax) next to each edge.
    edges = lut_edges()
    edges = edges[edges.abs() <= 1]
    for anchor in (1.0, 2.0, 2.0**-70, 3.0, 0.7):
        check_blockwise(anchored_blocks(edges * anchor, anchor, 256))


def anchored_blocks(values: torch.Tensor, anchor: float, blocksize: int) -> torch.Tensor:
    """values in blocks of blocksize - 1 after an element equal to anchor (the block's absmax)."""
    pad = -len(values) % (blocksize - 1)
    values = torch.cat([values, values.new_zeros(pad)]).view(-1, blocksize - 1)
    return torch.cat([values.new_full((len(values), 1), anchor), values], dim=1).reshape(-1)


def test_blockwise_on_and_around_code_values_and_midpoints(path):
    code = DYNAMIC.sort().values
    points = torch.cat([code, (code[:-1] + code[1:]) / 2])
    for anchor in (1.0, 0.25, 3.0, 10.0 / 3):
        check_blockwise(anchored_blocks(around(points * anchor, 15), anchor, 256))
    for dtype in (torch.float16, torch.bfloat16):  # every 16-bit value in [-1, 1], as float32
        check_blockwise(anchored_blocks(all_values(dtype, 1.0).float(), 1.0, 256))


def test_blockwise_special_values(path):
    inf, nan = float("inf"), float("nan")
    A = torch.rand(13 * 256, generator=torch.Generator().manual_seed(3)).view(13, 256)
    A[0] = 0.0  # an all-zero block: absmax 0, codes 0
    A[1] = -0.0
    A[2, ::2] = -0.0
    A[3, 5] = nan  # NaN is skipped by the absmax and coded 0
    A[4] = nan
    A[5, 7] = inf  # absmax inf: finite values scale to 0, inf itself to NaN
    A[6, 9] = -inf
    A[7, 1], A[7, 2] = inf, nan
    A[8] = 1e-45  # subnormal absmax: 1 / absmax is inf, values scale to +-inf or NaN (0 * inf)
    A[8, ::3] = 0.0
    A[9] = 1e-39
    A[9, 4] = -1e-39
    A[10] = 3e38  # |a - offset| overflows to inf with the offset below
    A[11, :128] = 1.0  # ties: +-absmax exactly
    A[11, 128:] = -1.0
    A[12] = torch.linspace(-1, 1, 256)
    flat = A.reshape(-1)
    for offset in (0.0, 0.5, -3e38, 1e-45, -0.0):
        check_blockwise(flat, f32(offset)[0])
    for tail in ([0.0] * 5, [nan, 1.0], [inf, 2.0, -1.0], [1e-45], [nan]):
        check_blockwise(torch.cat([flat, f32(*tail)]), f32(0.25)[0])
    check_blockwise(flat, f32(nan)[0])  # everything NaN: absmax 0, codes 0
    check_blockwise(flat, f32(inf)[0])
    check_blockwise(flat, torch.tensor(0.25))  # a 0-d offset, as absmax.mean() gives


def nearest(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_blockwise as bitsandbytes before 0.50 did it on CPU: the nearest code value (lower on a tie)."""
    blocks = torch.nn.functional.pad(A, (0, -len(A) % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    scaled = (blocks / absmax[:, None]).reshape(-1)[: len(A)]
    table = code.clone()
    table[0] = -1.0
    return (scaled[:, None] - table).abs().argmin(1).to(torch.uint8), absmax


def test_blockwise_checks_once_that_bitsandbytes_uses_its_table(path, monkeypatch, caplog):
    assert kernels._blockwise_is_bitsandbytes()  # bitsandbytes 0.50 here
    # an older bitsandbytes (its nearest-value search): its own op runs, said once
    monkeypatch.setattr(kernels, "_bnb_op", lambda: type("ops", (), {"quantize_blockwise": type("op", (), {
        "default": staticmethod(nearest)})}))  # fmt: skip
    kernels._blockwise_is_bitsandbytes.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=kernels.__name__):
            assert not kernels._blockwise_is_bitsandbytes()
            A = torch.rand(1000)
            assert_same(kernels.quantize_blockwise(A, DYNAMIC, 256)[0], nearest(A, DYNAMIC, 256)[0])
        assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
        assert "unlike qload's C kernel" in caplog.records[0].getMessage()
    finally:
        kernels._blockwise_is_bitsandbytes.cache_clear()


def test_blockwise_builds_the_same_table_for_other_codes(path):
    # bitsandbytes builds its lookup table from any code; ours from the same steps (a 4-bit code padded to 256
    # values with ones has long runs of equal values and ties on the midpoints)
    A = randn((4096,), torch.float32, seed=5)
    for code in (
        DYNAMIC,
        bitsandbytes.functional.create_dynamic_map(signed=False),
        bitsandbytes.functional.create_linear_map(signed=True),
        torch.cat([bitsandbytes.functional.get_4bit_type("nf4", device="cpu"), torch.ones(240)]),
    ):
        check_blockwise(A, f32(0.1)[0], code=code.float())


def params4bit_like_bitsandbytes(w: torch.Tensor, quant_type: str, blocksize: int):
    """The stream's double-quantized Params4bit (our kernels) next to
    bitsandbytes.functional.quantize_4bit(w, compress_statistics=True)."""
    from stages.backends.bnb import quantize

    module = bitsandbytes.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compress_statistics=True,
                                        quant_type=quant_type, device="meta")  # fmt: skip
    module.weight.blocksize = blocksize
    ours = quantize._params4bit(module, module.weight, w)
    ref = bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type=quant_type)
    return ours, ref


# (shape, seed, blocksize); the last four have a 4-bit absmax whose torch mean differs between 1 and 2 threads
DOUBLE_QUANT_CASES = [((64, 64), 0, 64), ((64, 64), 0, 128), ((257, 1000), 1, 64), ((33, 100), 2, 64), ((1, 3), 3, 64)]
THREAD_DEPENDENT = [((3000, 1000), 2, 64), ((4096, 1024), 3, 64), ((700, 3000), 6, 64), ((5632, 2048), 5, 128)]


def with_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_double_quant_state_equals_bitsandbytes(path, quant_type, threads):
    # The offset is torch's mean in both: its bits change with the thread count (a cascade sum per thread),
    # and so do the codes; each thread count must match bitsandbytes' call made with it.
    before = with_threads(threads)
    try:
        for shape, seed, blocksize in DOUBLE_QUANT_CASES + THREAD_DEPENDENT:
            w = randn(shape, torch.float16, 0.02, seed=seed)
            ours, (packed, state) = params4bit_like_bitsandbytes(w, quant_type, blocksize)
            qs = ours.quant_state
            assert_same(ours.data, packed)
            assert_same(qs.absmax, state.absmax)
            assert_same(qs.offset, state.offset)
            assert_same(qs.code, state.code)
            assert_same(qs.state2.absmax, state.state2.absmax)
            assert_same(qs.state2.code, state.state2.code)
            assert (qs.blocksize, qs.dtype, qs.shape, qs.quant_type) == (
                state.blocksize, state.dtype, state.shape, state.quant_type)  # fmt: skip
            assert (qs.state2.blocksize, qs.state2.dtype) == (state.state2.blocksize, state.state2.dtype)
    finally:
        torch.set_num_threads(before)


def test_the_thread_dependent_cases_are_thread_dependent():
    """Keeps the cases above honest: their offsets do differ between 1 and 2 threads (torch 2.13 here)."""
    differ = 0
    for shape, seed, blocksize in THREAD_DEPENDENT:
        absmax = kernels.quantize_4bit(randn(shape, torch.float16, 0.02, seed=seed), blocksize, "nf4")[1]
        means = []
        for n in (1, 2):
            before = with_threads(n)
            try:
                means.append(absmax.mean())
            finally:
                torch.set_num_threads(before)
        differ += not torch.equal(means[0], means[1])
    assert differ >= 2


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 8])
def test_serial_mean_has_the_bits_of_torchs_mean_at_each_thread_count(threads):
    """serial_mean sums the ranges torch's threads would, on one thread (no OpenMP region): the same bits as
    torch's own mean at that thread count, around the grain and the ranges' edges too."""
    import sys

    if sys.platform.startswith("linux"):
        assert kernels._openmp() is not None  # torch's OpenMP runtime found: the serial path is what runs here
    generator = torch.Generator().manual_seed(threads)
    sizes = [1, 1000, 32767, 32768, 32769, 65536, 65537, 98305, 262144, 704512, 1_000_003]
    before = with_threads(threads)
    try:
        for n in sizes:
            for scale in (1e-3, 1.0, 37.0):
                x = torch.rand(n, generator=generator) * scale
                assert_same(kernels.serial_mean(x), x.mean())
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_invalid_arguments():
    A = torch.zeros(64, dtype=torch.float16)
    with pytest.raises(ValueError, match="'int4'.*nf4, fp4"):
        kernels.quantize_4bit(A, quant_type="int4")
    with pytest.raises(ValueError, match="48.*32, 64"):
        kernels.quantize_4bit(A, blocksize=48)
    with pytest.raises(ValueError, match="torch.float64.*torch.float16"):
        kernels.quantize_4bit(A.double())
    with pytest.raises(ValueError, match="'meta'.*cpu"):
        kernels.quantize_4bit(A.to("meta"))
    with pytest.raises(ValueError, match="torch.int8"):
        kernels.int8_vectorwise_quant(torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="3.*2"):
        kernels.int8_vectorwise_quant(torch.zeros(2, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="torch.float16.*torch.float32"):
        kernels.quantize_blockwise(A, DYNAMIC)
    with pytest.raises(ValueError, match="blocksize 0"):
        kernels.quantize_blockwise(A.float(), DYNAMIC, 0)
    with pytest.raises(ValueError, match="16 values"):
        kernels.quantize_blockwise(A.float(), DYNAMIC[:16])


def test_without_a_compiler_the_exact_op_runs_and_says_so_once(no_c_compiler, caplog):
    A = randn((64, 100), torch.float16)
    with caplog.at_level("WARNING", logger=kernels.__name__):
        for quant_type in QUANT_TYPES:
            check_4bit(A, quant_type)
        check_int8(A)
        check_blockwise(A.float().reshape(-1), A.float().mean())
    said = [r.getMessage() for r in caplog.records if r.name == kernels.__name__]
    assert len(said) == 1 and "no C compiler found" in said[0] and "bitsandbytes' own op" in said[0]
    assert kernels.describe().startswith("bitsandbytes' own op (no qload C kernel: no C compiler found")


def test_a_built_kernel_needs_no_compiler(tmp_path, monkeypatch):
    lib, where = kernels.library()  # built here if this checkout was neither installed nor run before
    if lib is None:
        pytest.skip(f"no C kernels here: {where}")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "cc"))
    kernels.library.cache_clear()
    try:
        assert kernels.library()[0] is not None and kernels.compiler() is None
        assert kernels.describe().startswith("qload C kernel")
        check_4bit(randn((64, 100), torch.float16), "nf4")
    finally:
        kernels.library.cache_clear()


def test_a_stale_build_is_not_used(tmp_path, monkeypatch):
    """A library built from another version of qkernels.c (an older install) is rebuilt, never run."""
    if kernels.compiler() is None:
        pytest.skip("no C compiler here")
    old = tmp_path / "old.so"
    kernels.build(old, kernels.compiler(), "0000000000000000")
    assert kernels._open(old, kernels.source_id()) is None
    assert kernels._open(old, "0000000000000000") is not None
