/* Fused per-token activation quantization and the W8A8 epilogue, for bitsmith's oneDNN int8 path.
 *
 * Eager torch needs five passes over an activation to quantize it per row (abs, amax, mul, round,
 * cast); these loops read it once for the row maximum (kept in L1/L2) and once to write 1-byte codes.
 * Built at first use by bitsmith/nn/native.py with the machine's C compiler; OpenMP threads come from
 * the same libgomp that torch uses. Rounding is round-half-to-even, as torch.round.
 */
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* x: (rows, cols) float32, row-major. codes: (rows, cols) uint8 = round(x * 127 / amax_row) + 128.
 * scale: (rows) float32 = amax_row / 127 (amax floored at 1e-12). */
void bitsmith_quantize_per_token_u8(const float *x, int64_t rows, int64_t cols, uint8_t *codes, float *scale,
                                    int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; ++i) {
        const float *xi = x + i * cols;
        uint8_t *ci = codes + i * cols;
        float amax = 0.0f;
#pragma omp simd reduction(max : amax)
        for (int64_t j = 0; j < cols; ++j) {
            float a = fabsf(xi[j]);
            amax = a > amax ? a : amax;
        }
        amax = amax > 1e-12f ? amax : 1e-12f;
        const float inv = 127.0f / amax;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) {
            ci[j] = (uint8_t)((int32_t)nearbyintf(xi[j] * inv) + 128);
        }
        scale[i] = amax / 127.0f;
    }
}

/* In place: out[i, j] = out[i, j] * scale[i] + bias[j] (bias may be NULL). out: (rows, cols) float32. */
void bitsmith_scale_rows_add_bias(float *out, int64_t rows, int64_t cols, const float *scale, const float *bias,
                                  int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; ++i) {
        float *oi = out + i * cols;
        const float s = scale[i];
        if (bias) {
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) oi[j] = oi[j] * s + bias[j];
        } else {
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) oi[j] = oi[j] * s;
        }
    }
}

/* Static (calibrated) per-tensor quantization: codes = clamp(round(x / scale) + zero_point, 0, 255).
 * x and codes have n elements. */
void bitsmith_quantize_static_u8(const float *x, int64_t n, float inv_scale, int32_t zero_point, uint8_t *codes,
                                 int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t start = 0; start < n; start += 16384) {
        const int64_t end = start + 16384 < n ? start + 16384 : n;
#pragma omp simd
        for (int64_t j = start; j < end; ++j) {
            float q = nearbyintf(x[j] * inv_scale) + (float)zero_point;
            q = q < 0.0f ? 0.0f : (q > 255.0f ? 255.0f : q);
            codes[j] = (uint8_t)q;
        }
    }
}

/* Static quantization with a per-input-channel multiplier (an explicit SmoothQuant scale folded into
 * the step): codes[i, j] = clamp(round(x[i, j] * mult[j]) + zero_point, 0, 255), x (rows, cols). */
void bitsmith_quantize_static_channel_u8(const float *x, int64_t rows, int64_t cols, const float *mult,
                                         int32_t zero_point, uint8_t *codes, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; ++i) {
        const float *xi = x + i * cols;
        uint8_t *ci = codes + i * cols;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) {
            float q = nearbyintf(xi[j] * mult[j]) + (float)zero_point;
            q = q < 0.0f ? 0.0f : (q > 255.0f ? 255.0f : q);
            ci[j] = (uint8_t)q;
        }
    }
}

/* ---- exact int8 products without VNNI ------------------------------------------------------------------
 * Without VNNI, oneDNN sums pairs of u8 x s8 products in saturating int16: 255 * 127 * 2 does not fit. Every
 * code a is therefore split into p = a >> 1 (at most 127) and q = a - p (at most 128, 129 for an odd zero
 * point, see below) and the GEMM runs once over [p | q] against the weight repeated, [W | W]: twice the
 * inner dimension, every pair of products now fits in int16 (129 * 127 * 2 = 32766), and
 *     sum_k (p_k - c) w_k + (q_k - c) w_k = sum_k (a_k - z) w_k     with c = (z + 1) / 2 (integer division),
 * because q absorbs the odd bit of z: q = a - p + (z & 1), so p + q - 2c = a - z. Weights must lie in
 * [-127, 127].
 * A row of cols codes becomes 2 * cols codes, block by block ([p | q] for every run of `block` columns, so
 * that grouped convolutions keep each group's channels together). */

