"""Low-bit matmul kernels for CPU. Each takes a 2-D activation ``x`` (M, K) and returns (M, N).

The modules in ``linear.py`` / ``static.py`` offer, per layer, every kernel that computes their scheme
exactly on this machine and let ``dispatch.choose`` time them on the real shape (``bench/bench_kernels.py``
shows the same comparison as a table):

    family        | candidates (preference order)                       | notes
    w8a8-dynamic  | onednn-u8s8, onednn-u8s8-split, fp32-dequant        | onednn-u8s8 only where its int8 sums are exact (cpu.py)
    w8a8-static   | the same three, with the calibrated zero point      | ReLU and bias inside the oneDNN kernel
    w8a16         | int8pack-bf16, dequant-bf16, dequant-fp32           | torch's packed kernel takes bf16 activations
    w4a16         | int4pack-bf16, native-int4, dequant-bf16,           | 2- and 3-bit codes are widened to int4 exactly;
                  | dequant-fp32                                        | native-int4 (csrc/quant.c, AVX2): at most 16 rows,
                  |                                                     | fp32 activations, reads the packed codes (decoding)
    bf16          | bf16, upcast-fp32                                   | bf16 is emulated (slow) without AVX512-BF16/AMX

W8A8 stores per-token symmetric codes as uint8 with zero point 128, because oneDNN's s8-activation path is a
reference loop (1000x slower). Without VNNI those codes would overflow oneDNN's int16 pair sums; the split
form (``onednn-u8s8-split``, csrc/quant.c) halves every code into two that cannot, at twice the inner size.
"""

from __future__ import annotations

import torch

from bitsmith.nn import native

__all__ = [
    "W8A8_CHUNK_ROWS",
    "prepack_int8_weight",
    "prepack_split_weight",
    "qlinear",
    "quantize_per_token",
    "quantize_per_token_split",
    "split_codes",
    "dynamic_onednn",
    "dynamic_split",
    "dynamic_fp32",
    "int8pack_bf16",
    "int4pack_bf16",
    "matmul_bf16",
    "matmul_fp32",
    "add_bias",
]

# Per-token quantization is done in row chunks that stay in L2 when no native loop is available, since
# each extra eager pass over a large activation costs as much as the memory bandwidth allows.
W8A8_CHUNK_ROWS = 512


def prepack_int8_weight(weight_int8: torch.Tensor) -> torch.Tensor:
    """oneDNN's opaque packed layout for an int8 weight of shape (N, K)."""
    return torch.ops.onednn.qlinear_prepack(weight_int8, None)


def prepack_split_weight(weight_int8: torch.Tensor) -> torch.Tensor | None:
    """The packed (N, 2K) weight [W | W] of the split path; None where a code is -128 (the split needs
    weights in [-127, 127], which symmetric quantization always gives)."""
    if bool((weight_int8 == -128).any()):
        return None
    return prepack_int8_weight(torch.cat([weight_int8, weight_int8], dim=1))


