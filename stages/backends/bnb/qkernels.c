/* bitsandbytes' CPU quantization ops for weights, byte-identical, in plain C (see kernels.py for why).
 *
 * Built at install by setup.py (no compiler needed at run time), or on first use by kernels.py into the
 * user's cache where a checkout was not installed. No Python or torch headers: kernels.py calls these through
 * ctypes, which releases the GIL, and splits a tensor across its own threads.
 *
 * The arithmetic is bitsandbytes' default (torch) kernel's, in float32:
 *   4-bit: absmax = max |x| per block; scaled = x * (1 / max(absmax, 1e-38)); bucket = how many of the 15
 *          sorted code midpoints scaled is not <= to (torch.bucketize; NaN -> the last bucket); the code index
 *          is order[bucket]; two indices per byte, the first in the high nibble.
 *   int8:  stats = max |x| per row; q = round_half_even(x * ((1 / stats) * 127)), NaN -> 0.
 * A NaN statistic is stored as the canonical quiet NaN.
 *
 * Double quantization (compress_statistics) quantizes the 4-bit absmax again, blockwise with the 8-bit dynamic
 * code; bitsandbytes runs that in its own native CPU kernel (libbitsandbytes_cpu, quantize_cpu), whose steps
 * in float32 are, per block of x = absmax4 - offset:
 *   absmax = max(0, max |x|) with NaN ignored; an all-zero block gives codes 0;
 *   v = clamp(x * (1 / absmax), -1, 1) (NaN passes); index = (uint16)(int)fma((v + 1) * 0.5, 65535, 0.5)
 *   (its compiler contracted that step into a fused multiply-add; we run the same instruction, though the
 *   truncated index seems not to tell it from two roundings; NaN converts to index 0);
 *   code = lut[index], a 65536-entry table built from the code's midpoints (qload_blockwise_lut).
 * That table only approximates the nearest code value; we copy it, not the nearest value. (Read from bitsandbytes
 * 0.50's library; its releases before used a binary search for the nearest value: tests/test_kernels.py compares.)
 * Build with -O3: the loops below are written for the auto-vectorizer (no branches in the inner loops).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef QLOAD_SOURCE_ID
#define QLOAD_SOURCE_ID "unknown"
#endif

/* Which build of this file a library is: kernels.py compares it with the source's hash. */
const char *qload_source_id(void) { return QLOAD_SOURCE_ID; }

enum { F16 = 0, BF16 = 1, F32 = 2 };

#if (defined(__x86_64__) || defined(__aarch64__)) && defined(__FLT16_MAX__)
typedef _Float16 half_t;
#define HAVE_FLOAT16 1
#endif

static inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

#ifndef HAVE_FLOAT16
static inline float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return bits_to_float(sign | 0x7f800000 | (man << 13));
    if (exp == 0) {
        float v = (float)man * 5.9604644775390625e-08f; /* 2^-24: subnormals and zero, exact */
        return sign ? -v : v;
    }
    return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}
#endif

/* n elements of `dtype` at `src` as float32 at `dst` (exact: every 16-bit value is a float32). */
static inline void to_float(const void *src, int dtype, int64_t n, float *restrict dst) {
    if (dtype == F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == BF16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(s[i]);
    } else {
#ifdef HAVE_FLOAT16
        const half_t *s = (const half_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = (float)s[i];
#else
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = f16_to_float(s[i]);
#endif
    }
}

/* max |x|, NaN if any x is NaN (as torch's amax). */
static inline float absmax_of(const float *restrict x, int64_t n) {
    float m = 0.0f;
    int nan = 0;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        m = a > m ? a : m;
        nan |= x[i] != x[i];
    }
    return nan ? NAN : m;
}

#define MAX_BLOCK 4096

/* Blocks [0, nblocks) of `src` (elements of `dtype`, blocksize each): packed codes (blocksize / 2 bytes per
 * block) and absmax. midpoints: the 15 sorted midpoints; order: the code index of each of the 16 buckets. */
