"""GGUF weight blocks as llama.cpp reads them (ggml-common.h): packed from codes, quantized from floats, and
read back. Pure numpy; nothing here knows about ``nn.Module`` or the GGUF file around the blocks.

A row of K weights is K / block weights' blocks laid end to end; every field is little-endian:

    type | weights | bytes | block layout                                                | weight
    Q8_0 |   32    |   34  | d fp16, q int8[32]                                          | d * q
    Q4_0 |   32    |   18  | d fp16, qs[16]: element j in the low nibble, j + 16 high    | d * (q - 8)
    Q4_1 |   32    |   20  | d fp16, m fp16, qs[16] as Q4_0                              | d * q + m
    Q4_K |  256    |  144  | d, dmin fp16; scales[12]: 8 six-bit scales sc and mins mn  | d * sc[s] * q - dmin * mn[s]
         |         |       |   (see _pack_scales_q4_k); qs[128]: sub-block s of 32 in    |   (s = element // 32)
         |         |       |   bytes 32 * (s // 2) .. + 32, low nibble for even s       |
    Q6_K |  256    |  210  | ql[128] low 4 bits, qh[64] high 2 bits (see _pack_q6_k),    | d * sc[e // 16] * (q - 32)
         |         |       |   sc int8[16], d fp16 last                                  |

``quantize`` reproduces the ``gguf`` package's reference quantizers (llama.cpp's ``quantize_row_*_ref``) byte
for byte for Q8_0, Q4_0 and Q4_1, and is bitsmith's own for the K-quants, which the package only reads: Q4_K
fits each sub-block's scale and min by least squares over a few candidate grids (as llama.cpp's
``make_qkx2_quants`` does, unweighted), Q6_K rounds to the nearest code under each sub-block's absmax scale.
``pack_q8_0`` / ``pack_q4_0`` / ``pack_q4_1`` write integer codes that already fit a block (bitsmith's own
int8 / int4 group-32 codes) without re-quantizing them. ``dequantize`` computes each weight with the same
float32 operations, in the same order, as the ``gguf`` package's dequantizers, so the two agree bit for bit.
"""

from __future__ import annotations

import numpy as np

from bitsmith.errors import BitsmithError

__all__ = ["GGUF_BLOCKS", "block_fits", "quantize", "dequantize", "pack_q8_0", "pack_q4_0", "pack_q4_1",
           "unpack_blocks", "rotary_row_order"]

GGUF_BLOCKS = {  # type -> (weights per block, bytes per block)
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q4_k": (256, 144),
    "q6_k": (256, 210),
}
_Q4_K_CANDIDATES = np.arange(-10, 11) / 10  # grids of 15 + t steps over each sub-block's range (llama.cpp's 21)


def _check(gguf_type: str, columns: int) -> tuple[int, int]:
    if gguf_type not in GGUF_BLOCKS:
        raise BitsmithError(f"unknown GGUF block type '{gguf_type}'; available: {', '.join(GGUF_BLOCKS)}")
    block, size = GGUF_BLOCKS[gguf_type]
    if columns % block:
        raise BitsmithError(f"rows of {columns} weights do not split into {gguf_type.upper()} blocks of {block}")
    return block, size


def block_fits(gguf_type: str, columns: int) -> bool:
    """Whether rows of ``columns`` weights split into whole blocks of ``gguf_type``."""
    return columns % GGUF_BLOCKS[gguf_type][0] == 0


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    """(n, 1) floats as (n, 2) bytes of their fp16 rounding."""
    return values.astype(np.float16).view(np.uint8)


def _fp16_value(data: np.ndarray) -> np.ndarray:
    """(n, 2) bytes as (n, 1) float32."""
    return np.ascontiguousarray(data).view(np.float16).astype(np.float32)


def _round_half_away(values: np.ndarray) -> np.ndarray:
    """Round to nearest, halves away from zero, without the error ``floor(x + 0.5)`` makes just below a half."""
    magnitude = np.abs(values)
    whole = np.floor(magnitude)
    return np.sign(values) * (whole + np.floor(2 * (magnitude - whole)))


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """(n, 32) codes in [0, 15] as (n, 16) bytes: element j in the low nibble, j + 16 in the high one."""
    codes = codes.astype(np.uint8)
    return codes[:, :16] | (codes[:, 16:] << np.uint8(4))


def _unnibble(data: np.ndarray) -> np.ndarray:
    """(n, 16) bytes as (n, 32) codes, the inverse of ``_nibbles``."""
    return np.concatenate([data & np.uint8(0x0F), data >> np.uint8(4)], axis=1)