static inline void split_code(int32_t a, int32_t odd, uint8_t *p, uint8_t *q) {
    const int32_t half = a >> 1;
    *p = (uint8_t)half;
    *q = (uint8_t)(a - half + odd);
}

/* Per-token symmetric codes (as bitsmith_quantize_per_token_u8, zero point 128) written split: codes is
 * (rows, 2 * cols) uint8 [p | q] with zero point 64 for both halves. */
void bitsmith_quantize_per_token_split_u8(const float *x, int64_t rows, int64_t cols, uint8_t *codes, float *scale,
                                          int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; ++i) {
        const float *xi = x + i * cols;
        uint8_t *pi = codes + i * 2 * cols;
        uint8_t *qi = pi + cols;
        float amax = 0.0f;
#pragma omp simd reduction(max : amax)
        for (int64_t j = 0; j < cols; ++j) {
            float a = fabsf(xi[j]);
            amax = a > amax ? a : amax;
        }
        amax = amax > 1e-12f ? amax : 1e-12f;
        const float inv = 127.0f / amax;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) {
            const int32_t a = (int32_t)nearbyintf(xi[j] * inv) + 128;
            pi[j] = (uint8_t)(a >> 1);
            qi[j] = (uint8_t)(a - (a >> 1));
        }
        scale[i] = amax / 127.0f;
    }
}

/* Static codes a = clamp(round(x * mult[j]) + zero_point, 0, 255) (mult NULL: inv_scale for every column),
 * written split block by block: codes is (rows, 2 * cols), zero point zero_point / 2 for both halves. */
void bitsmith_quantize_static_split_u8(const float *x, int64_t rows, int64_t cols, int64_t block, const float *mult,
                                       float inv_scale, int32_t zero_point, uint8_t *codes, int threads) {
    const int32_t odd = zero_point & 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; ++i) {
        const float *xi = x + i * cols;
        uint8_t *ci = codes + i * 2 * cols;
        for (int64_t start = 0; start < cols; start += block) {
            uint8_t *pi = ci + 2 * start;
            uint8_t *qi = pi + block;
            const float *xb = xi + start;
            const float *mb = mult ? mult + start : 0;
            for (int64_t j = 0; j < block; ++j) {
                float v = nearbyintf(xb[j] * (mb ? mb[j] : inv_scale)) + (float)zero_point;
                v = v < 0.0f ? 0.0f : (v > 255.0f ? 255.0f : v);
                split_code((int32_t)v, odd, pi + j, qi + j);
            }
        }
    }
}

/* ---- dequantizing packed low-bit weights ----------------------------------------------------------------
 * packed: the little-endian bit stream of bitsmith.formats.packing.pack_codes (code k of the flattened
 * (rows, cols) matrix at bits [k * bits, (k + 1) * bits)), n_bytes long; scale and zero: (rows, groups) with
 * groups = ceil(cols / group);
 * out: (rows, cols) float32 = (code - zero) * scale. */
void bitsmith_dequantize_packed(const uint8_t *packed, int64_t n_bytes, int bits, int64_t rows, int64_t cols,
                                int64_t group, const float *scale, const uint8_t *zero, float *out, int threads) {
    const int64_t groups = (cols + group - 1) / group;
    const uint32_t mask = (1u << bits) - 1u;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; ++i) {
        float *oi = out + i * cols;
        for (int64_t g = 0; g < groups; ++g) {
            const float s = scale[i * groups + g];
            const float z = (float)zero[i * groups + g];
            const int64_t end = (g + 1) * group < cols ? (g + 1) * group : cols;
            for (int64_t j = g * group; j < end; ++j) {
                const int64_t bit = (i * cols + j) * bits;
                const int64_t byte = bit >> 3;
                const uint32_t next = byte + 1 < n_bytes ? (uint32_t)packed[byte + 1] << 8 : 0u;
                const uint32_t word = (uint32_t)packed[byte] | next;
                oi[j] = ((float)((word >> (bit & 7)) & mask) - z) * s;
            }
        }
    }
}

