"""Floating-point formats: fp16/bf16 casts, fp8 (e4m3, e5m2), MX fp4 (e2m1) and NF4.

Pure tensor functions; nothing here knows about ``nn.Module``.

    format | codes                        | scale                                   | block
    fp8    | torch.float8_e4m3fn / e5m2   | float32 amax / fmt_max, x.shape/block   | any block_size tuple
    mxfp4  | uint8 0..15, one per byte    | uint8 E8M0 biased exponent (power of 2) | 32 along the last dim
    nf4    | uint8 0..15, one per byte    | float32 absmax                          | 64 along the last dim
    nf4 dq | the same                     | absmax double-quantized: int8 codes, an | 64; absmax blocks of 256
           |                              | fp32 scale per 256 of them, their mean  |

fp4 and nf4 codes are left unpacked; ``packing.pack_codes(codes, 4)`` packs them two per byte.
"""

from __future__ import annotations

import torch

from bitsmith.errors import BitsmithError
from bitsmith.formats.affine import _blocked, _expand, _reduce_dims

__all__ = [
    "cast_float",
    "fp8_max",
    "quantize_fp8",
    "dequantize_fp8",
    "FP4_E2M1_GRID",
    "quantize_mxfp4",
    "dequantize_mxfp4",
    "NF4_LEVELS",
    "quantize_nf4",
    "dequantize_nf4",
    "quantize_nf4_double",
    "quantize_absmax_double",
    "dequantize_absmax_double",
]

_HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}

# e2m1 magnitudes; the index is the 3-bit code (bit 3 is the sign), so 0b0101 = 3.0 and 0b1101 = -3.0
FP4_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_EMAX = 2  # largest e2m1 exponent: 6 = 1.5 * 2**2
_E8M0_BIAS = 127

# QLoRA's NF4 levels (bitsandbytes' table): quantiles of N(0, 1) normalised to [-1, 1], with an exact 0
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

_EPS = torch.finfo(torch.float32).tiny * 2**10  # smallest scale: keeps x / scale finite for all-zero blocks


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise BitsmithError("tensor holds NaN or infinite values; cannot quantize it")


def _lookup(table: dict[str, torch.dtype], name: str, what: str) -> torch.dtype:
    if name not in table:
        raise BitsmithError(f"unknown {what} format {name!r}: use one of {', '.join(map(repr, table))}")
    return table[name]