def qlinear(codes: torch.Tensor, x_scale: float, x_zero: int, packed: torch.Tensor, weight_scale: torch.Tensor,
            bias: torch.Tensor | None = None, post: str = "none") -> torch.Tensor:
    """oneDNN int8 linear: ``x_scale * weight_scale * sum((codes - x_zero) * W) + bias``, fp32 (M, N)."""
    zero = torch.zeros(weight_scale.shape[0], dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(
        codes, x_scale, x_zero, packed, weight_scale, zero, bias, 1.0, 0, torch.float32, post, [None], ""
    )


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row, stored as uint8 with zero point 128. Returns (codes (M, K), scale (M, 1))."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)  # (M, 1)
    codes = x.mul(127.0 / amax).round_().to(torch.int8)  # (M, K) in [-127, 127]
    codes = codes.view(torch.uint8).add_(128)  # two's complement + 128 (mod 256) = offset binary
    return codes, amax.div_(127.0)


def split_codes(codes: torch.Tensor, zero_point: int, block: int | None = None) -> torch.Tensor:
    """uint8 codes (M, K) with ``zero_point`` -> (M, 2K) [p | q] per run of ``block`` columns, zero point
    ``(zero_point + 1) // 2``: p = a >> 1, q = a - p + (zero_point & 1) (the eager form of csrc/quant.c's loops)."""
    rows, cols = codes.shape
    block = block or cols
    wide = codes.to(torch.int16).view(rows, cols // block, 1, block)
    p = wide >> 1
    q = wide - p + (zero_point & 1)
    return torch.cat([p, q], dim=2).reshape(rows, 2 * cols).to(torch.uint8)


def quantize_per_token_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes in split form: (codes (M, 2K) with zero point 64, scale (M, 1))."""
    if native.available():
        return native.quantize_per_token_split_u8(x)
    codes, scale = quantize_per_token(x)
    return split_codes(codes, 128), scale


def _quantize_rows_chunked(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] <= W8A8_CHUNK_ROWS:
        return quantize_per_token(x)
    parts = [quantize_per_token(rows) for rows in x.split(W8A8_CHUNK_ROWS)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _scale_rows(acc: torch.Tensor, token_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """In place: ``acc * token_scale + bias`` (fused native loop where available)."""
    if native.available():
        return native.scale_rows_add_bias(acc, token_scale, None if bias is None else bias.float().contiguous())
    return acc.mul_(token_scale) if bias is None else torch.addcmul(bias, acc, token_scale, out=acc)


def dynamic_onednn(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int) -> torch.Tensor:
    """W8A8 in one oneDNN pass (exact only where cpu.onednn_int8_exact()). x (M, K) float32 contiguous.

    Without the native loop: when the output is wider than the input (N > K) one GEMM over all rows with
    the per-token scale applied in place on its result; otherwise row chunks keep input, codes and output
    in cache (bench/bench_kernels.py)."""
    if native.available():  # fused: one read of x for the codes, one in-place pass for the epilogue
        codes, token_scale = native.quantize_per_token_u8(x)
        return _scale_rows(qlinear(codes, 1.0, 128, packed, weight_scale), token_scale, bias)
    if out_features > x.shape[1]:
        codes, token_scale = _quantize_rows_chunked(x)
        return _scale_rows(qlinear(codes, 1.0, 128, packed, weight_scale), token_scale, bias)
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    for start in range(0, x.shape[0], W8A8_CHUNK_ROWS):
        codes, token_scale = quantize_per_token(x[start : start + W8A8_CHUNK_ROWS])
        acc = qlinear(codes, 1.0, 128, packed, weight_scale)
        rows = out[start : start + W8A8_CHUNK_ROWS]
        torch.mul(acc, token_scale, out=rows) if bias is None else torch.addcmul(bias, acc, token_scale, out=rows)
    return out


def dynamic_split(x: torch.Tensor, packed_split: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 exact without VNNI: split per-token codes against [W | W] (see csrc/quant.c)."""
    codes, token_scale = quantize_per_token_split(x)
    return _scale_rows(qlinear(codes, 1.0, 64, packed_split, weight_scale), token_scale, bias)


def dynamic_fp32(x: torch.Tensor, weight_codes: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 math in fp32: integer-valued codes multiplied in an fp32 GEMM, then both scales (exact up to
    fp32 rounding of sums beyond 2^24)."""
    codes, token_scale = native.quantize_per_token_u8(x) if native.available() else quantize_per_token(x)
    acc = torch.nn.functional.linear(codes.float().sub_(128.0), weight_codes.float())  # (M, N) integers
    acc.mul_(weight_scale)
    return _scale_rows(acc, token_scale, bias)


def add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out.add_(bias)


def matmul_bf16(x: torch.Tensor, weight_bf16: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 matmul (oneDNN; AMX or AVX512-BF16 where present) on a bf16 weight, fp32 out."""
    return add_bias(torch.nn.functional.linear(x.to(torch.bfloat16), weight_bf16).float(), bias)


def matmul_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())


def int8pack_bf16(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale_bf16: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """W8A16: torch's ``_weight_int8pack_mm``, int8 per-channel weight (N, K), bf16 activations."""
    return add_bias(torch._weight_int8pack_mm(x.to(torch.bfloat16), weight_int8, weight_scale_bf16).float(), bias)


def int4pack_bf16(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor,
                  padded_k: int, bias: torch.Tensor | None) -> torch.Tensor:
    """W4A16: torch's CPU int4pack kernel, bf16 activations. ``scales_and_zeros`` (G, N, 2) bf16 with
    ``w = (q - 8) * scale + zero``. A weight whose K is not a multiple of the group size was packed with
    zero columns up to ``padded_k``; x is padded with zeros to match (exact: 0 * anything = 0)."""
    rows, k = x.shape
    if padded_k != k:
        xb = torch.zeros(rows, padded_k, dtype=torch.bfloat16)
        xb[:, :k] = x
    else:
        xb = x.to(torch.bfloat16)
    return add_bias(torch._weight_int4pack_mm_for_cpu(xb, packed, group_size, scales_and_zeros).float(), bias)
