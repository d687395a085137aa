"""Bitmask sparse storage of 2-D tensors, and N:M patterns. Pure tensor functions; exact round trips.

A tensor (R, C) is stored as

    bitmask  uint8 (R, ceil(C / 8))   bit j of byte b in row r is 1 when element (r, 8b + j) is kept, least
                                      significant bit first (numpy.packbits(..., bitorder="little")); the
                                      padding bits of a row's last byte are 0
    values   (kept,)                  the kept elements in row-major order, in the tensor's dtype

which is compressed-tensors' ``sparse-bitmask`` layout (``<p>.bitmask`` and ``<p>.compressed``; its
``<p>.row_offsets`` are ``row_offsets(bitmask)``). Its ``sparse-24-bitmask`` keeps exactly 2 of every 4
along each row and stores the values as (R, C / 2): ``nm_keep_mask`` chooses those positions (the non-zeros,
topped up with zeros in groups that have fewer), so the round trip is exact however a group was pruned.

Element (r, c) that is not kept comes back as ``fill``: 0 for float weights, or any (R, C) tensor (for
quantized codes: the zero point of the element's group, whose dequantized value is exactly 0).
"""

from __future__ import annotations

import torch

from bitsmith.errors import BitsmithError

__all__ = [
    "bitmask_shape", "pack_bitmask", "unpack_bitmask", "popcount", "row_offsets", "sparsify", "densify",
    "nm_holds", "nm_keep_mask", "nm_pattern", "zero_fraction",
]

_BITS = torch.arange(8, dtype=torch.int32)  # bit j of a byte holds column 8b + j


def bitmask_shape(shape: tuple[int, ...] | list[int] | torch.Size) -> tuple[int, int]:
    """(R, ceil(C / 8)): the bitmask of an (R, C) tensor."""
    if len(shape) != 2:
        raise BitsmithError(f"bitmask storage is for 2-D tensors, got shape {list(shape)}")
    rows, cols = shape
    return rows, -(-cols // 8)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean (R, C) mask as a uint8 (R, ceil(C / 8)) bitmask."""
    rows, width = bitmask_shape(mask.shape)
    cols = mask.shape[1]
    padded = torch.nn.functional.pad(mask.to(torch.int32), (0, width * 8 - cols))  # (R, width * 8), pads 0
    return (padded.view(rows, width, 8) << _BITS).sum(dim=-1).to(torch.uint8)  # bits disjoint: sum == or


def unpack_bitmask(bitmask: torch.Tensor, shape: tuple[int, int] | list[int]) -> torch.Tensor:
    """The boolean (R, C) mask of a bitmask, which must be uint8 of ``bitmask_shape(shape)`` with its padding
    bits 0 (a set padding bit would mark an element that does not exist)."""
    expected = bitmask_shape(shape)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != expected:
        raise BitsmithError(f"a bitmask of a {list(shape)} tensor is uint8 {list(expected)}, got"
                            f" {str(bitmask.dtype).removeprefix('torch.')} {list(bitmask.shape)}")
    bits = ((bitmask.to(torch.int32).unsqueeze(-1) >> _BITS) & 1).bool()  # (R, width, 8)
    bits = bits.reshape(expected[0], -1)  # (R, width * 8)
    if bits[:, shape[1]:].any():
        raise BitsmithError(f"the bitmask marks elements past column {shape[1]} (its padding bits must be 0)")
    return bits[:, : shape[1]]


def popcount(bitmask: torch.Tensor) -> int:
    """How many elements a bitmask keeps."""
    return int(((bitmask.to(torch.int32).unsqueeze(-1) >> _BITS) & 1).sum())


def row_offsets(bitmask: torch.Tensor) -> torch.Tensor:
    """int64 (R,): where each row's kept values start in ``values`` (compressed-tensors' ``row_offsets``)."""
    counts = ((bitmask.to(torch.int64).unsqueeze(-1) >> _BITS.long()) & 1).sum(dim=(1, 2))  # (R,)
    return torch.cumsum(counts, 0) - counts


def sparsify(tensor: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmask, values) of a 2-D tensor; ``keep`` (boolean, same shape) defaults to its non-zero elements."""
    keep = tensor != 0 if keep is None else keep
    if keep.shape != tensor.shape or keep.dtype != torch.bool:
        raise BitsmithError(f"a keep mask must be boolean {list(tensor.shape)}, got {keep.dtype} {list(keep.shape)}")
    return pack_bitmask(keep), tensor[keep]


def densify(bitmask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int] | list[int],
            fill: torch.Tensor | float | int = 0) -> torch.Tensor:
    """The (R, C) tensor that ``sparsify`` stored: ``values`` (1-D, one per set bit) at the kept positions,
    ``fill`` (a scalar or an (R, C) tensor) elsewhere; in ``values``' dtype."""
    keep = unpack_bitmask(bitmask, shape)
    kept = popcount(bitmask)
    if values.dim() != 1 or values.numel() != kept:
        raise BitsmithError(f"the bitmask keeps {kept} elements but {values.numel()} values are stored"
                            f" (shape {list(values.shape)})")
    if isinstance(fill, torch.Tensor):
        if tuple(fill.shape) != tuple(shape):
            raise BitsmithError(f"a fill tensor must be {list(shape)}, got {list(fill.shape)}")
        out = fill.to(values.dtype).clone()
    else:
        out = torch.full(tuple(shape), fill, dtype=values.dtype)
    out[keep] = values
    return out


def nm_holds(tensor: torch.Tensor, n: int, m: int) -> bool:
    """Whether every run of ``m`` consecutive elements along each row of a 2-D tensor has at most ``n``
    non-zeros (2:4: at least half of each group of 4 is zero)."""
    rows, cols = tensor.shape
    if cols % m or not tensor.numel():
        return False
    return bool(((tensor != 0).reshape(rows, cols // m, m).sum(dim=-1) <= n).all())


def nm_keep_mask(tensor: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A boolean mask keeping exactly ``n`` of every ``m`` along each row: the non-zeros, and in a group with
    fewer than ``n`` the first zeros after them (their stored value is 0, so nothing changes). The tensor must
    satisfy ``nm_holds``."""
    if not nm_holds(tensor, n, m):
        raise BitsmithError(f"the tensor is not {n}:{m} sparse: some group of {m} has more than {n} non-zeros")
    rows, cols = tensor.shape
    nonzero = (tensor != 0).reshape(rows, cols // m, m)  # (R, G, m)
    # rank the positions of a group: non-zeros first, then zeros, each in column order; keep the first n
    order = (~nonzero).to(torch.int64) * m + torch.arange(m)  # (R, G, m), distinct per group
    ranks = order.argsort(dim=-1).argsort(dim=-1)
    return (ranks < n).reshape(rows, cols)


def nm_pattern(tensor: torch.Tensor, widths: tuple[int, ...] = (4, 8)) -> tuple[int, int] | None:
    """The strongest N:M pattern a 2-D tensor follows (the smallest M of ``widths``, then the smallest N < M),
    or None: (2, 4) for a 2:4-pruned weight, (4, 8) for 4:8."""
    for m in widths:
        for n in range(1, m):
            if nm_holds(tensor, n, m):
                return n, m
    return None


def zero_fraction(tensor: torch.Tensor) -> float:
    """The fraction of elements that are exactly zero."""
    return float((tensor == 0).sum()) / max(tensor.numel(), 1)