/* ---- int4 weights times a few rows of activations (decoding) ----------------------------------------------
 * packed: 4-bit codes as above (code j of row i in byte (i * cols + j) / 2, low nibble first), cols and group
 * even so that every row and group starts on a byte; scale (rows, groups) float32, zero (rows, groups) uint8;
 * x: (m, cols) float32 with m <= 16; bias: rows floats or NULL; out: (m, rows) float32.
 * Per group, s * (sum_j x_j q_j - z * sum_j x_j), the codes read straight from the packed bytes: a decode step
 * reads 4 bits a weight, and the few rows of x reuse each group's bytes from the cache. */
#define BITSMITH_INT4_MAX_ROWS 16

#if defined(__AVX2__) && defined(__FMA__)
/* The sum of the 8 lanes. */
static inline float hsum8(__m256 a) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}
#endif

/* One output row: the weights of row `row` dequantized a group at a time, (q - z) * s, times each row of x. */
static void int4_row(const uint8_t *row, int64_t half, int64_t groups, int64_t group, const float *scale,
                     const uint8_t *zero, const float *even, const float *odd, int64_t m, float *acc) {
    for (int64_t r = 0; r < m; ++r) acc[r] = 0.0f;
    int64_t g = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (group % 16 == 0 && m == 1) {  /* decoding one sequence: accumulators in registers, two chains each */
        __m256 e0 = _mm256_setzero_ps(), o0 = _mm256_setzero_ps(), e1 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps();
        const __m256i low = _mm256_set1_epi32(15);
#define BITSMITH_INT4_STEP(E, O, B)                                                                          \
    do {                                                                                                    \
        const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + (B))));          \
        E = _mm256_fmadd_ps(_mm256_loadu_ps(even + (B)),                                                    \
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(codes, low)), s, zs), E);   \
        O = _mm256_fmadd_ps(_mm256_loadu_ps(odd + (B)),                                                     \
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(codes, 4)), s, zs), O);    \
    } while (0)
        for (; g < groups && (g + 1) * group <= 2 * half; ++g) {
            const __m256 s = _mm256_set1_ps(scale[g]);
            const __m256 zs = _mm256_set1_ps(-(float)zero[g] * scale[g]);
            const int64_t end = (g + 1) * group / 2;
            int64_t b = g * group / 2;
            for (; b + 16 <= end; b += 16) {
                BITSMITH_INT4_STEP(e0, o0, b);
                BITSMITH_INT4_STEP(e1, o1, b + 8);
            }
            if (b < end) BITSMITH_INT4_STEP(e0, o0, b);
        }
#undef BITSMITH_INT4_STEP
        acc[0] = hsum8(_mm256_add_ps(_mm256_add_ps(e0, o0), _mm256_add_ps(e1, o1)));
    } else if (group % 16 == 0) {  /* a few rows: 16 weights converted once for all of them */
        __m256 sum[BITSMITH_INT4_MAX_ROWS];
        for (int64_t r = 0; r < m; ++r) sum[r] = _mm256_setzero_ps();
        const __m256i low = _mm256_set1_epi32(15);
        for (; g < groups && (g + 1) * group <= 2 * half; ++g) {
            const __m256 s = _mm256_set1_ps(scale[g]);
            const __m256 zs = _mm256_set1_ps(-(float)zero[g] * scale[g]);
            for (int64_t b = g * group / 2; b < (g + 1) * group / 2; b += 8) {
                const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + b)));
                const __m256 w_even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(codes, low)), s, zs);
                const __m256 w_odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(codes, 4)), s, zs);
                for (int64_t r = 0; r < m; ++r) {
                    sum[r] = _mm256_fmadd_ps(_mm256_loadu_ps(even + r * half + b), w_even, sum[r]);
                    sum[r] = _mm256_fmadd_ps(_mm256_loadu_ps(odd + r * half + b), w_odd, sum[r]);
                }
            }
        }
        for (int64_t r = 0; r < m; ++r) acc[r] = hsum8(sum[r]);
    }