static void quantize_4bit_generic(const void *src, int dtype, int64_t nblocks, int blocksize, const float *midpoints,
                         const uint8_t *order, uint8_t *restrict packed, float *restrict absmax) {
    float x[MAX_BLOCK];
    uint8_t code[MAX_BLOCK];
    float mid[15];
    uint8_t ord[16];
    memcpy(mid, midpoints, sizeof mid);
    memcpy(ord, order, sizeof ord);
    const size_t itemsize = dtype == F32 ? 4 : 2;
    for (int64_t b = 0; b < nblocks; b++) {
        to_float((const char *)src + (size_t)b * blocksize * itemsize, dtype, blocksize, x);
        float m = absmax_of(x, blocksize);
        absmax[b] = m;
        float clamped = m < 1e-38f ? 1e-38f : m; /* NaN stays NaN, as torch's clamp */
        float r = 1.0f / clamped;
        for (int i = 0; i < blocksize; i++) {
            float v = x[i] * r;
            int k = 0;
            for (int j = 0; j < 15; j++) k += !(v <= mid[j]);
            code[i] = (uint8_t)k;
        }
        uint8_t *out = packed + (size_t)b * (blocksize / 2);
        for (int i = 0; i < blocksize / 2; i++) out[i] = (uint8_t)(ord[code[2 * i]] << 4 | ord[code[2 * i + 1]]);
    }
}

/* Rows [0, rows) of a (rows, cols) matrix of `dtype`: int8 rows and their absmax. */
static void int8_rows_generic(const void *src, int dtype, int64_t rows, int64_t cols, int8_t *restrict q,
                     float *restrict stats) {
    enum { STEP = 4096 };
    float x[STEP];
    const size_t itemsize = dtype == F32 ? 4 : 2;
    for (int64_t row = 0; row < rows; row++) {
        const char *in = (const char *)src + (size_t)row * cols * itemsize;
        float m = 0.0f;
        int nan = 0;
        for (int64_t c = 0; c < cols; c += STEP) {
            int64_t n = cols - c < STEP ? cols - c : STEP;
            to_float(in + c * itemsize, dtype, n, x);
            float part = absmax_of(x, n);
            nan |= part != part;
            m = part > m ? part : m;
        }
        if (nan) m = NAN;
        stats[row] = m;
        float scale = (1.0f / m) * 127.0f;
        int8_t *out = q + row * cols;
        for (int64_t c = 0; c < cols; c += STEP) {
            int64_t n = cols - c < STEP ? cols - c : STEP;
            to_float(in + c * itemsize, dtype, n, x);
            for (int64_t i = 0; i < n; i++) {
                float v = x[i] * scale;
                v = v != v ? 0.0f : __builtin_roundevenf(v);
                out[c + i] = (int8_t)v;
            }
        }
    }
}

/* bitsandbytes' lookup table for blockwise 8-bit quantization with `code` (256 sorted values in [-1, 1]):
 * entry i holds the first code index whose upper midpoint is not below -1 + 2i / 65535. Same float32 steps as
 * its build_quantize_lut, so the table is the same bytes. */
void qload_blockwise_lut(const float *code, uint8_t *lut) {
    float mid[255];
    for (int i = 0; i < 255; i++) mid[i] = (code[i] + code[i + 1]) * 0.5f;
    int k = 0;
    for (int i = 0; i < 65536; i++) {
        float v = ((float)i + (float)i) / 65535.0f - 1.0f;
        while (k < 255 && mid[k] < v) k++;
        lut[i] = (uint8_t)k;
    }
}

/* One scaled value -> its code index through the table, as bitsandbytes: clamp (NaN passes), then the fused
 * multiply-add (fmaf: one rounding, as its contracted instruction), truncated to int, low 16 bits. */
