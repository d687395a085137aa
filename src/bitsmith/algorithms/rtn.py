"""Round-to-nearest weight quantization: the baseline every other algorithm is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.formats.affine import IntFormat, block_size_for, choose_qparams_affine, quantize_affine
from bitsmith.formats.ternary import quantize_ternary

__all__ = ["QuantizedWeight", "weight_format", "quantize_weight_rtn", "quantize_weight_signed", "quantize_weight_ternary"]


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
    weight: torch.Tensor, bits: int, granularity: str | int, symmetric: bool, clip: str = "minmax",
    importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize ``weight`` (N, K) to ``bits`` by rounding each value to the nearest code; with ``clip="mse"``
    and ``importance`` (K,), each block's range is the one of least error weighted by the importance of each
    input (llama.cpp's imatrix idea: ``algorithms/imatrix.py``)."""
    fmt = weight_format(bits, symmetric)
    block_size = block_size_for(tuple(weight.shape), granularity)
    scale, zero = choose_qparams_affine(weight, block_size, fmt, symmetric=symmetric, clip=clip,
                                        importance=importance)
    codes = quantize_affine(weight, block_size, scale, zero, fmt)
    return QuantizedWeight(codes, scale, zero, fmt, block_size[-1])


def quantize_weight_signed(weight: torch.Tensor, bits: int, granularity: str | int, clip: str = "minmax") -> QuantizedWeight:
    """Symmetric signed codes in [-2^(bits-1), 2^(bits-1) - 1], zero point 0: the weights of the W8A8 kernels
    (int8 activations), which take any width up to 8 held as int8."""
    fmt = IntFormat(bits, signed=True)
    block_size = block_size_for(tuple(weight.shape), granularity)
    scale, zero = choose_qparams_affine(weight, block_size, fmt, symmetric=True, clip=clip)
    codes = quantize_affine(weight, block_size, scale, zero, fmt)
    return QuantizedWeight(codes, scale, zero, fmt, block_size[-1])


def quantize_weight_ternary(weight: torch.Tensor, granularity: str | int) -> QuantizedWeight:
    """Ternary weights (TWN: {-1, 0, +1} times a scale per block) as 2-bit codes with zero point 1, so that
    the 2-bit storage and kernels run them unchanged: code ``t + 1`` means ``(q - 1) * scale = t * scale``."""
    block_size = block_size_for(tuple(weight.shape), granularity)
    codes, scale = quantize_ternary(weight, block_size)
    return QuantizedWeight((codes + 1).to(torch.uint8), scale, torch.ones_like(scale, dtype=torch.int32),
                           IntFormat(2, signed=False), block_size[-1])
