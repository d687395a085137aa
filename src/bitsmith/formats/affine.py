"""Affine integer quantization: choose parameters, quantize, dequantize.

Pure tensor functions; nothing here knows about ``nn.Module``.

Granularity is one ``block_size`` tuple, the shape of the block of elements that share one scale
(and zero point). For a weight of shape ``(out, in) = (8, 256)``:

    granularity            |  block_size  | scale shape
      per_tensor           |  (8, 256)    | (1, 1)
      per_channel (axis 0) |  (1, 256)    | (8, 1)
      per_group (128)      |  (1, 128)    | (8, 2)
      per_group (100)      |  (1, 100)    | (8, 3): groups of 100, 100 and a last, partial one of 56

A block size that does not divide its dimension leaves a shorter last block (as compressed-tensors stores
it: ``ceil(size / block)`` parameters). Internally the tensor is padded with zeros to whole blocks, which
changes no range (every range holds 0) and quantizes exactly (0 maps to the zero point), then trimmed.

``dequantize_affine(quantize_affine(x)) ~= x`` with ``q = clamp(round(x / scale) + zero_point)`` and
``x_hat = (q - zero_point) * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.errors import BitsmithError

__all__ = [
    "fp16_scales",
    "IntFormat",
    "block_size_for",
    "choose_qparams_affine",
    "quantize_affine",
    "dequantize_affine",
    "fake_quantize_affine",
]


@dataclass(frozen=True)
class IntFormat:
    """An integer code format: ``bits`` wide, signed or not."""

    bits: int  # 2..8
    signed: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise BitsmithError(f"integer formats have 2 to 8 bits, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8


def block_size_for(shape: tuple[int, ...], granularity: str | int) -> tuple[int, ...]:
    """Translate ``"tensor"``, ``"channel"`` or a group size (int) into a block_size for ``shape``.

    Channels are along dim 0 (the output features of a Linear weight, the rows of an embedding);
    groups split the last dim into runs of ``group_size`` inside each channel, the last run shorter where
    ``group_size`` does not divide it.
    """
    if granularity == "tensor":
        return tuple(shape)
    if granularity == "channel":
        return (1,) + tuple(shape[1:])
    if isinstance(granularity, int) and not isinstance(granularity, bool):
        if granularity <= 0:
            raise BitsmithError(f"group size must be positive, got {granularity}")
        if len(shape) < 2:
            raise BitsmithError(f"per-group quantization needs a 2-D or larger tensor, got shape {list(shape)}")
        return (1,) * (len(shape) - 1) + (granularity,)
    raise BitsmithError(f"unknown granularity {granularity!r}: use 'tensor', 'channel' or a group size")


def _blocked(x: torch.Tensor, block_size: tuple[int, ...], partial: bool = False) -> torch.Tensor:
    """View ``x`` as (n_0, b_0, n_1, b_1, ...) where b_i is the block size along dim i and n_i = ceil(size_i /
    b_i). With ``partial`` a block size that does not divide its dimension is allowed (x is zero-padded to
    whole blocks); without, it is an error."""
    if len(block_size) != x.dim():
        raise BitsmithError(f"block_size {block_size} does not match a {x.dim()}-D tensor")
    shape, pad = [], []
    for size, block in zip(x.shape, block_size):
        if block <= 0 or (size % block and not partial):
            raise BitsmithError(f"block size {block} does not divide dimension {size} of shape {list(x.shape)}")
        blocks = -(-size // block)
        shape += [blocks, block]
        pad = [0, blocks * block - size] + pad  # F.pad lists the last dimension first
    if any(pad):
        x = torch.nn.functional.pad(x, pad)
    return x.reshape(shape)


def _unblocked(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``_blocked``: the padded tensor back to ``shape``, padding cut off."""
    padded = blocks.reshape([blocks.shape[2 * i] * blocks.shape[2 * i + 1] for i in range(len(shape))])
    return padded[tuple(slice(0, size) for size in shape)]


def _reduce_dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(1, 2 * ndim, 2))


def _expand(p: torch.Tensor, x: torch.Tensor, block_size: tuple[int, ...]) -> torch.Tensor:
    """Broadcast a parameter of shape (n_0, n_1, ...) back over x's blocks, as (n_0, 1, n_1, 1, ...)."""
    shape = []
    for n in p.shape:
        shape += [n, 1]
    return p.reshape(shape)