static inline uint8_t code8_of(float v, const uint8_t *lut) {
    v = v < -1.0f ? -1.0f : (1.0f < v ? 1.0f : v);
    if (v != v) return lut[0]; /* its float->int conversion of NaN gives 0x80000000: index 0 */
    return lut[(uint16_t)(int32_t)fmaf((v + 1.0f) * 0.5f, 65535.0f, 0.5f)];
}

/* absmax of one block of x = a - offset: NaN ignored, never below 0 (bitsandbytes' running max starts at -inf,
 * skips NaN by its strict compare, and is then maxed with 0). */
static inline float centered_absmax(const float *a, int64_t n, float offset) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = fabsf(a[i] - offset);
        m = v > m ? v : m;
    }
    return m;
}

/* Blocks of a - offset (n elements, the last block may be short): 8-bit codes and one absmax per block. */
static void blockwise_generic(const float *a, int64_t n, float offset, int blocksize, const uint8_t *lut,
                              uint8_t *restrict out, float *restrict absmax) {
    for (int64_t start = 0, b = 0; start < n; start += blocksize, b++) {
        int64_t len = n - start < blocksize ? n - start : blocksize;
        float m = centered_absmax(a + start, len, offset);
        absmax[b] = m;
        if (m == 0.0f) {
            memset(out + start, 0, (size_t)len);
            continue;
        }
        float r = 1.0f / m;
        for (int64_t i = 0; i < len; i++) out[start + i] = code8_of((a[start + i] - offset) * r, lut);
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,f16c")))

/* 8 elements of `dtype` at p as float32. */
AVX2 static inline __m256 load8(const void *p, int dtype) {
    if (dtype == F32) return _mm256_loadu_ps((const float *)p);
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (dtype == F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* max |x| over n (a multiple of 8) elements, NaN if any is NaN. */
AVX2 static inline float absmax8(const char *p, int dtype, int64_t n, size_t itemsize) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        __m256 x = load8(p + i * itemsize, dtype);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        m = _mm256_max_ps(_mm256_andnot_ps(sign, x), m);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm256_movemask_ps(nan) ? NAN : _mm_cvtss_f32(h);
}

/* Code indices of 8 scaled values: a 4-level binary search over the midpoints (each level's thresholds picked
 * by the bucket so far), `!(v <= t)` so that NaN goes to the last bucket; then order[bucket]. */
AVX2 static inline __m256i codes8(__m256 v, const __m256 level[5], __m256i order, int sorted) {
    __m256 c0 = _mm256_cmp_ps(v, level[0], _CMP_NLE_UQ); /* level 0: one threshold; level 1: one of two */
    __m256 c1 = _mm256_cmp_ps(v, _mm256_blendv_ps(level[1], level[2], c0), _CMP_NLE_UQ);
    __m256i idx = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_castps_si256(c0));
    idx = _mm256_sub_epi32(_mm256_slli_epi32(idx, 1), _mm256_castps_si256(c1));
    for (int l = 3; l < 5; l++) { /* levels 2 and 3: 4 and 8 thresholds, picked by the bucket so far */
        __m256 t = _mm256_permutevar8x32_ps(level[l], idx);
        idx = _mm256_sub_epi32(_mm256_slli_epi32(idx, 1), _mm256_castps_si256(_mm256_cmp_ps(v, t, _CMP_NLE_UQ)));
    }
    if (sorted) return idx;
    return _mm256_and_si256(_mm256_shuffle_epi8(order, idx), _mm256_set1_epi32(0xff));
}

/* 8 code indices (int32) -> 4 packed bytes (in the low 32-bit lanes 0..3). */
AVX2 static inline __m128i pack8(__m256i c) {
    __m256i t = _mm256_or_si256(_mm256_slli_epi64(c, 4), _mm256_srli_epi64(c, 32));
    return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(t, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0)));
}

