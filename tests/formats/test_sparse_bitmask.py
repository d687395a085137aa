"""Bitmask packing against numpy's packbits (compressed-tensors' own reference), exact round trips, N:M masks,
and the malformed inputs ``unpack_bitmask`` / ``densify`` refuse."""

import numpy as np
import pytest
import torch

from bitsmith.errors import BitsmithError
from bitsmith.formats.sparse import (
    bitmask_shape,
    densify,
    nm_holds,
    nm_keep_mask,
    nm_pattern,
    pack_bitmask,
    popcount,
    row_offsets,
    sparsify,
    unpack_bitmask,
    zero_fraction,
)


def _sparse(rows, cols, sparsity, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g).to(dtype)
    return weight * (torch.rand(rows, cols, generator=g) >= sparsity)


@pytest.mark.parametrize("cols", [1, 7, 8, 13, 64, 577])
def test_bitmask_is_numpy_packbits_little(cols):
    mask = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) > 0.4
    bitmask = pack_bitmask(mask)
    assert bitmask.dtype == torch.uint8 and tuple(bitmask.shape) == bitmask_shape((5, cols)) == (5, -(-cols // 8))
    assert np.array_equal(bitmask.numpy(), np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(unpack_bitmask(bitmask, (5, cols)), mask)
    assert popcount(bitmask) == int(mask.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_sparsify_densify_round_trip_exact(dtype):
    weight = _sparse(48, 100, 0.6, dtype=dtype if dtype.is_floating_point else torch.float32)
    weight = weight.to(dtype) if not dtype.is_floating_point else weight
    bitmask, values = sparsify(weight)
    assert values.dtype == dtype and values.numel() == int((weight != 0).sum())
    assert torch.equal(densify(bitmask, values, weight.shape), weight)
    offsets = row_offsets(bitmask)
    counts = (weight != 0).sum(dim=1)
    assert offsets.tolist() == (torch.cumsum(counts, 0) - counts).tolist()


def test_densify_with_a_fill_tensor():
    codes = torch.randint(0, 16, (8, 32), dtype=torch.uint8)
    zero = torch.full((8, 32), 7, dtype=torch.uint8)
    keep = codes != zero
    bitmask, values = sparsify(codes, keep)
    assert torch.equal(densify(bitmask, values, codes.shape, fill=zero), codes)


def test_nm_masks():
    weight = _sparse(16, 64, 0.0)
    groups = weight.reshape(16, 16, 4)
    top2 = groups.abs().topk(2, dim=-1).indices
    pruned = torch.zeros_like(groups).scatter(-1, top2, groups.gather(-1, top2)).reshape(16, 64)
    pruned[0, :4] = 0.0  # a group with no non-zero left: two zeros are kept
    pruned[1, :4] = torch.tensor([0.0, 0.0, 3.0, 0.0])
    assert nm_holds(pruned, 2, 4) and not nm_holds(weight, 2, 4) and not nm_holds(pruned[:, :63], 2, 4)
    keep = nm_keep_mask(pruned, 2, 4)
    assert (keep.reshape(16, 16, 4).sum(dim=-1) == 2).all()
    assert keep[0, :4].tolist() == [True, True, False, False] and keep[1, :4].tolist() == [True, False, True, False]
    assert bool(keep[pruned != 0].all())
    bitmask, values = sparsify(pruned, keep)
    assert values.numel() == 16 * 32 and torch.equal(densify(bitmask, values, pruned.shape), pruned)
    with pytest.raises(BitsmithError, match="not 2:4 sparse"):
        nm_keep_mask(weight, 2, 4)


def test_nm_pattern():
    weight = _sparse(8, 16, 0.0)
    assert nm_pattern(weight) is None
    two_four = weight * torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(4)
    assert nm_pattern(two_four) == (2, 4)
    assert nm_pattern(two_four * torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(4)) == (1, 4)
    four_eight = weight * torch.tensor([1.0] * 4 + [0.0] * 4).repeat(2)
    assert nm_pattern(four_eight) == (4, 8)


def test_zero_fraction():
    assert zero_fraction(torch.tensor([[0.0, 1.0], [0.0, 0.0]])) == 0.75


def test_malformed_bitmasks_are_refused():
    weight = _sparse(4, 10, 0.5)
    bitmask, values = sparsify(weight)
    with pytest.raises(BitsmithError, match=r"uint8 \[4, 2\], got int8"):
        unpack_bitmask(bitmask.to(torch.int8), (4, 10))
    with pytest.raises(BitsmithError, match=r"uint8 \[4, 2\], got uint8 \[4, 3\]"):
        unpack_bitmask(torch.zeros(4, 3, dtype=torch.uint8), (4, 10))
    padded = bitmask.clone()
    padded[0, 1] |= 0x80  # column 15 of a 10-column row
    with pytest.raises(BitsmithError, match="padding bits must be 0"):
        unpack_bitmask(padded, (4, 10))
    with pytest.raises(BitsmithError, match=f"keeps {values.numel()} elements but {values.numel() - 1} values"):
        densify(bitmask, values[:-1], (4, 10))
    with pytest.raises(BitsmithError, match="2-D tensors"):
        bitmask_shape((2, 3, 4))