def cast_float(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round ``x`` to ``"fp16"`` or ``"bf16"`` (nearest, ties to even) and return it in ``x.dtype``, same shape."""
    dtype = _lookup(_HALF_DTYPES, fmt, "half-precision")
    limit = torch.finfo(dtype).max
    finite = x.detach().abs().masked_fill(~torch.isfinite(x), 0.0)  # inf and NaN pass through unchanged
    amax = finite.max().item() if x.numel() else 0.0
    if amax > limit:
        raise BitsmithError(f"values up to {amax:g} exceed {fmt}'s largest value {limit:g}; use bf16 or scale first")
    return x.to(dtype).to(x.dtype)


def fp8_max(fmt: str) -> float:
    """Largest finite value of an fp8 format: 448 for ``"e4m3"``, 57344 for ``"e5m2"``."""
    return torch.finfo(_lookup(_FP8_DTYPES, fmt, "fp8")).max


def quantize_fp8(
    x: torch.Tensor, fmt: str = "e4m3", block_size: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (``x.shape``, torch float8 dtype) and scale (float32, ``x.shape / block_size``).

    Each block's scale is ``amax / fp8_max(fmt)``, so the block's largest magnitude maps to the format's
    largest value; ``block_size=None`` means one scale for the whole tensor.
    """
    dtype = _lookup(_FP8_DTYPES, fmt, "fp8")
    _check_finite(x)
    block_size = tuple(x.shape) if block_size is None else tuple(block_size)
    limit = fp8_max(fmt)
    blocks = _blocked(x.detach().float(), block_size)  # (n_0, b_0, n_1, b_1, ...)
    scale = (blocks.abs().amax(dim=_reduce_dims(x.dim())) / limit).clamp(min=_EPS)  # (n_0, n_1, ...)
    # clamp first: amax / scale can land a hair above the limit, and e5m2 would overflow to inf
    scaled = (blocks / _expand(scale, x, block_size)).clamp(-limit, limit)
    return scaled.reshape(x.shape).to(dtype), scale


def dequantize_fp8(
    codes: torch.Tensor,
    scale: torch.Tensor,
    block_size: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``codes * scale`` block by block, shape ``codes.shape``, in ``dtype``."""
    block_size = tuple(codes.shape) if block_size is None else tuple(block_size)
    blocks = _blocked(codes.float(), block_size)
    return (blocks * _expand(scale, codes, block_size)).reshape(codes.shape).to(dtype)


def _split_last(x: torch.Tensor, block: int, what: str) -> torch.Tensor:
    """View ``x`` (..., k) as (..., k / block, block)."""
    if x.dim() == 0 or block <= 0 or x.shape[-1] % block:
        raise BitsmithError(
            f"{what} block size {block} does not divide the last dimension of shape {list(x.shape)}"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _nearest_level(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest entry of sorted ``levels`` for each value; ties go to the even index."""
    midpoints = ((levels[1:] + levels[:-1]) / 2).contiguous()
    lower = torch.searchsorted(midpoints, values.contiguous(), right=False)  # ties -> lower level
    upper = torch.searchsorted(midpoints, values.contiguous(), right=True)  # ties -> upper level
    return torch.where(lower % 2 == 0, lower, upper)  # equal unless the value sits on a midpoint


def quantize_mxfp4(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 per the OCP MX spec: codes (uint8 0..15, ``x.shape``) and exponents (uint8, ``(..., k / block)``).

    Each run of ``block`` elements along the last dim shares the scale ``2**e`` with
    ``e = floor(log2(amax)) - 2`` (2 is e2m1's largest exponent), stored E8M0-style as ``e + 127``.
    Elements round to the nearest e2m1 value (ties to even) and saturate at +-6: with this scale a block's
    amax / 2**e lies in [4, 8), so magnitudes in (6, 8) of it clip; that is the spec's choice, kept for compatibility.
    """
    _check_finite(x)
    blocks = _split_last(x.detach().float(), block, "mxfp4")  # (..., n, block)
    amax = blocks.abs().amax(dim=-1)  # (..., n)
    _, exponent = torch.frexp(amax)  # amax = m * 2**exponent with m in [0.5, 1): floor(log2(amax)) = exponent - 1
    shared = torch.where(amax > 0, exponent - 1 - _FP4_EMAX, -_E8M0_BIAS).clamp(-_E8M0_BIAS, _E8M0_BIAS)
    scale = torch.exp2(shared.float())  # exact for integer exponents
    magnitude = blocks.abs() / scale.unsqueeze(-1)  # division by a power of two: exact
    index = _nearest_level(magnitude, torch.tensor(FP4_E2M1_GRID))  # beyond 5.0 -> 7 (6.0): saturates
    codes = index | (torch.signbit(blocks).long() << 3)  # sign kept as in IEEE casts: -0.0 -> code 8
    return codes.reshape(x.shape).to(torch.uint8), (shared + _E8M0_BIAS).to(torch.uint8)


def dequantize_mxfp4(
    codes: torch.Tensor, exponents: torch.Tensor, block: int = 32, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Values ``e2m1(codes) * 2**(exponents - 127)``, shape ``codes.shape``, in ``dtype``."""
    grid = torch.tensor(FP4_E2M1_GRID)
    table = torch.cat([grid, -grid])  # (16,): code -> value, bit 3 is the sign
    values = _split_last(table[codes.long()], block, "mxfp4")  # (..., n, block)
    scale = torch.exp2(exponents.float() - _E8M0_BIAS).unsqueeze(-1)  # (..., n, 1)
    return (values * scale).reshape(codes.shape).to(dtype)


def quantize_nf4(x: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes (uint8 0..15, ``x.shape``) and absmax (float32, ``(..., k / block_size)``).

    Blocks run along the last dim; when it is a multiple of ``block_size`` this equals bitsandbytes' blocks
    over the flattened tensor, so ``absmax.reshape(-1)`` is its absmax. Code i means ``NF4_LEVELS[i] * absmax``.
    """
    _check_finite(x)
    blocks = _split_last(x.detach().float(), block_size, "nf4")  # (..., n, block_size)
    absmax = blocks.abs().amax(dim=-1)  # (..., n)
    normalised = blocks / absmax.clamp(min=_EPS).unsqueeze(-1)  # in [-1, 1]
    codes = _nearest_level(normalised, torch.tensor(NF4_LEVELS))
    return codes.reshape(x.shape).to(torch.uint8), absmax


def dequantize_nf4(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 64, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Values ``NF4_LEVELS[codes] * absmax``, shape ``codes.shape``, in ``dtype``."""
    values = _split_last(torch.tensor(NF4_LEVELS)[codes.long()], block_size, "nf4")  # (..., n, block_size)
    return (values * absmax.unsqueeze(-1)).reshape(codes.shape).to(dtype)


def quantize_absmax_double(absmax: torch.Tensor, block: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA's double quantization of NF4's absmax values: their mean is taken off, and what is left is rounded
    to symmetric int8 with one fp32 scale per ``block`` of them (over the flattened tensor; the last block may be
    short). Returns (int8 codes, ``absmax.shape``; fp32 scales, ``ceil(n / block)``; fp32 mean, shape (1,)).
    QLoRA stores the second level as an 8-bit dynamic float map; a linear int8 grid costs the same 8.125 bits per
    absmax (0.127 bits per weight at 64-weight blocks)."""
    flat = absmax.detach().float().reshape(-1)
    offset = flat.mean().reshape(1) if flat.numel() else torch.zeros(1)
    centred = flat - offset
    padded = torch.nn.functional.pad(centred, (0, (-flat.numel()) % block)).reshape(-1, block)
    scale = padded.abs().amax(dim=1) / 127.0
    codes = torch.round(padded / scale.clamp(min=_EPS).unsqueeze(1)).clamp(-127, 127)
    return codes.reshape(-1)[: flat.numel()].reshape(absmax.shape).to(torch.int8), scale, offset


def dequantize_absmax_double(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                             block: int = 256) -> torch.Tensor:
    """The absmax values ``codes * scale[block] + offset`` (never below 0), float32, ``codes.shape``."""
    flat = codes.reshape(-1).float()
    per = scale.float().repeat_interleave(block)[: flat.numel()]
    return (flat * per + offset.float()).clamp(min=0).reshape(codes.shape)


def quantize_nf4_double(x: torch.Tensor, block_size: int = 64, absmax_block: int = 256
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4 with double-quantized absmax: (codes, absmax codes, absmax scales, absmax mean). The NF4 codes are
    chosen against the absmax as stored (after its own rounding), so dequantizing gives the nearest levels."""
    _, absmax = quantize_nf4(x, block_size)
    codes8, scale, offset = quantize_absmax_double(absmax, absmax_block)
    stored = dequantize_absmax_double(codes8, scale, offset, absmax_block)
    blocks = _split_last(x.detach().float(), block_size, "nf4")
    normalised = (blocks / stored.clamp(min=_EPS).unsqueeze(-1)).clamp(-1.0, 1.0)
    codes = _nearest_level(normalised, torch.tensor(NF4_LEVELS))
    return codes.reshape(x.shape).to(torch.uint8), codes8, scale, offset
