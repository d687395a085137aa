"""Binary ({-1, +1} * scale) and ternary ({-1, 0, +1} * scale) weights, one scale per block.

Pure tensor functions; nothing here knows about ``nn.Module``. Granularity is a ``block_size`` tuple as in
``affine.py`` (``block_size_for(shape, "channel")`` gives one scale per output channel).

    format  | codes (int8, x.shape) | scale (float32, x.shape / block_size)
    binary  | sign(x), 0 -> +1      | mean |x| over the block (XNOR-Net's optimal scale)
    ternary | sign(x) if |x| > t    | mean |x| over the kept elements, t = 0.7 * mean |x| (Ternary Weight Networks)
"""

from __future__ import annotations

import torch

from bitsmith.errors import BitsmithError
from bitsmith.formats.affine import _blocked, _expand, _reduce_dims

__all__ = [
    "quantize_binary",
    "dequantize_binary",
    "quantize_ternary",
    "dequantize_ternary",
]


def _blocks_of(x: torch.Tensor, block_size: tuple[int, ...]) -> torch.Tensor:
    """Finite-checked float32 view of ``x`` as (n_0, b_0, n_1, b_1, ...)."""
    if not torch.isfinite(x).all():
        raise BitsmithError("tensor holds NaN or infinite values; cannot quantize it")
    return _blocked(x.detach().float(), tuple(block_size))


def quantize_binary(x: torch.Tensor, block_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8 in {-1, +1}, ``x.shape``) and scale (float32, ``x.shape / block_size``)."""
    blocks = _blocks_of(x, block_size)
    scale = blocks.abs().mean(dim=_reduce_dims(x.dim()))  # (n_0, n_1, ...)
    codes = torch.where(blocks >= 0, 1, -1)  # sign with sign(0) = +1: every code carries one bit
    return codes.reshape(x.shape).to(torch.int8), scale


def quantize_ternary(
    x: torch.Tensor, block_size: tuple[int, ...], threshold_ratio: float = 0.7
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8 in {-1, 0, +1}, ``x.shape``) and scale (float32, ``x.shape / block_size``).

    Elements with ``|x| <= threshold_ratio * mean|x|`` of their block become 0; 0.7 is TWN's approximation of
    the optimal threshold for Gaussian-like weights. A block with nothing kept gets scale 0.
    """
    blocks = _blocks_of(x, block_size)
    dims = _reduce_dims(x.dim())
    magnitude = blocks.abs()
    threshold = threshold_ratio * magnitude.mean(dim=dims)  # (n_0, n_1, ...)
    kept = magnitude > _expand(threshold, x, block_size)
    count = kept.sum(dim=dims).clamp(min=1)
    scale = (magnitude * kept).sum(dim=dims) / count
    codes = torch.sign(blocks) * kept
    return codes.reshape(x.shape).to(torch.int8), scale


def dequantize_binary(
    codes: torch.Tensor,
    scale: torch.Tensor,
    block_size: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``codes * scale`` block by block, shape ``codes.shape``, in ``dtype``."""
    blocks = _blocked(codes.float(), tuple(block_size))
    return (blocks * _expand(scale, codes, tuple(block_size))).reshape(codes.shape).to(dtype)


dequantize_ternary = dequantize_binary  # same math: codes in {-1, 0, +1} times the block's scale