#endif
    for (; g < groups; ++g) {  /* the rest (or everything without AVX2): plain C */
        const float s = scale[g], z = (float)zero[g];
        const int64_t end = (g + 1) * group < 2 * half ? (g + 1) * group / 2 : half;
        for (int64_t b = g * group / 2; b < end; ++b) {
            const float w_even = ((float)(row[b] & 15u) - z) * s, w_odd = ((float)(row[b] >> 4) - z) * s;
            for (int64_t r = 0; r < m; ++r) acc[r] += even[r * half + b] * w_even + odd[r * half + b] * w_odd;
        }
    }
}

void bitsmith_int4_matmul(const uint8_t *packed, int64_t rows, int64_t cols, int64_t group, const float *scale,
                          const uint8_t *zero, const float *x, int64_t m, const float *bias, float *out,
                          int threads) {
    const int64_t groups = (cols + group - 1) / group, half = cols / 2;
    /* x split into its even and odd columns, the low and high nibbles' partners: contiguous loads */
    float *even = malloc(sizeof(float) * (size_t)(m * half)), *odd = malloc(sizeof(float) * (size_t)(m * half));
    if (!even || !odd) {
        free(even), free(odd);
        for (int64_t k = 0; k < m * rows; ++k) out[k] = NAN;  /* a few KB not allocated: NaN, never a wrong number */
        return;
    }
    for (int64_t r = 0; r < m; ++r)
        for (int64_t b = 0; b < half; ++b) {
            even[r * half + b] = x[r * cols + 2 * b];
            odd[r * half + b] = x[r * cols + 2 * b + 1];
        }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; ++i) {
        float acc[BITSMITH_INT4_MAX_ROWS];
        int4_row(packed + i * half, half, groups, group, scale + i * groups, zero + i * groups, even, odd, m, acc);
        for (int64_t r = 0; r < m; ++r) out[r * rows + i] = acc[r] + (bias ? bias[i] : 0.0f);
    }
    free(even), free(odd);
}

/* ---- decoding one token of a Llama-family model: a whole block a call ---------------------------------------
 * The step transformers' LlamaDecoderLayer takes for one new token at batch 1, in one native call, so that
 * decoding pays for the weights it reads and not for the framework's per-op cost:
 *     x = rmsnorm(h) * norm1;  q, k, v = Wq x, Wk x, Wv x;  rotary (rotate_half layout) on q and k;
 *     k, v appended to the cache at `pos`;  attention of each head over positions 0..pos (grouped heads);
 *     h += Wo attn;  x = rmsnorm(h) * norm2;  h += Wdown (silu(Wgate x) * Wup x)
 * Weights are int4 codes as pack_codes writes them (kind 0) or float32 (kind 1). With q8 != 0 the input of
 * each int4 matmul is rounded to int8 in blocks of 32 (one scale a block, as llama.cpp's Q8_0 does) and the
 * products are summed in integers (AVX2 maddubs); with q8 == 0 the inputs stay float32 (int4_row). */
typedef struct {
    int32_t kind;  /* 0: int4 packed, 1: float32 */
    int32_t group;
    int64_t rows, cols;
    const uint8_t *packed;
    const float *scale;   /* (rows, groups) */
    const uint8_t *zero;  /* (rows, groups) */
    const float *weight;  /* kind 1: (rows, cols) */
    const float *bias;    /* rows, or NULL */
    const float *minimum; /* kind 0 with a float min a group, w = q * scale + min (GGUF's Q4_1): (rows, groups)
                           * and zero NULL; NULL otherwise (w = (q - zero) * scale) */
} bitsmith_weight;

/* x (cols) rounded to int8 in blocks of 32, split into even and odd columns as the packed nibbles are (xe[i] is
 * column 2i, xo[i] column 2i + 1); dx[b] the scale of block b, bsum[b] = dx[b] * the sum of its codes. */
typedef struct {
    int8_t *xe, *xo;
    float *dx, *bsum;
} q8_input;

