"""GGUF blocks against the ``gguf`` package (llama.cpp's own Python reader): Q8_0 / Q4_0 / Q4_1 quantized byte for
byte as its reference quantizers do; every type read back by its dequantizers bit for bit as bitsmith reads it;
codes packed without re-quantizing; the K-quants' errors measured against the 32-weight types."""

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from bitsmith.errors import BitsmithError
from bitsmith.formats.gguf_blocks import GGUF_BLOCKS, dequantize, pack_q4_0, pack_q4_1, pack_q8_0, quantize

TYPES = tuple(GGUF_BLOCKS)


def _ggml(gguf_type: str):
    return gguf.GGMLQuantizationType[gguf_type.upper()]


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
    """(64, 512) float32: Gaussian rows, plus rows that are zero, constant, or hold one large outlier."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 512)).astype(np.float32) * 0.05
    w[0] = 0
    w[1] = 0.3
    w[2] = -0.7
    w[3, 100] = 4.0
    w[4] = rng.uniform(0.01, 0.02, 512)  # every weight positive: the K-quants' min clamps at zero
    return w


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0", "q4_1"])
def test_quantize_matches_the_reference_byte_for_byte(weights, gguf_type):
    ours = quantize(weights, gguf_type)
    assert ours.dtype == np.uint8 and ours.shape == (64, 512 // 32 * GGUF_BLOCKS[gguf_type][1])
    assert np.array_equal(ours, gguf_quantize(weights, _ggml(gguf_type)))


@pytest.mark.parametrize("gguf_type", TYPES)
def test_dequantize_is_the_reference_dequantizer_bit_for_bit(weights, gguf_type):
    data = quantize(weights, gguf_type)
    ours, theirs = dequantize(data, gguf_type), gguf_dequantize(data, _ggml(gguf_type))
    assert ours.shape == weights.shape and np.isfinite(ours).all()
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("gguf_type", TYPES)
def test_random_bytes_read_the_same(gguf_type):
    """Every bit of a block read as the reference reads it (scales, mins, both nibbles, Q6_K's high bits)."""
    block, size = GGUF_BLOCKS[gguf_type]
    data = np.random.default_rng(1).integers(0, 256, (8, 2 * size), dtype=np.uint8)
    fp16 = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q4_k": [0, 2], "q6_k": [size - 2]}[gguf_type]
    for start in (offset + k * size for offset in fp16 for k in range(2)):  # finite fp16 scales: NaN != NaN
        data[:, start: start + 2] = np.float16(0.01).reshape(1).view(np.uint8)
    assert np.array_equal(dequantize(data, gguf_type), gguf_dequantize(data, _ggml(gguf_type)))


@pytest.mark.parametrize("gguf_type", TYPES)
def test_zero_and_constant_rows_come_back(weights, gguf_type):
    back = dequantize(quantize(weights[:3], gguf_type), gguf_type)
    assert np.array_equal(back[0], weights[0])
    assert np.abs(back[1:] - weights[1:3]).max() <= 2e-3 * np.abs(weights[1:3]).max()  # fp16 scale rounding


def test_k_quants_beat_the_32_weight_types_of_their_width(weights):
    """Mean squared error on Gaussian weights: Q4_K's fitted scales and mins below Q4_0 and Q4_1 (same or more
    bytes per weight), Q6_K between Q4 and Q8_0."""
    w = np.random.default_rng(2).standard_normal((256, 1024)).astype(np.float32)
    error = {t: float(np.mean((dequantize(quantize(w, t), t) - w) ** 2)) for t in TYPES}
    assert error["q4_k"] < 0.9 * error["q4_1"]  # 0.00511 vs 0.00614
    assert error["q4_k"] < 0.75 * error["q4_0"]  # 0.00511 vs 0.00742
    assert 10 * error["q8_0"] < error["q6_k"] < error["q4_k"] / 10  # 2.9e-05 < 3.5e-04 < 5.1e-03


def test_packed_codes_are_the_blocks_of_those_codes():
    """Codes that already fit a block are written as they are: Q4_0 element j in the low nibble of byte j, j + 16 in
    the high one; the reference dequantizer gives scale * (q - 8), scale * q + min, scale * q."""
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, (4, 64)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, (4, 2)).astype(np.float16)
    minimum = rng.uniform(-0.5, 0, (4, 2)).astype(np.float16)
    expanded = np.repeat(scale.astype(np.float32), 32, axis=1)
    q4_0 = pack_q4_0(codes, scale)
    assert q4_0.shape == (4, 36) and np.array_equal(q4_0[:, 2:18], codes[:, :16] | (codes[:, 16:32] << 4))
    assert np.array_equal(q4_0[:, :2].view(np.float16), scale[:, :1])
    assert np.array_equal(gguf_dequantize(q4_0, _ggml("q4_0")), expanded * (codes.astype(np.float32) - 8))
    q4_1 = pack_q4_1(codes, scale, minimum)
    expected = expanded * codes.astype(np.float32) + np.repeat(minimum.astype(np.float32), 32, axis=1)
    assert np.array_equal(gguf_dequantize(q4_1, _ggml("q4_1")), expected)
    signed = rng.integers(-128, 128, (4, 64)).astype(np.int8)
    q8_0 = gguf_dequantize(pack_q8_0(signed, scale), _ggml("q8_0"))
    assert np.array_equal(q8_0, signed.astype(np.float32) * expanded)


def test_rows_a_block_does_not_divide_are_refused():
    with pytest.raises(BitsmithError, match="rows of 96 weights do not split into Q4_K blocks of 256"):
        quantize(np.zeros((2, 96), np.float32), "q4_k")
    with pytest.raises(BitsmithError, match="unknown GGUF block type 'q5_0'"):
        quantize(np.zeros((2, 96), np.float32), "q5_0")
    with pytest.raises(BitsmithError, match="one value per group of 32"):
        pack_q4_0(np.zeros((2, 64), np.uint8), np.ones((2, 3), np.float16))
