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
