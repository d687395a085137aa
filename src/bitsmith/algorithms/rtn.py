"""Round-to-nearest weight quantization: the baseline every other algorithm is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.formats.affine import IntFormat, block_size_for, choose_qparams_affine, quantize_affine

__all__ = ["QuantizedWeight", "weight_format", "quantize_weight_rtn"]


@dataclass
class QuantizedWeight:
    """Integer codes of a 2-D weight (rows = output channels) with one scale/zero per block.

    codes: (N, K) int8 when ``fmt`` is signed (8-bit symmetric), else uint8 in [0, 2^bits - 1]
    scale: (N, K / group) float32; zero_point: (N, K / group) int32 (all 0 for signed symmetric)
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    fmt: IntFormat
    group_size: int  # == K for per-channel


def weight_format(bits: int, symmetric: bool) -> IntFormat:
    """8-bit symmetric weights use signed codes (what the int8 kernels take); everything else is
    stored unsigned with a zero point (symmetric then means zero point 2^(bits-1))."""
    return IntFormat(bits, signed=bits == 8 and symmetric)


def quantize_weight_rtn(
    weight: torch.Tensor, bits: int, granularity: str | int, symmetric: bool, clip: str = "minmax"
) -> QuantizedWeight:
    """Quantize ``weight`` (N, K) to ``bits`` by rounding each value to the nearest code."""
    fmt = weight_format(bits, symmetric)
    block_size = block_size_for(tuple(weight.shape), granularity)
    scale, zero = choose_qparams_affine(weight, block_size, fmt, symmetric=symmetric, clip=clip)
    codes = quantize_affine(weight, block_size, scale, zero, fmt)
    return QuantizedWeight(codes, scale, zero, fmt, block_size[-1])