def _minmax_qparams(
    xmin: torch.Tensor, xmax: torch.Tensor, fmt: IntFormat, symmetric: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if symmetric:
        amax = torch.maximum(xmin.abs(), xmax.abs())
        # assumes qmax >= |qmin| - 1: the positive side limits the scale, so +-amax is representable
        scale = (amax / fmt.qmax).clamp(min=eps)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        if not fmt.signed:  # unsigned symmetric: centre the zero in the code range
            zero = torch.full_like(zero, (fmt.qmax + 1) // 2)
            scale = (amax / ((fmt.qmax - 1) / 2)).clamp(min=eps)
        return scale, zero
    xmin = xmin.clamp(max=0.0)  # the range always holds 0, so zero padding is exact
    xmax = xmax.clamp(min=0.0)
    scale = ((xmax - xmin) / (fmt.qmax - fmt.qmin)).clamp(min=eps)
    zero = (fmt.qmin - torch.round(xmin / scale)).clamp(fmt.qmin, fmt.qmax).to(torch.int32)
    return scale, zero


def choose_qparams_affine(
    x: torch.Tensor,
    block_size: tuple[int, ...],
    fmt: IntFormat,
    symmetric: bool = True,
    clip: str = "minmax",
    mse_grid: int = 40,
    mse_min_ratio: float = 0.5,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32), each of shape ``x.shape / block_size``.

    ``clip="minmax"`` covers the whole range of each block; ``clip="mse"`` shrinks each block's range
    by the factor in ``linspace(1, mse_min_ratio, mse_grid)`` that minimises the block's squared error, each
    element's error weighted by ``importance`` (broadcast to ``x``; llama.cpp's importance matrix: the mean
    square of the input each weight multiplies) when given.
    """
    if not torch.isfinite(x).all():
        raise BitsmithError("tensor holds NaN or infinite values; cannot choose quantization parameters")
    xf = x.detach().float()
    blocks = _blocked(xf, block_size, partial=True)
    dims = _reduce_dims(xf.dim())
    xmin, xmax = blocks.amin(dim=dims), blocks.amax(dim=dims)
    eps = torch.finfo(torch.float32).tiny * 2**10
    if clip == "minmax":
        return _minmax_qparams(xmin, xmax, fmt, symmetric, eps)
    if clip != "mse":
        raise BitsmithError(f"unknown clipping {clip!r}: use 'minmax' or 'mse'")
    weight = None
    if importance is not None:
        weight = _blocked(importance.float().expand_as(xf).contiguous(), block_size, partial=True)
    best_err = torch.full_like(xmin, float("inf"))
    best_scale, best_zero = _minmax_qparams(xmin, xmax, fmt, symmetric, eps)
    for ratio in torch.linspace(1.0, mse_min_ratio, mse_grid).tolist():
        scale, zero = _minmax_qparams(xmin * ratio, xmax * ratio, fmt, symmetric, eps)
        # quantize_affine then dequantize_affine, in the blocked layout throughout (the same operations in the
        # same order, so the same numbers; padding quantizes to the zero point, an error of exactly 0)
        s, z = _expand(scale, xf, block_size), _expand(zero, xf, block_size)
        xq = (torch.round(blocks / s) + z).clamp_(fmt.qmin, fmt.qmax).sub_(z).mul_(s)
        err = xq.sub_(blocks).square_()
        err = (err.mul_(weight) if weight is not None else err).sum(dim=dims)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_affine(
    x: torch.Tensor,
    block_size: tuple[int, ...],
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    fmt: IntFormat,
) -> torch.Tensor:
    """Integer codes of ``x``, same shape, in ``fmt.storage_dtype``."""
    blocks = _blocked(x.float(), block_size, partial=True)
    q = torch.round(blocks / _expand(scale, x, block_size)) + _expand(zero_point, x, block_size)
    return _unblocked(q.clamp(fmt.qmin, fmt.qmax), x.shape).to(fmt.storage_dtype)


def dequantize_affine(
    q: torch.Tensor,
    block_size: tuple[int, ...],
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero_point) * scale`` block by block, in ``dtype``."""
    blocks = _blocked(q.to(torch.float32), block_size, partial=True)
    x = (blocks - _expand(zero_point, q, block_size)) * _expand(scale, q, block_size)
    return _unblocked(x, q.shape).to(dtype)


def fake_quantize_affine(
    x: torch.Tensor,
    granularity: str | int,
    fmt: IntFormat,
    symmetric: bool = True,
    clip: str = "minmax",
) -> torch.Tensor:
    """Quantize then dequantize ``x`` (for measuring error and simulating a scheme)."""
    block_size = block_size_for(tuple(x.shape), granularity)
    scale, zero = choose_qparams_affine(x, block_size, fmt, symmetric, clip)
    q = quantize_affine(x, block_size, scale, zero, fmt)
    return dequantize_affine(q, block_size, scale, zero, x.dtype)


def fp16_scales(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` as it is kept in fp16: a group with nothing in its range (all pruned, a zero row) has a scale below
    fp16's smallest positive value, so it is kept positive there (its codes sit at the zero point, so any scale
    gives 0), never rounded to 0."""
    return scale.clamp(min=torch.finfo(torch.float16).smallest_normal * 2.0 ** -10).to(torch.float16)