static int q8_alloc(q8_input *q, int64_t cols) {
    const int64_t blocks = (cols + 31) / 32;
    q->xe = malloc((size_t)(cols / 2 + 32)), q->xo = malloc((size_t)(cols / 2 + 32));
    q->dx = malloc(sizeof(float) * (size_t)blocks), q->bsum = malloc(sizeof(float) * (size_t)blocks);
    return q->xe && q->xo && q->dx && q->bsum;
}

static void q8_free(q8_input *q) { free(q->xe), free(q->xo), free(q->dx), free(q->bsum); }

static void q8_quantize(const float *x, int64_t cols, q8_input *q) {
    for (int64_t b = 0; b * 32 < cols; ++b) {
        const int64_t start = b * 32, end = start + 32 < cols ? start + 32 : cols;
        float amax = 0.0f;
        for (int64_t j = start; j < end; ++j) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;  /* codes round(x / d), half to even, as torch.round(x / d) */
        int32_t sum = 0;
        for (int64_t j = start; j < end; ++j) {
            const int32_t c = d > 0.0f ? (int32_t)nearbyintf(x[j] / d) : 0;
            sum += c;
            if (j % 2 == 0) q->xe[j / 2] = (int8_t)c; else q->xo[j / 2] = (int8_t)c;
        }
        q->dx[b] = d, q->bsum[b] = d * (float)sum;
    }
}

/* What every row of one int4 x q8 matmul shares: per block of 32 columns the index of its weight group (gi),
 * per chunk of 64 columns the two blocks' input scales, each over 4 lanes (dxv), and per group the sum of its
 * blocks' bsum (gsum, for the zero points). */
typedef struct {
    int32_t *gi;
    float *dxv, *gsum;
} q8_shared;

static int q8_shared_make(q8_shared *sh, const q8_input *q, int64_t cols, int64_t group) {
    const int64_t blocks = (cols + 31) / 32, chunks = cols / 64, groups = (cols + group - 1) / group;
    sh->gi = malloc(sizeof(int32_t) * (size_t)blocks);
    sh->dxv = aligned_alloc(32, sizeof(float) * (size_t)(8 * chunks + 8));
    sh->gsum = calloc((size_t)groups, sizeof(float));
    if (!sh->gi || !sh->dxv || !sh->gsum) return 0;
    for (int64_t b = 0; b < blocks; ++b) {
        sh->gi[b] = (int32_t)(b * 32 / group);
        sh->gsum[sh->gi[b]] += q->bsum[b];
    }
    for (int64_t ch = 0; ch < chunks; ++ch)
        for (int l = 0; l < 8; ++l) sh->dxv[8 * ch + l] = q->dx[2 * ch + l / 4];
    return 1;
}

static void q8_shared_free(q8_shared *sh) { free(sh->gi), free(sh->dxv), free(sh->gsum); }

#if defined(__AVX2__) && defined(__FMA__)
/* The weight scales of a 64-column chunk's two blocks, each over 4 lanes: groups g0 and g1 = g0 + 1 (group 32:
 * one 8-byte load), one group (a multiple of 64: a broadcast), or any two. */
static inline __m256 scales(const float *scale, int32_t g0, int32_t g1, int mode, __m256i pair) {
    if (mode == 1)
        return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(scale + g0)))), pair);
    if (mode == 2) return _mm256_broadcast_ss(scale + g0);
    return _mm256_set_m128(_mm_set1_ps(scale[g1]), _mm_set1_ps(scale[g0]));
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* 32 bytes of codes (two blocks of 32 columns) times the int8 input's even (low nibbles) and odd (high nibbles)
 * columns: each block's integer sum over 4 lanes, as floats. */
static inline __m256 chunk_sums(const uint8_t *bytes, __m256i xe, __m256i xo, __m256i low, __m256i ones) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)bytes);
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, low), xe),
                                           _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), xo));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
}
#endif

/* `n` (1 or 2) rows of int4 codes, `stride` bytes apart, times the int8 input:
 * sum_b s_g(b) dx_b sum_j q_j xq_j - sum_g s_g z_g gsum_g; group a multiple of 32. */
