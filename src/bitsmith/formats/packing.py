"""Pack unsigned low-bit codes into bytes or int32 words, and back. Exact round trips.

Pure tensor functions; nothing here knows about ``nn.Module``.

Byte packing (``pack_codes``) treats the flattened codes as one little-endian bit stream: element k occupies
bits ``[k * bits, (k + 1) * bits)``, so

    bits | elements -> bytes | layout
    2    | 4 -> 1            | element k at bits [2k, 2k + 2) of the byte
    3    | 8 -> 3            | element k at bits [3k, 3k + 3) of a little-endian 24-bit word
    4    | 2 -> 1            | first element in the low nibble (as ONNX int4)
    5    | 8 -> 5            | element k at bits [5k, 5k + 5) of a little-endian 40-bit word
    6    | 4 -> 3            | element k at bits [6k, 6k + 6) of a little-endian 24-bit word
    7    | 8 -> 7            | element k at bits [7k, 7k + 7) of a little-endian 56-bit word
    8    | 1 -> 1            | identity

and a partial last group is padded with zero codes. Word packing (``pack_int32``) is compressed-tensors'
``pack-quantized`` layout: element k of each run of ``32 // bits`` along ``dim`` goes to bits
``[k * bits, (k + 1) * bits)`` of an int32, least significant first.
"""

from __future__ import annotations

import math

import torch

from bitsmith.errors import BitsmithError

__all__ = [
    "pack_codes", "unpack_codes", "packed_bytes", "pack_int32", "unpack_int32", "pack_int32_dense", "unpack_int32_dense",
]

# bits -> (elements, bytes) per group: the smallest run of codes that fills whole bytes
_BYTE_GROUPS = {2: (4, 1), 3: (8, 3), 4: (2, 1), 5: (8, 5), 6: (4, 3), 7: (8, 7), 8: (1, 1)}
_WORD_BITS = (2, 3, 4, 8)  # pack_int32: widths that fill an int32 with whole codes (3: 10 codes, 2 bits spare)


def _check_bits(bits: int, widths=_BYTE_GROUPS) -> None:
    if bits not in widths:
        raise BitsmithError(f"cannot pack {bits}-bit codes: use {', '.join(map(str, widths))} bits")


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes ``pack_codes`` writes for ``numel`` codes of ``bits`` (whole byte groups)."""
    _check_bits(bits)
    per_group, group_bytes = _BYTE_GROUPS[bits]
    return -(-numel // per_group) * group_bytes


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise BitsmithError(f"codes to pack must be an integer tensor, got {codes.dtype}")
    if codes.numel() == 0:
        return
    low, high = codes.min().item(), codes.max().item()
    if low < 0 or high >= 2**bits:
        hint = f"; shift signed codes by {2 ** (bits - 1)} first" if low < 0 else ""
        raise BitsmithError(f"codes span [{low}, {high}] but {bits}-bit codes must lie in [0, {2**bits - 1}]{hint}")


def _pad_to_multiple(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    """Append zeros to the 1-D ``flat`` until its length is a multiple of ``multiple``."""
    return torch.nn.functional.pad(flat, (0, -flat.numel() % multiple))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (any shape, values in [0, 2**bits)) into a 1-D uint8 tensor of ``ceil(numel * bits / 8)`` bytes
    (rounded up to whole 3-byte groups for 3 bits)."""
    _check_bits(bits)
    _check_codes(codes, bits)
    per_group, group_bytes = _BYTE_GROUPS[bits]
    groups = _pad_to_multiple(codes.reshape(-1).long(), per_group).view(-1, per_group)  # (G, per_group)
    shifts = torch.arange(per_group) * bits
    words = (groups << shifts).sum(dim=-1)  # (G,): fields are disjoint, so sum == bitwise or
    packed = (words.unsqueeze(-1) >> (torch.arange(group_bytes) * 8)) & 0xFF  # (G, group_bytes)
    return packed.reshape(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: int | tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 codes of ``shape`` (an int means a 1-D tensor of that many codes)."""
    _check_bits(bits)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    per_group, group_bytes = _BYTE_GROUPS[bits]
    expected = packed_bytes(numel, bits)
    if packed.numel() != expected:
        raise BitsmithError(
            f"{numel} {bits}-bit codes need {expected} packed bytes, got {packed.numel()}"
        )
    groups = packed.reshape(-1, group_bytes).long()  # (G, group_bytes)
    words = (groups << (torch.arange(group_bytes) * 8)).sum(dim=-1)  # (G,)
    codes = (words.unsqueeze(-1) >> (torch.arange(per_group) * bits)) & (2**bits - 1)  # (G, per_group)
    return codes.reshape(-1)[:numel].reshape(shape).to(torch.uint8)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack codes (values in [0, 2**bits)) along ``dim`` into int32 words, ``32 // bits`` codes per word.

    Shape: ``codes.shape`` with ``dim`` shrunk to ``ceil(size / (32 // bits))``, zero-padded. Words whose top
    bit is set wrap to negative int32. compressed-tensors stores signed weights: add ``2**(bits - 1)`` first.
    """
    _check_bits(bits, _WORD_BITS)
    _check_codes(codes, bits)
    per_word = 32 // bits  # 3 bits: 10 per word, top 2 bits unused
    moved = codes.long().movedim(dim, -1)  # (..., size)
    pad = -moved.shape[-1] % per_word
    fields = torch.nn.functional.pad(moved, (0, pad)).unflatten(-1, (-1, per_word))  # (..., words, per_word)
    words = (fields << (torch.arange(per_word) * bits)).sum(dim=-1)  # (..., words) in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement, explicitly
    return words.to(torch.int32).movedim(-1, dim)


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = -1) -> torch.Tensor:
    """Inverse of ``pack_int32``: uint8 codes with ``dim`` restored to ``size`` elements."""
    _check_bits(bits, _WORD_BITS)
    per_word = 32 // bits
    words = packed.long().movedim(dim, -1) & 0xFFFFFFFF  # (..., words), unsigned again
    if not (words.shape[-1] - 1) * per_word < size <= words.shape[-1] * per_word:
        raise BitsmithError(
            f"{words.shape[-1]} int32 words of {bits}-bit codes cannot hold exactly {size} codes"
        )
    fields = (words.unsqueeze(-1) >> (torch.arange(per_word) * bits)) & (2**bits - 1)  # (..., words, per_word)
    return fields.flatten(-2)[..., :size].to(torch.uint8).movedim(-1, dim)