AVX2 static void quantize_4bit_avx2(const void *src, int dtype, int64_t nblocks, int blocksize, const float *mid,
                                    const uint8_t *order, uint8_t *restrict packed, float *restrict absmax) {
    __m256 level[5];
    level[0] = _mm256_set1_ps(mid[7]);
    level[1] = _mm256_set1_ps(mid[3]);
    level[2] = _mm256_set1_ps(mid[11]);
    level[3] = _mm256_setr_ps(mid[1], mid[5], mid[9], mid[13], 0, 0, 0, 0);
    level[4] = _mm256_setr_ps(mid[0], mid[2], mid[4], mid[6], mid[8], mid[10], mid[12], mid[14]);
    __m256i ord = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)order));
    int sorted = 1;
    for (int i = 0; i < 16; i++) sorted &= order[i] == i;
    const size_t itemsize = dtype == F32 ? 4 : 2;
    for (int64_t b = 0; b < nblocks; b++) {
        const char *in = (const char *)src + (size_t)b * blocksize * itemsize;
        float m = absmax8(in, dtype, blocksize, itemsize);
        absmax[b] = m;
        __m256 r = _mm256_set1_ps(1.0f / (m < 1e-38f ? 1e-38f : m));
        uint8_t *out = packed + (size_t)b * (blocksize / 2);
        for (int i = 0; i < blocksize; i += 32) {
            __m128i p[4];
            for (int j = 0; j < 4; j++) {
                __m256 v = _mm256_mul_ps(load8(in + (i + 8 * j) * itemsize, dtype), r);
                p[j] = pack8(codes8(v, level, ord, sorted));
            }
            __m128i bytes = _mm_packus_epi16(_mm_packus_epi32(p[0], p[1]), _mm_packus_epi32(p[2], p[3]));
            /* p[j] holds 4 bytes in its 4 int32 lanes; after the packs, lanes 0-3 of p[0] are bytes 0-3, etc. */
            _mm_storeu_si128((__m128i *)(out + i / 2), bytes);
        }
    }
}

AVX2 static void int8_rows_avx2(const void *src, int dtype, int64_t rows, int64_t cols, int8_t *restrict q,
                                float *restrict stats) {
    const size_t itemsize = dtype == F32 ? 4 : 2;
    const int64_t body = cols - cols % 32;
    for (int64_t row = 0; row < rows; row++) {
        const char *in = (const char *)src + (size_t)row * cols * itemsize;
        float m = absmax8(in, dtype, cols - cols % 8, itemsize);
        for (int64_t c = cols - cols % 8; c < cols; c++) { /* the tail, as the generic kernel */
            float x;
            to_float(in + c * itemsize, dtype, 1, &x);
            float a = fabsf(x);
            m = (x != x || m != m) ? NAN : (a > m ? a : m);
        }
        stats[row] = m;
        float scale = (1.0f / m) * 127.0f;
        __m256 s = _mm256_set1_ps(scale);
        int8_t *out = q + row * cols;
        for (int64_t c = 0; c < body; c += 32) {
            __m256i i32[4];
            for (int j = 0; j < 4; j++) {
                __m256 v = _mm256_mul_ps(load8(in + (c + 8 * j) * itemsize, dtype), s);
                v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q)); /* NaN -> 0 */
                i32[j] = _mm256_cvtps_epi32(v);
            }
            __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
            w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(out + c), w);
        }
        for (int64_t c = body; c < cols; c++) {
            float x;
            to_float(in + c * itemsize, dtype, 1, &x);
            float v = x * scale;
            out[c] = (int8_t)(v != v ? 0.0f : __builtin_roundevenf(v));
        }
    }
}

#define AVX2_FMA __attribute__((target("avx2,f16c,fma")))

/* The double-quant kernel on 8 values at a time; the fused multiply-add is the instruction bitsandbytes' build
 * runs. Tail elements of a short last block go through the scalar steps (code8_of: fmaf, the same rounding). */