static void int4_q8_rows(const uint8_t *row, int64_t stride, int n, int64_t cols, int64_t group, int64_t groups,
                         const float *scale, const uint8_t *zero, const float *minimum, const q8_input *q,
                         const q8_shared *sh, float *dots) {
    int64_t c = 0;  /* columns done */
    dots[0] = 0.0f, dots[n - 1] = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
        const __m256i pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        const int mode = group == 32 ? 1 : group % 64 == 0 ? 2 : 0;  /* the two blocks' scales: a pair, one, any */
        const uint8_t *row1 = row + (n > 1 ? stride : 0);
        const float *scale1 = scale + (n > 1 ? groups : 0);
        for (; c + 64 <= cols; c += 64) {  /* 32 bytes a row: two blocks of 32 columns */
            const __m256i xe = _mm256_loadu_si256((const __m256i *)(q->xe + c / 2));
            const __m256i xo = _mm256_loadu_si256((const __m256i *)(q->xo + c / 2));
            const __m256 dx = _mm256_load_ps(sh->dxv + c / 8);
            const int32_t g0 = sh->gi[c / 32], g1 = sh->gi[c / 32 + 1];
            acc0 = _mm256_fmadd_ps(chunk_sums(row + c / 2, xe, xo, low, ones),
                                   _mm256_mul_ps(scales(scale, g0, g1, mode, pair), dx), acc0);
            if (n > 1)
                acc1 = _mm256_fmadd_ps(chunk_sums(row1 + c / 2, xe, xo, low, ones),
                                       _mm256_mul_ps(scales(scale1, g0, g1, mode, pair), dx), acc1);
        }
        dots[0] = hsum8(acc0);
        if (n > 1) dots[1] = hsum8(acc1);
    }
#endif
    for (int r = 0; r < n; ++r) {
        const uint8_t *codes = row + r * stride;
        const float *s = scale + r * groups;
        for (int64_t b = c / 32; b * 32 < cols; ++b) {  /* the rest (or everything without AVX2): plain C */
            const int64_t end = b * 32 + 32 < cols ? b * 32 + 32 : cols;
            int32_t sum = 0;
            for (int64_t j = b * 32; j < end; j += 2) {
                const uint8_t byte = codes[j / 2];
                sum += (int32_t)(byte & 15u) * q->xe[j / 2] + (int32_t)(byte >> 4) * q->xo[j / 2];
            }
            dots[r] += s[sh->gi[b]] * q->dx[b] * (float)sum;
        }
        if (minimum != NULL) {
            const float *mn = minimum + r * groups;
            for (int64_t g = 0; g < groups; ++g) dots[r] += mn[g] * sh->gsum[g];
        } else {
            const uint8_t *z = zero + r * groups;
            for (int64_t g = 0; g < groups; ++g) dots[r] -= s[g] * (float)z[g] * sh->gsum[g];
        }
    }
}

static float dense_row(const float *w, const float *x, int64_t cols) {
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < cols; ++j) dot += w[j] * x[j];
    return dot;
}

/* out (rows) = W x + bias; `q` (q8 input of x, already quantized) or NULL for float32 inputs. 0, or -1 where
 * scratch memory could not be had (out is then NaN). */
