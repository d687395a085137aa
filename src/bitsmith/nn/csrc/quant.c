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
        const __m256 both = _mm256_add_ps(_mm256_add_ps(e0, o0), _mm256_add_ps(e1, o1));
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        acc[0] = _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
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
        for (int64_t r = 0; r < m; ++r) {
            __m128 v = _mm_add_ps(_mm256_castps256_ps128(sum[r]), _mm256_extractf128_ps(sum[r], 1));
            v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            v = _mm_add_ss(v, _mm_movehdup_ps(v));
            acc[r] = _mm_cvtss_f32(v);
        }
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

/* Bumped with every change of a signature above: the loader checks it before using a cached build. */
int bitsmith_native_abi(void) { return 3; }