AVX2_FMA static void blockwise_avx2(const float *a, int64_t n, float offset, int blocksize, const uint8_t *lut,
                                    uint8_t *restrict out, float *restrict absmax) {
    const __m256 sign = _mm256_set1_ps(-0.0f), off = _mm256_set1_ps(offset);
    const __m256 one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f), half = _mm256_set1_ps(0.5f);
    const __m256 top = _mm256_set1_ps(65535.0f);
    for (int64_t start = 0, b = 0; start < n; start += blocksize, b++) {
        const float *x = a + start;
        int64_t len = n - start < blocksize ? n - start : blocksize, body = len - len % 8;
        __m256 mv = _mm256_setzero_ps();
        for (int64_t i = 0; i < body; i += 8) /* max_ps(v, m) returns m where v is NaN: NaN ignored */
            mv = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(_mm256_loadu_ps(x + i), off)), mv);
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float m = _mm_cvtss_f32(h);
        for (int64_t i = body; i < len; i++) {
            float v = fabsf(x[i] - offset);
            m = v > m ? v : m;
        }
        absmax[b] = m;
        if (m == 0.0f) {
            memset(out + start, 0, (size_t)len);
            continue;
        }
        float r = 1.0f / m;
        const __m256 rv = _mm256_set1_ps(r);
        for (int64_t i = 0; i < body; i += 8) {
            __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), off), rv);
            v = _mm256_min_ps(one, _mm256_max_ps(minus_one, v)); /* operand order keeps NaN, as the clamp */
            __m256 f = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_add_ps(v, one), half), top, half);
            int32_t idx[8];
            _mm256_storeu_si256((__m256i *)idx, _mm256_cvttps_epi32(f)); /* NaN -> 0x80000000: index 0 */
            for (int j = 0; j < 8; j++) out[start + i + j] = lut[(uint16_t)idx[j]];
        }
        for (int64_t i = body; i < len; i++) out[start + i] = code8_of((x[i] - offset) * r, lut);
    }
}

static int portable_only = 0;

static int has_avx2(void) {
    if (portable_only) return 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

static int has_fma(void) { return has_avx2() && __builtin_cpu_supports("fma"); }
#else
static int portable_only = 0;
static int has_avx2(void) { return 0; }
static int has_fma(void) { return 0; }
#define quantize_4bit_avx2 quantize_4bit_generic
#define int8_rows_avx2 int8_rows_generic
#define blockwise_avx2 blockwise_generic
#endif

/* Which code path this machine runs: 1 AVX2, 0 portable C. */
int qload_simd(void) { return has_avx2(); }

/* Tests: run the portable C path on an AVX2 machine too (on != 0), or go back. */
void qload_portable_only(int on) { portable_only = on; }

void qload_quantize_4bit(const void *src, int dtype, int64_t nblocks, int blocksize, const float *midpoints,
                         const uint8_t *order, uint8_t *packed, float *absmax) {
    (has_avx2() ? quantize_4bit_avx2 : quantize_4bit_generic)(src, dtype, nblocks, blocksize, midpoints, order,
                                                              packed, absmax);
}

void qload_int8_rows(const void *src, int dtype, int64_t rows, int64_t cols, int8_t *q, float *stats) {
    (has_avx2() ? int8_rows_avx2 : int8_rows_generic)(src, dtype, rows, cols, q, stats);
}

/* bitsandbytes' quantize_blockwise(a - offset, code, blocksize) on float32 `a` of n elements, with the table
 * of qload_blockwise_lut: the centring (a float32 subtraction, as torch's) is done as each value is read,
 * so no centred copy is made. Blocks are independent: a caller may split `a` at any multiple of blocksize. */
void qload_quantize_blockwise(const float *a, int64_t n, float offset, int blocksize, const uint8_t *lut,
                              uint8_t *out, float *absmax) {
    (has_fma() ? blockwise_avx2 : blockwise_generic)(a, n, offset, blocksize, lut, out, absmax);
}