static int matvec(const bitsmith_weight *w, const float *x, const q8_input *q, float *out, int threads) {
    const int64_t rows = w->rows, cols = w->cols;
    if (w->kind == 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < rows; ++i) out[i] = dense_row(w->weight + i * cols, x, cols) + (w->bias ? w->bias[i] : 0.0f);
        return 0;
    }
    const int64_t group = w->group, groups = (cols + group - 1) / group, half = cols / 2;
    if (q != NULL) {
        q8_shared sh;
        if (!q8_shared_make(&sh, q, cols, group)) {
            q8_shared_free(&sh);
            goto fail;
        }
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < rows; i += 2) {
            const int n = i + 1 < rows ? 2 : 1;
            float dots[2];
            int4_q8_rows(w->packed + i * half, half, n, cols, group, groups, w->scale + i * groups,
                         w->minimum ? NULL : w->zero + i * groups, w->minimum ? w->minimum + i * groups : NULL, q,
                         &sh, dots);
            for (int r = 0; r < n; ++r) out[i + r] = dots[r] + (w->bias ? w->bias[i + r] : 0.0f);
        }
        q8_shared_free(&sh);
        return 0;
    }
    float *even = malloc(sizeof(float) * (size_t)half), *odd = malloc(sizeof(float) * (size_t)half);
    if (!even || !odd) {
        free(even), free(odd);
        goto fail;
    }
    for (int64_t b = 0; b < half; ++b) even[b] = x[2 * b], odd[b] = x[2 * b + 1];
    /* the min form: q * scale through int4_row with zero points 0, plus min_g * (the sum of x over group g) */
    uint8_t *zeros = w->minimum ? calloc((size_t)(rows * groups), 1) : NULL;
    float *xsum = w->minimum ? calloc((size_t)groups, sizeof(float)) : NULL;
    if (w->minimum && (!zeros || !xsum)) {
        free(even), free(odd), free(zeros), free(xsum);
        goto fail;
    }
    if (xsum)
        for (int64_t j = 0; j < cols; ++j) xsum[j / group] += x[j];
    const uint8_t *zero = w->minimum ? zeros : w->zero;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; ++i) {
        float acc[1];
        int4_row(w->packed + i * half, half, groups, group, w->scale + i * groups, zero + i * groups, even, odd, 1, acc);
        if (xsum)
            for (int64_t g = 0; g < groups; ++g) acc[0] += w->minimum[i * groups + g] * xsum[g];
        out[i] = acc[0] + (w->bias ? w->bias[i] : 0.0f);
    }
    free(even), free(odd), free(zeros), free(xsum);
    return 0;
fail:
    for (int64_t i = 0; i < rows; ++i) out[i] = NAN;
    return -1;
}

/* out (w->rows) = W x for one input vector x (w->cols); see matvec. */
int bitsmith_matvec(const bitsmith_weight *w, const float *x, float *out, int q8, int threads) {
    if (!q8 || w->kind != 0) return matvec(w, x, NULL, out, threads);
    q8_input q;
    if (!q8_alloc(&q, w->cols)) {
        q8_free(&q);
        for (int64_t i = 0; i < w->rows; ++i) out[i] = NAN;
        return -1;
    }
    q8_quantize(x, w->cols, &q);
    const int status = matvec(w, x, &q, out, threads);
    q8_free(&q);
    return status;
}

static void rmsnorm(const float *h, const float *weight, float eps, int64_t dim, float *out) {
    double sum = 0.0;  /* transformers: mean of squares in float32; the double sum differs in the last bits */
    for (int64_t j = 0; j < dim; ++j) sum += (double)h[j] * h[j];
    const float inv = 1.0f / sqrtf((float)(sum / (double)dim) + eps);
    for (int64_t j = 0; j < dim; ++j) out[j] = weight[j] * (h[j] * inv);
}

