/* Fused per-token activation quantization and the W8A8 epilogue, for bitsmith's oneDNN int8 path.
 *
 * Eager torch needs five passes over an activation to quantize it per row (abs, amax, mul, round,
 * cast); these loops read it once for the row maximum (kept in L1/L2) and once to write 1-byte codes.
 * Built at first use by bitsmith/nn/native.py with the machine's C compiler; OpenMP threads come from
 * the same libgomp that torch uses. Rounding is round-half-to-even, as torch.round.
 */
#include <math.h>
#include <stdint.h>

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

/* Bumped with every change of a signature above: the loader checks it before using a cached build. */
int bitsmith_native_abi(void) { return 2; }