def pack_int32_dense(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack codes (values in [0, 2**bits), 1 <= bits <= 8) along ``dim`` as one dense bit stream: code i at
    bits ``[i * bits, (i + 1) * bits)``, least significant first, a code straddling two words where it
    must. compressed-tensors' layout; for 4 and 8 bits it equals ``pack_int32``.

    Shape: ``codes.shape`` with ``dim`` shrunk to ``ceil(size * bits / 32)``."""
    if not 1 <= bits <= 8:
        raise BitsmithError(f"cannot pack {bits}-bit codes densely: use 1 to 8 bits")
    _check_codes(codes, bits)
    moved = codes.long().movedim(dim, -1)  # (..., size)
    size = moved.shape[-1]
    n_words = -(-size * bits // 32)
    start = torch.arange(size) * bits
    word, offset = start // 32, start % 32
    words = torch.zeros(*moved.shape[:-1], n_words + 1, dtype=torch.long)
    words.index_add_(-1, word, (moved << offset) & 0xFFFFFFFF)  # fields never overlap: add == or
    words.index_add_(-1, word + 1, moved >> (32 - offset))  # the part that spills into the next word
    words = words[..., :n_words]
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).movedim(-1, dim)


def unpack_int32_dense(packed: torch.Tensor, bits: int, size: int, dim: int = -1) -> torch.Tensor:
    """Inverse of ``pack_int32_dense``: uint8 codes with ``dim`` restored to ``size`` elements."""
    if not 1 <= bits <= 8:
        raise BitsmithError(f"cannot unpack {bits}-bit codes: use 1 to 8 bits")
    words = packed.long().movedim(dim, -1) & 0xFFFFFFFF  # (..., words)
    if words.shape[-1] != -(-size * bits // 32):
        raise BitsmithError(f"{words.shape[-1]} int32 words of {bits}-bit codes cannot hold exactly {size} codes")
    words = torch.nn.functional.pad(words, (0, 1))
    start = torch.arange(size) * bits
    word, offset = start // 32, start % 32
    value = (words[..., word] >> offset) | (words[..., word + 1] << (32 - offset))
    return (value & (2**bits - 1)).to(torch.uint8).movedim(-1, dim)