static void rotary(float *x, int64_t heads, int64_t head_dim, const float *cos, const float *sin) {
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < heads; ++h) {
        float *v = x + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

/* One decoder block for one token at position `pos` (see above); w: q, k, v, o, gate, up, down. The caches are
 * (n_kv, max_len, head_dim) float32. Returns 0, -1 without memory (h is then NaN), -2 past the cache's end. */
int bitsmith_llama_block(float *h, int64_t dim, const float *norm1, const float *norm2, float eps,
                         const bitsmith_weight *w, int64_t n_heads, int64_t n_kv, int64_t head_dim, const float *cos,
                         const float *sin, float *kcache, float *vcache, int64_t pos, int64_t max_len, int q8,
                         int threads) {
    if (pos >= max_len) return -2;
    const int64_t hidden = w[4].rows, q_dim = n_heads * head_dim, kv_dim = n_kv * head_dim;
    const int64_t widest = dim > hidden ? (dim > q_dim ? dim : q_dim) : (hidden > q_dim ? hidden : q_dim);
    float *x = malloc(sizeof(float) * (size_t)widest);
    float *qv = malloc(sizeof(float) * (size_t)q_dim), *kv = malloc(sizeof(float) * (size_t)(2 * kv_dim));
    float *attn = malloc(sizeof(float) * (size_t)q_dim), *proj = malloc(sizeof(float) * (size_t)dim);
    float *gate = malloc(sizeof(float) * (size_t)hidden), *up = malloc(sizeof(float) * (size_t)hidden);
    float *scores = malloc(sizeof(float) * (size_t)(n_heads * (pos + 1)));
    q8_input q = {0};
    int status = -1;
    if (!x || !qv || !kv || !attn || !proj || !gate || !up || !scores || (q8 && !q8_alloc(&q, widest)))
        goto done;
    const q8_input *qin = q8 ? &q : NULL;
    /* attention */
    rmsnorm(h, norm1, eps, dim, x);
    if (q8) q8_quantize(x, dim, &q);
    if (matvec(&w[0], x, w[0].kind == 0 ? qin : NULL, qv, threads) || matvec(&w[1], x, w[1].kind == 0 ? qin : NULL, kv, threads)
        || matvec(&w[2], x, w[2].kind == 0 ? qin : NULL, kv + kv_dim, threads))
        goto done;
    rotary(qv, n_heads, head_dim, cos, sin);
    rotary(kv, n_kv, head_dim, cos, sin);
    for (int64_t g = 0; g < n_kv; ++g) {
        memcpy(kcache + (g * max_len + pos) * head_dim, kv + g * head_dim, sizeof(float) * (size_t)head_dim);
        memcpy(vcache + (g * max_len + pos) * head_dim, kv + kv_dim + g * head_dim, sizeof(float) * (size_t)head_dim);
    }
    const float scaling = 1.0f / sqrtf((float)head_dim);
    const int64_t per_kv = n_heads / n_kv, steps = pos + 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t hd = 0; hd < n_heads; ++hd) {
        const float *qh = qv + hd * head_dim;
        const float *keys = kcache + (hd / per_kv) * max_len * head_dim, *values = vcache + (hd / per_kv) * max_len * head_dim;
        float *s = scores + hd * steps, top = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < steps; ++t) {
            s[t] = dense_row(keys + t * head_dim, qh, head_dim) * scaling;
            top = fmaxf(top, s[t]);
        }
        for (int64_t t = 0; t < steps; ++t) total += (s[t] = expf(s[t] - top));
        float *out = attn + hd * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) out[i] = 0.0f;
        for (int64_t t = 0; t < steps; ++t) {
            const float p = s[t] / total;
            const float *v = values + t * head_dim;
#pragma omp simd
            for (int64_t i = 0; i < head_dim; ++i) out[i] += p * v[i];
        }
    }
    if (q8 && w[3].kind == 0) q8_quantize(attn, q_dim, &q);
    if (matvec(&w[3], attn, w[3].kind == 0 ? qin : NULL, proj, threads)) goto done;
    for (int64_t j = 0; j < dim; ++j) h[j] += proj[j];
    /* MLP */
    rmsnorm(h, norm2, eps, dim, x);
    if (q8) q8_quantize(x, dim, &q);
    if (matvec(&w[4], x, w[4].kind == 0 ? qin : NULL, gate, threads) || matvec(&w[5], x, w[5].kind == 0 ? qin : NULL, up, threads))
        goto done;
    for (int64_t j = 0; j < hidden; ++j) x[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
    if (q8 && w[6].kind == 0) q8_quantize(x, hidden, &q);
    if (matvec(&w[6], x, w[6].kind == 0 ? qin : NULL, proj, threads)) goto done;
    for (int64_t j = 0; j < dim; ++j) h[j] += proj[j];
    status = 0;
done:
    if (status == -1)
        for (int64_t j = 0; j < dim; ++j) h[j] = NAN;
    free(x), free(qv), free(kv), free(attn), free(proj), free(gate), free(up), free(scores);
    if (q8) q8_free(&q);
    return status;
}

/* Bumped with every change of a signature above: the loader checks it before using a cached build. */
int bitsmith_native_abi(void) { return 5; }
