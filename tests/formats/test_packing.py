"""packing.py against a bit-stream reference built with Python integers, and hand-written layouts."""

import pytest
import torch

from bitsmith.errors import BitsmithError
from bitsmith.formats.packing import pack_codes, pack_int32, packed_bytes, unpack_codes, unpack_int32

_GROUP_BYTES = {2: 1, 3: 3, 4: 1, 5: 5, 6: 3, 7: 7, 8: 1}  # bytes per group of codes (3 bits: 8 codes in 3 bytes)


def _reference_pack(codes: list[int], bits: int) -> list[int]:
    """One little-endian bit stream: code k at bits [k * bits, (k + 1) * bits), padded to whole groups."""
    stream = sum(code << (k * bits) for k, code in enumerate(codes))
    per_group = _GROUP_BYTES[bits] * 8 // bits
    n_bytes = -(-len(codes) // per_group) * _GROUP_BYTES[bits]
    return list(stream.to_bytes(n_bytes, "little"))


def _reference_pack_int32(row: list[int], bits: int) -> list[int]:
    """compressed-tensors layout for one row: 32 // bits codes per word, least significant first, as int32."""
    per_word = 32 // bits
    words = []
    for start in range(0, len(row), per_word):
        word = sum(code << (k * bits) for k, code in enumerate(row[start : start + per_word]))
        words.append(word - 2**32 if word >= 2**31 else word)
    return words


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("numel", [1, 7, 13, 64, 1001])
def test_pack_matches_reference_and_round_trips(bits, numel):
    torch.manual_seed(numel)
    codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == _reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)
    assert packed.numel() == packed_bytes(numel, bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_round_trip_keeps_shape(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 3, 7), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, (5, 3, 7)), codes)


def test_hand_written_layouts():
    # 4 bits: first element in the low nibble, odd length padded with 0
    assert pack_codes(torch.tensor([1, 2, 3, 4, 15], dtype=torch.uint8), 4).tolist() == [0x21, 0x43, 0x0F]
    # 2 bits: element k at bits [2k, 2k + 2): 0b11_10_01_00 = 0xE4
    assert pack_codes(torch.tensor([0, 1, 2, 3], dtype=torch.uint8), 2).tolist() == [0xE4]
    # 3 bits: 1..7, 0 at bits [3k, 3k + 3) of 0x1F58D1, little-endian
    assert pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8), 3).tolist() == [0xD1, 0x58, 0x1F]


def test_out_of_range_and_bad_arguments_raise():
    with pytest.raises(BitsmithError, match=r"codes span \[0, 16\] but 4-bit codes must lie in \[0, 15\]"):
        pack_codes(torch.tensor([0, 16], dtype=torch.uint8), 4)
    with pytest.raises(BitsmithError, match=r"codes span \[-1, 2\] .*; shift signed codes by 2 first"):
        pack_codes(torch.tensor([-1, 2], dtype=torch.int8), 2)
    with pytest.raises(BitsmithError, match="integer tensor, got torch.float32"):
        pack_codes(torch.tensor([1.0]), 4)
    with pytest.raises(BitsmithError, match="cannot pack 9-bit codes"):
        pack_codes(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(BitsmithError, match="cannot pack 5-bit codes: use 2, 3, 4, 8 bits"):
        pack_int32(torch.tensor([1], dtype=torch.uint8), 5)
    with pytest.raises(BitsmithError, match="10 3-bit codes need 6 packed bytes, got 3"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 10)
    with pytest.raises(BitsmithError, match=r"codes span \[8, 8\] but 3-bit codes must lie in \[0, 7\]$"):
        pack_int32(torch.tensor([[8]]), 3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("size", [1, 10, 33, 64])
def test_pack_int32_matches_reference_and_round_trips(bits, size):
    torch.manual_seed(size)
    codes = torch.randint(0, 2**bits, (3, size), dtype=torch.uint8)
    packed = pack_int32(codes, bits, dim=1)
    assert packed.dtype == torch.int32 and packed.shape == (3, -(-size // (32 // bits)))
    assert packed.tolist() == [_reference_pack_int32(row, bits) for row in codes.tolist()]
    assert torch.equal(unpack_int32(packed, bits, size, dim=1), codes)
    # along dim 0 (GPTQ's qweight and compressed-tensors' zero points pack the rows)
    assert torch.equal(pack_int32(codes.T, bits, dim=0), packed.T)
    assert torch.equal(unpack_int32(packed.T, bits, size, dim=0), codes.T)


def test_pack_int32_hand_written_words():
    # element k at bits [4k, 4k + 4): 1..8 -> 0x87654321, which wraps to a negative int32
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack_int32(codes, 4).tolist() == [[0x87654321 - 2**32]]
    # signed int4 weights are shifted by 8 first, so symmetric zeros pack to 0x88888888 as in compressed-tensors
    assert pack_int32(torch.full((1, 8), 8), 4).tolist() == [[0x88888888 - 2**32]]
    with pytest.raises(BitsmithError, match="2 int32 words of 4-bit codes cannot hold exactly 20 codes"):
        unpack_int32(torch.zeros(1, 2, dtype=torch.int32), 4, 20)


@pytest.mark.parametrize("bits", range(1, 9))
def test_dense_int32_packing_is_compressed_tensors_layout(bits):
    """Dense packing (a 3-bit code may straddle two words) matches compressed-tensors' own packer bit for bit,
    and equals the per-word layout at 4 and 8 bits."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from bitsmith.formats.packing import pack_int32, pack_int32_dense, unpack_int32_dense

    g = torch.Generator().manual_seed(bits)
    for cols in (1, 7, 32, 33, 100, 256):
        codes = torch.randint(0, 2**bits, (5, cols), generator=g)
        ours = pack_int32_dense(codes.to(torch.uint8), bits, dim=1)
        theirs = helpers.pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits, packed_dim=1)
        assert torch.equal(ours, theirs)
        assert torch.equal(unpack_int32_dense(ours, bits, cols, dim=1), codes.to(torch.uint8))
        along_rows = helpers.pack_to_int32((codes.T.contiguous() - 2 ** (bits - 1)).to(torch.int8), bits, packed_dim=0)
        assert torch.equal(pack_int32_dense(codes.T.to(torch.uint8), bits, dim=0), along_rows)
        if bits in (4, 8):
            assert torch.equal(ours, pack_int32(codes.to(torch.uint8), bits, dim=1))