# ------------------------------------------------------------------------------------------- 32-weight blocks


def _pack_q8_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.concatenate([_fp16_bytes(d), codes.astype(np.int8).view(np.uint8)], axis=1)


def _pack_q4_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.concatenate([_fp16_bytes(d), _nibbles(codes)], axis=1)


def _pack_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibbles(codes)], axis=1)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)  # (n, 1)
    return _pack_q8_0(_round_half_away(blocks * _inverse(d)), d)


def _quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    # the weight of largest magnitude maps to code 0 (-8 d), keeping its sign: one more step on its side
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)  # (n, 1)
    d = extreme / np.float32(-8)
    codes = np.trunc(blocks * _inverse(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    return _pack_q4_0(codes, d)


def _quantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    low, high = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)  # (n, 1)
    d = (high - low) / np.float32(15)
    codes = np.trunc((blocks - low) * _inverse(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
    return _pack_q4_1(codes, d, low)


def _dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    return data[:, 2:].view(np.int8).astype(np.float32) * _fp16_value(data[:, :2])


def _dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    return _fp16_value(data[:, :2]) * (_unnibble(data[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _dequantize_q4_1(data: np.ndarray) -> np.ndarray:
    d, m = _fp16_value(data[:, :2]), _fp16_value(data[:, 2:4])
    return d * _unnibble(data[:, 4:]).astype(np.float32) + m


# ------------------------------------------------------------------------------------------------- Q4_K


def _pack_scales_q4_k(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """(n, 8) six-bit scales and mins as llama.cpp's 12 bytes: bytes 0-3 hold scales 0-3 in their low 6 bits and
    the top 2 bits of scales 4-7 above them; bytes 4-7 the same for the mins; bytes 8-11 the low 4 bits of scale
    4 + i (low nibble) and of min 4 + i (high nibble)."""
    scales, mins = scales.astype(np.uint8), mins.astype(np.uint8)
    first = scales[:, :4] | ((scales[:, 4:] >> np.uint8(4)) << np.uint8(6))
    second = mins[:, :4] | ((mins[:, 4:] >> np.uint8(4)) << np.uint8(6))
    third = (scales[:, 4:] & np.uint8(0x0F)) | ((mins[:, 4:] & np.uint8(0x0F)) << np.uint8(4))
    return np.concatenate([first, second, third], axis=1)


def _unpack_scales_q4_k(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    first, second, third = data[:, 0:4], data[:, 4:8], data[:, 8:12]
    high_scales = (third & np.uint8(0x0F)) | ((first >> np.uint8(6)) << np.uint8(4))
    high_mins = (third >> np.uint8(4)) | ((second >> np.uint8(6)) << np.uint8(4))
    scales = np.concatenate([first & np.uint8(0x3F), high_scales], axis=1)
    mins = np.concatenate([second & np.uint8(0x3F), high_mins], axis=1)
    return scales, mins  # (n, 8) each


def _fit_sub_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale s >= 0 and min m >= 0 per sub-block of ``x`` (n, 8, 32) so that ``s * q - m`` with q in [0, 15]
    fits x: for each candidate grid, round to it, then solve s and m by least squares; keep the best fit."""
    low = np.minimum(x.min(axis=2), 0)  # (n, 8): a min of at most zero, as llama.cpp keeps it
    span = x.max(axis=2) - low
    best_s, best_m = span / 15, -low  # the plain min/max grid
    best_error = _fit_error(x, best_s, best_m)
    count = np.float32(x.shape[2])
    for step in _Q4_K_CANDIDATES:
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.rint((x - low[..., None]) * ((15 + step) / span)[..., None]), 0, 15)
            sum_q, sum_qq = q.sum(axis=2), (q * q).sum(axis=2)
            sum_x, sum_qx = x.sum(axis=2), (q * x).sum(axis=2)
            det = count * sum_qq - sum_q * sum_q
            s = (count * sum_qx - sum_q * sum_x) / det
            offset = (sum_qq * sum_x - sum_q * sum_qx) / det  # x ~ s q + offset; offset = -m must be <= 0
            s = np.where(offset > 0, sum_qx / sum_qq, s)
            offset = np.minimum(offset, 0)
            error = ((s[..., None] * q + offset[..., None] - x) ** 2).sum(axis=2)
        better = np.isfinite(error) & (s >= 0) & (error < best_error)
        best_s, best_m, best_error = (np.where(better, s, best_s), np.where(better, -offset, best_m),
                                      np.where(better, error, best_error))
    return best_s.astype(np.float32), best_m.astype(np.float32)


def _fit_error(x: np.ndarray, s: np.ndarray, m: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint((x + m[..., None]) / s[..., None]), 0, 15)
    q = np.where(np.isfinite(q), q, 0)
    return ((s[..., None] * q - m[..., None] - x) ** 2).sum(axis=2)


def _six_bit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8) non-negative values as an fp16 super-scale (n, 1) and six-bit multiples of it (n, 8)."""
    super_scale = (values.max(axis=1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.where(super_scale > 0, np.rint(values / super_scale), 0)
    return super_scale, np.clip(steps, 0, 63).astype(np.uint8)


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    x = blocks.reshape(-1, 8, 32)  # (n, sub-blocks, weights)
    s, m = _fit_sub_blocks(x)
    d, scales = _six_bit(s)
    dmin, mins = _six_bit(m)
    step = (d * scales.astype(np.float32))[..., None]  # (n, 8, 1): the scales as they dequantize
    offset = (dmin * mins.astype(np.float32))[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(step > 0, np.clip(np.rint((x + offset) / step), 0, 15), 0).astype(np.uint8)
    qs = codes[:, 0::2] | (codes[:, 1::2] << np.uint8(4))  # (n, 4, 32): sub-blocks 2c and 2c + 1 share bytes
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales_q4_k(scales, mins),
                           qs.reshape(-1, 128)], axis=1)


def _dequantize_q4_k(data: np.ndarray) -> np.ndarray:
    d, dmin = _fp16_value(data[:, 0:2]), _fp16_value(data[:, 2:4])
    scales, mins = _unpack_scales_q4_k(data[:, 4:16])
    step = (d * scales.astype(np.float32))[..., None]  # (n, 8, 1)
    offset = (dmin * mins.astype(np.float32))[..., None]
    qs = data[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & np.uint8(0x0F)).reshape(-1, 8, 32).astype(np.float32)
    return (step * codes - offset).reshape(-1, 256)


# ------------------------------------------------------------------------------------------------- Q6_K


def _pack_q6_k(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 256) codes in [0, 63] as ql (n, 128) and qh (n, 64). Each half h of 128 weights: ql byte
    64 h + j holds the low 4 bits of weight 128 h + j (low nibble) and of 128 h + 64 + j (high); qh byte
    32 h + j holds the top 2 bits of weights 128 h + 32 k + j at bits 2k, k = 0..3."""
    halves = codes.astype(np.uint8).reshape(-1, 2, 4, 32)  # (n, half, quarter, j)
    low = halves & np.uint8(0x0F)
    ql = low[:, :, 0:2] | (low[:, :, 2:4] << np.uint8(4))  # (n, 2, 2, 32): weights j and 64 + j
    high = (halves >> np.uint8(4)) << (np.arange(4, dtype=np.uint8) * 2).reshape(1, 1, 4, 1)
    qh = np.bitwise_or.reduce(high, axis=2)  # (n, 2, 32)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    x = blocks.reshape(-1, 16, 16)  # (n, sub-blocks, weights)
    # each sub-block's weight of largest magnitude maps to code -32, as Q4_0 does with -8
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=2, keepdims=True), axis=2)[..., 0] / -32  # (n, 16)
    largest = np.take_along_axis(extreme, np.abs(extreme).argmax(axis=1, keepdims=True), axis=1)  # (n, 1)
    d = (largest / -128).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(d != 0, np.clip(np.rint(extreme / d), -128, 127), 0).astype(np.int8)
        step = (d * scales.astype(np.float32))[..., None]  # (n, 16, 1)
        codes = np.where(step != 0, np.clip(np.rint(x / step), -32, 31), 0).astype(np.int16) + 32
    ql, qh = _pack_q6_k(codes.reshape(-1, 256))
    return np.concatenate([ql, qh, scales.view(np.uint8), _fp16_bytes(d)], axis=1)


def _dequantize_q6_k(data: np.ndarray) -> np.ndarray:
    ql, qh, scales, d = data[:, :128], data[:, 128:192], data[:, 192:208], _fp16_value(data[:, 208:210])
    step = (d * np.ascontiguousarray(scales).view(np.int8).astype(np.float32)).reshape(-1, 16, 1)
    low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    codes = (low.reshape(-1, 8, 32) | (high.reshape(-1, 8, 32) << np.uint8(4))).astype(np.int8) - np.int8(32)
    return (step * codes.reshape(-1, 16, 16).astype(np.float32)).reshape(-1, 256)


# ------------------------------------------------------------------------------------------------ public

_QUANTIZE = {"q8_0": _quantize_q8_0, "q4_0": _quantize_q4_0, "q4_1": _quantize_q4_1,
             "q4_k": _quantize_q4_k, "q6_k": _quantize_q6_k}
_DEQUANTIZE = {"q8_0": _dequantize_q8_0, "q4_0": _dequantize_q4_0, "q4_1": _dequantize_q4_1,
               "q4_k": _dequantize_q4_k, "q6_k": _dequantize_q6_k}


def quantize(weight: np.ndarray, gguf_type: str) -> np.ndarray:
    """(rows, K) floats as (rows, K / block * bytes) uint8 blocks of ``gguf_type``."""
    rows, columns = weight.shape
    block, size = _check(gguf_type, columns)
    blocks = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, block)
    return _QUANTIZE[gguf_type](blocks).reshape(rows, columns // block * size)


def dequantize(data: np.ndarray, gguf_type: str) -> np.ndarray:
    """(rows, bytes) uint8 blocks of ``gguf_type`` as (rows, K) float32."""
    if gguf_type not in GGUF_BLOCKS:
        raise BitsmithError(f"unknown GGUF block type '{gguf_type}'; available: {', '.join(GGUF_BLOCKS)}")
    block, size = GGUF_BLOCKS[gguf_type]
    rows, length = data.shape
    if length % size:
        raise BitsmithError(f"rows of {length} bytes do not split into {gguf_type.upper()} blocks of {size}")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, size)
    return _DEQUANTIZE[gguf_type](blocks).reshape(rows, length // size * block)


def _blocks_of(codes: np.ndarray, *per_group: np.ndarray) -> tuple[np.ndarray, ...]:
    """(rows, K) codes and (rows, K / 32) group values as (n, 32) blocks and (n, 1) values."""
    rows, columns = codes.shape
    _check("q8_0", columns)
    for values in per_group:
        if values.shape != (rows, columns // 32):
            raise BitsmithError(f"expected one value per group of 32, shape {(rows, columns // 32)};"
                                f" got {values.shape}")
    return (codes.reshape(-1, 32), *(np.asarray(v, dtype=np.float32).reshape(-1, 1) for v in per_group))


def pack_q8_0(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Signed codes (rows, K) in [-127, 127] with fp16 scales (rows, K / 32) as Q8_0 rows: ``w = scale * q``."""
    blocks, d = _blocks_of(codes, scale)
    return _pack_q8_0(blocks, d).reshape(codes.shape[0], -1)


def pack_q4_0(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Codes (rows, K) in [0, 15] with fp16 scales (rows, K / 32) as Q4_0 rows: ``w = scale * (q - 8)``."""
    blocks, d = _blocks_of(codes, scale)
    return _pack_q4_0(blocks, d).reshape(codes.shape[0], -1)


def pack_q4_1(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    """Codes (rows, K) in [0, 15], scales and minimums (rows, K / 32) as Q4_1 rows: ``w = scale * q + minimum``,
    both rounded to fp16 (a minimum that fp16 cannot hold moves every weight of its group by the same amount)."""
    blocks, d, m = _blocks_of(codes, scale, minimum)
    return _pack_q4_1(blocks, d, m).reshape(codes.shape[0], -1)


_CODE_BLOCKS = {"q8_0": 34, "q4_0": 18, "q4_1": 20}  # the block types whose codes bitsmith keeps as they are


def unpack_blocks(data: np.ndarray, gguf_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The inverse of ``pack_q8_0`` / ``pack_q4_0`` / ``pack_q4_1``: (rows, bytes) blocks as unsigned codes
    (rows, K) uint8 (Q8_0's signed codes moved up by 128), fp16 scales (rows, K / 32), and Q4_1's fp16 minimums
    (else None)."""
    rows, size = data.shape[0], _CODE_BLOCKS[gguf_type]
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, size)
    if gguf_type == "q8_0":
        codes = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        codes = _unnibble(blocks[:, size - 16:])
    scale = np.ascontiguousarray(blocks[:, 0:2]).view(np.float16).reshape(rows, -1)
    minimum = np.ascontiguousarray(blocks[:, 2:4]).view(np.float16).reshape(rows, -1) if gguf_type == "q4_1" else None
    return codes.reshape(rows, -1), scale, minimum


def rotary_row_order(rows: int, heads: int) -> np.ndarray:
    """The row permutation llama.cpp's converter applies to q_proj / k_proj (each head's (2, head_dim / 2) rows as
    (head_dim / 2, 2)): ``weight[order]`` is llama.cpp's layout, ``weight[argsort(order)]`` transformers'."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)
