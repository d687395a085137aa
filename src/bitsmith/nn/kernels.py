"""Low-bit matmul kernels for CPU, and the rule that picks one per batch shape.

Each function takes a 2-D activation ``x`` of shape (M, K) and returns (M, N) in ``x.dtype``.
The choice between kernels is by measurement (``bench/kernels.py`` re-measures it; figures in
BENCHMARKS.md), on a 2-core Sapphire Rapids with torch 2.13:

- ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` are fast only with bf16 activations
  (fp32 activations take a scalar path, 10-100x slower), and only for small M: at M=512 a bf16
  matmul on the dequantized weight (AMX) is faster. Weight-only schemes therefore run with bf16
  activations (the "a16" of w8a16 / w4a16) and switch at ``WEIGHT_ONLY_MAX_M`` rows.
- W8A8 runs oneDNN's ``qlinear_pointwise`` (AMX/VNNI int8) on uint8 activations quantized per token,
  by the fused native loop of ``native.py`` where it could be built, else by eager torch ops.
  The int8 (s8) activation path of that op is a reference loop (1000x slower), so per-token symmetric
  codes are stored as uint8 with a shared zero point of 128.
"""

from __future__ import annotations

import functools

import torch

from bitsmith.nn import native

__all__ = [
    "WEIGHT_ONLY_MAX_M",
    "W8A8_CHUNK_ROWS",
    "onednn_int8_available",
    "prepack_int8_weight",
    "int8_dynamic_linear",
    "int8_weight_only_linear",
    "int4_weight_only_linear",
    "dequantized_bf16_linear",
]

# Above this many rows, dequantizing the weight to bf16 and running an AMX bf16 matmul beats the
# packed weight-only kernels (measured at K=384/N=1536 and K=N=4096: crossover between 64 and 512).
WEIGHT_ONLY_MAX_M = 128
# Per-token quantization is done in row chunks that stay in L2, since on this machine each extra
# pass over a large activation costs as much as the memory bandwidth allows.
W8A8_CHUNK_ROWS = 512


@functools.cache
def onednn_int8_available() -> bool:
    """Whether oneDNN's quantized linear runs here (x86 CPUs with mkldnn)."""
    try:
        weight = torch.ones(16, 16, dtype=torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
        x = torch.full((2, 16), 129, dtype=torch.uint8)
        out = _qlinear(x, packed, torch.ones(16), torch.zeros(16, dtype=torch.long))
        return bool(torch.allclose(out, torch.full((2, 16), 16.0)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def prepack_int8_weight(weight_int8: torch.Tensor) -> torch.Tensor:
    """oneDNN's opaque packed layout for an int8 weight of shape (N, K)."""
    return torch.ops.onednn.qlinear_prepack(weight_int8, None)


def _qlinear(x_u8: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor):
    # x_scale 1.0 and zero point 128: the per-token scale is applied afterwards, outside the kernel
    return torch.ops.onednn.qlinear_pointwise(
        x_u8, 1.0, 128, packed, weight_scale, weight_zero, None, 1.0, 0, torch.float32, "none", [None], ""
    )


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row, stored as uint8 with zero point 128. Returns (codes (M, K), scale (M, 1))."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)  # (M, 1)
    codes = x.mul(127.0 / amax).round_().to(torch.int8)  # (M, K) in [-127, 127]
    codes = codes.view(torch.uint8).add_(128)  # two's complement + 128 (mod 256) = offset binary
    return codes, amax.div_(127.0)


def _quantize_rows_chunked(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token over row chunks that fit in L2, gathered into one (M, K) uint8 tensor."""
    if x.shape[0] <= W8A8_CHUNK_ROWS:
        return quantize_per_token(x)
    parts = [quantize_per_token(rows) for rows in x.split(W8A8_CHUNK_ROWS)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def int8_dynamic_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """W8A8: int8 per-channel weight (prepacked), int8 per-token activations quantized on the fly.

    Two schedules, by measurement (bench/bench_kernels.py): when the output is wider than the input
    (N > K) one GEMM over all rows with the per-token scale applied in place on its result avoids a
    second pass over the large output; otherwise row chunks keep input, codes and output in cache.
    """
    x = x.float().contiguous()
    zero = torch.zeros(out_features, dtype=torch.long)
    if native.available():  # fused: one read of x for the codes, one in-place pass for the epilogue
        codes, token_scale = native.quantize_per_token_u8(x)
        acc = _qlinear(codes, packed_weight, weight_scale, zero)
        return native.scale_rows_add_bias(acc, token_scale, None if bias is None else bias.float().contiguous())
    if out_features > x.shape[1]:
        codes, token_scale = _quantize_rows_chunked(x)
        acc = _qlinear(codes, packed_weight, weight_scale, zero)  # (M, N): sum(q_x * q_w) * s_w
        return acc.mul_(token_scale) if bias is None else torch.addcmul(bias, acc, token_scale, out=acc)
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    for start in range(0, x.shape[0], W8A8_CHUNK_ROWS):
        codes, token_scale = quantize_per_token(x[start : start + W8A8_CHUNK_ROWS])
        acc = _qlinear(codes, packed_weight, weight_scale, zero)
        rows = out[start : start + W8A8_CHUNK_ROWS]
        torch.mul(acc, token_scale, out=rows) if bias is None else torch.addcmul(bias, acc, token_scale, out=rows)
    return out


def dequantized_bf16_linear(x: torch.Tensor, weight_bf16: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 matmul (AMX where present) on a weight dequantized for this call."""
    out = torch.nn.functional.linear(x.to(torch.bfloat16), weight_bf16)
    out = out.to(x.dtype)
    return out if bias is None else out.add_(bias)


def int8_weight_only_linear(
    x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A16: int8 per-channel weight (N, K), bf16 activations."""
    if x.shape[0] <= WEIGHT_ONLY_MAX_M:
        out = torch._weight_int8pack_mm(x.to(torch.bfloat16), weight_int8, weight_scale.to(torch.bfloat16))
        out = out.to(x.dtype)
        return out if bias is None else out.add_(bias)
    weight = weight_int8.to(torch.bfloat16).mul_(weight_scale.to(torch.bfloat16)[:, None])
    return dequantized_bf16_linear(x, weight, bias)


def int4_weight_only_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    group_size: int,
    scales_and_zeros: torch.Tensor,
    dequantize_bf16,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """W4A16: int4 group-wise weight in torch's CPU int4pack layout, bf16 activations.

    ``scales_and_zeros`` is (K / group_size, N, 2) bf16 with ``w = (q - 8) * scale + zero``;
    ``dequantize_bf16()`` returns the (N, K) bf16 weight for the large-M path.
    """
    if x.shape[0] <= WEIGHT_ONLY_MAX_M:
        out = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed_weight, group_size, scales_and_zeros)
        out = out.to(x.dtype)
        return out if bias is None else out.add_(bias)
    return dequantized_bf16_linear(x, dequantize_bf16(), bias)
