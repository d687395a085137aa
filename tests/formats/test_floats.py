"""floats.py against references built from the bit layouts, plus measured error on a seeded tensor."""

import math

import numpy as np
import pytest
import torch

from bitsmith.errors import BitsmithError
from bitsmith.formats.floats import (
    dequantize_absmax_double,
    quantize_absmax_double,
    quantize_nf4_double,
    FP4_E2M1_GRID,
    NF4_LEVELS,
    cast_float,
    dequantize_fp8,
    dequantize_mxfp4,
    dequantize_nf4,
    fp8_max,
    quantize_fp8,
    quantize_mxfp4,
    quantize_nf4,
)


def _sqnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    return 10 * torch.log10(x.pow(2).sum() / (x - x_hat).pow(2).sum()).item()


def _seeded_normal() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(256, 512)


# ---- fp16 / bf16 ----


def _bf16_reference(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) on the raw bits: keep the top 16 bits."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return rounded.astype(np.uint32).view(np.float32)


def test_cast_float_matches_bit_level_references():
    x = _seeded_normal() * 100
    np.testing.assert_array_equal(cast_float(x, "bf16").numpy(), _bf16_reference(x.numpy()))
    np.testing.assert_array_equal(cast_float(x, "fp16").numpy(), x.numpy().astype(np.float16).astype(np.float32))
    assert cast_float(x, "bf16").dtype == torch.float32
    assert _sqnr(x, cast_float(x, "fp16")) > 73.0  # 73.67
    assert _sqnr(x, cast_float(x, "bf16")) > 55.0  # 55.59


def test_cast_float_rejects_overflow_and_unknown_formats():
    with pytest.raises(BitsmithError, match="exceed fp16's largest value 65504"):
        cast_float(torch.tensor([1.0, 7e4]), "fp16")
    assert cast_float(torch.tensor([7e4]), "bf16").item() == 70144.0
    assert cast_float(torch.tensor([float("inf"), 1.0]), "fp16").tolist() == [float("inf"), 1.0]
    with pytest.raises(BitsmithError, match="unknown half-precision format 'fp8'"):
        cast_float(torch.ones(2), "fp8")


# ---- fp8 ----


def _fp8_grid(exp_bits: int, man_bits: int, bias: int, fn: bool) -> np.ndarray:
    """All finite non-negative values of an fp8 format, decoded from the bit fields by hand."""
    values = []
    for exponent in range(2**exp_bits):
        for mantissa in range(2**man_bits):
            if exponent == 2**exp_bits - 1 and (not fn or mantissa == 2**man_bits - 1):
                continue  # inf/NaN codes (e4m3fn keeps all but the last as numbers)
            if exponent == 0:
                values.append(mantissa / 2**man_bits * 2.0 ** (1 - bias))
            else:
                values.append((1 + mantissa / 2**man_bits) * 2.0 ** (exponent - bias))
    return np.array(values)


_FP8 = {"e4m3": (4, 3, 7, True), "e5m2": (5, 2, 15, False)}


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_matches_nearest_grid_value(fmt):
    torch.manual_seed(3)
    x = torch.randn(16, 128) * torch.rand(16, 1) * 10
    grid = _fp8_grid(*_FP8[fmt])
    assert grid.max() == fp8_max(fmt)  # 448 and 57344
    codes, scale = quantize_fp8(x, fmt, (1, 32))
    assert codes.dtype == {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    assert scale.shape == (16, 4)
    # reference: per-block scale from the formula, then the nearest grid value by brute force
    blocks = x.numpy().reshape(16, 4, 32)
    ref_scale = np.abs(blocks).max(axis=-1) / np.float32(grid.max())
    scaled = blocks / ref_scale[..., None]
    nearest = grid[np.abs(np.abs(scaled)[..., None] - grid).argmin(axis=-1)] * np.sign(scaled)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(codes.float().numpy().reshape(16, 4, 32), nearest)
    x_hat = dequantize_fp8(codes, scale, (1, 32))
    np.testing.assert_array_equal(x_hat.numpy().reshape(16, 4, 32), (nearest * ref_scale[..., None]).astype(np.float32))


def test_fp8_sqnr_on_seeded_normal():
    x = _seeded_normal()
    for fmt, block_size, floor in [
        ("e4m3", None, 31.0),  # 31.53
        ("e4m3", (1, 512), 31.0),  # 31.59
        ("e4m3", (1, 32), 32.0),  # 32.41
        ("e5m2", None, 25.0),  # 25.62
        ("e5m2", (1, 32), 26.0),  # 26.41
    ]:
        codes, scale = quantize_fp8(x, fmt, block_size)
        assert _sqnr(x, dequantize_fp8(codes, scale, block_size)) > floor, (fmt, block_size)


def test_fp8_bad_input_raises():
    with pytest.raises(BitsmithError, match="block size 3 does not divide dimension 8"):
        quantize_fp8(torch.randn(8, 8), "e4m3", (3, 8))
    with pytest.raises(BitsmithError, match="NaN or infinite"):
        quantize_fp8(torch.tensor([1.0, float("nan")]))
    with pytest.raises(BitsmithError, match="unknown fp8 format 'e3m4'"):
        quantize_fp8(torch.randn(4), "e3m4")


# ---- MXFP4 ----


def _mxfp4_reference(x: np.ndarray, block: int = 32):
    """Codes and biased exponents of a 2-D x, element by element, from the OCP MX spec's rules."""
    codes = np.zeros(x.shape, dtype=np.uint8)
    exponents = np.zeros((x.shape[0], x.shape[1] // block), dtype=np.uint8)
    for row in range(x.shape[0]):
        for b in range(x.shape[1] // block):
            values = [float(v) for v in x[row, b * block : (b + 1) * block]]
            amax = max(abs(v) for v in values)
            shared = math.frexp(amax)[1] - 1 - 2 if amax > 0 else -127
            exponents[row, b] = shared + 127
            for i, v in enumerate(values):
                mag = min(abs(v) / 2.0**shared, 6.0)
                dist = [abs(mag - g) for g in FP4_E2M1_GRID]
                best = min(range(8), key=lambda k: (dist[k], k % 2))  # nearest, ties to the even code
                codes[row, b * block + i] = best | (8 if math.copysign(1.0, v) < 0 else 0)
    return codes, exponents


def test_mxfp4_matches_reference():
    torch.manual_seed(4)
    x = torch.randn(4, 128) * torch.rand(4, 1) * 50
    codes, exponents = quantize_mxfp4(x)
    ref_codes, ref_exponents = _mxfp4_reference(x.numpy())
    np.testing.assert_array_equal(codes.numpy(), ref_codes)
    np.testing.assert_array_equal(exponents.numpy(), ref_exponents)
    table = np.array(FP4_E2M1_GRID + tuple(-g for g in FP4_E2M1_GRID))
    x_hat = table[ref_codes] * 2.0 ** (np.repeat(ref_exponents, 32, axis=1).astype(np.float64) - 127)
    np.testing.assert_array_equal(dequantize_mxfp4(codes, exponents).numpy(), x_hat.astype(np.float32))


@pytest.mark.parametrize("power", [-120, -20, 0, 5, 100])
def test_every_fp4_value_round_trips_exactly(power):
    grid = torch.tensor(FP4_E2M1_GRID)
    block = torch.cat([grid, -grid, grid, -grid]) * 2.0**power  # 32 values, amax 6 * 2**power
    codes, exponents = quantize_mxfp4(block.reshape(1, 32))
    assert torch.equal(dequantize_mxfp4(codes, exponents).reshape(32), block)
    assert exponents.item() == power + 127
    assert codes.reshape(32).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] * 2


def test_mxfp4_ties_go_to_even_and_large_values_saturate():
    # amax 7 -> shared exponent floor(log2 7) - 2 = 0, so the values are quantized as they are
    halfway = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 7.0, 6.5]
    x = torch.tensor(halfway + [0.0] * 22).reshape(1, 32)
    codes, exponents = quantize_mxfp4(x)
    assert exponents.item() == 127
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 6.0, 6.0]
    assert dequantize_mxfp4(codes, exponents).reshape(32)[:10].tolist() == expected


def test_mxfp4_sqnr_and_bad_input():
    x = _seeded_normal()
    codes, exponents = quantize_mxfp4(x)
    assert codes.shape == (256, 512) and exponents.shape == (256, 16) and exponents.dtype == torch.uint8
    assert int(codes.max()) <= 15
    assert _sqnr(x, dequantize_mxfp4(codes, exponents)) > 18.0  # 18.82
    zeros, zero_exponents = quantize_mxfp4(torch.zeros(2, 32))
    assert zero_exponents.tolist() == [[0], [0]] and not dequantize_mxfp4(zeros, zero_exponents).any()
    with pytest.raises(BitsmithError, match=r"mxfp4 block size 32 does not divide .* shape \[4, 48\]"):
        quantize_mxfp4(torch.randn(4, 48))


# ---- NF4 ----


def test_nf4_levels_follow_the_qlora_construction():
    # bitsandbytes' create_normal_map(offset=0.9677083): 8 positive and 7 negative N(0,1) quantiles and 0
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    levels = levels / levels.max()
    np.testing.assert_allclose(np.array(NF4_LEVELS), levels.numpy(), atol=1e-6)


def test_nf4_levels_round_trip_exactly():
    levels = torch.tensor(NF4_LEVELS)
    x = torch.stack([levels * 2.5, levels * 0.125])  # (2, 16): one block per row
    codes, absmax = quantize_nf4(x, block_size=16)
    assert absmax.tolist() == [[2.5], [0.125]]
    assert codes.tolist() == [list(range(16))] * 2
    assert torch.equal(dequantize_nf4(codes, absmax, block_size=16), x)


def test_nf4_matches_nearest_level_reference_and_sqnr():
    x = _seeded_normal()
    codes, absmax = quantize_nf4(x)
    assert codes.dtype == torch.uint8 and absmax.shape == (256, 8)
    blocks = x.numpy().reshape(256, 8, 64)
    ref_absmax = np.abs(blocks).max(axis=-1)
    levels = np.array(NF4_LEVELS, dtype=np.float32)
    ref_codes = np.abs((blocks / ref_absmax[..., None])[..., None] - levels).argmin(axis=-1)
    np.testing.assert_array_equal(absmax.numpy(), ref_absmax)
    np.testing.assert_array_equal(codes.numpy().reshape(256, 8, 64), ref_codes)
    assert _sqnr(x, dequantize_nf4(codes, absmax)) > 20.0  # 20.72
    with pytest.raises(BitsmithError, match="nf4 block size 64 does not divide"):
        quantize_nf4(torch.randn(4, 100))


def test_double_quantized_absmax_costs_an_eighth_of_a_bit_and_stays_close():
    x = _seeded_normal()  # (256, 512): 2048 blocks of 64
    _, absmax = quantize_nf4(x)
    codes8, scale, offset = quantize_absmax_double(absmax)
    assert codes8.dtype == torch.int8 and codes8.shape == absmax.shape and scale.shape == (8,)  # 2048 / 256
    assert torch.isclose(offset, absmax.mean().reshape(1)).all()
    stored = dequantize_absmax_double(codes8, scale, offset)
    per_block = (absmax - offset).abs().reshape(-1, 256).amax(dim=1) / 127  # one int8 step per block of 256
    assert ((stored - absmax).abs().reshape(-1, 256) <= per_block[:, None] / 2 + 1e-7).all()  # within half a step
    bits = (codes8.numel() * 8 + scale.numel() * 32 + 32) / x.numel()
    assert abs(bits - 0.127) < 0.002  # QLoRA's figure: 8 bits + 32 / 256 per 64 weights
    codes, codes8b, _, _ = quantize_nf4_double(x)
    assert torch.equal(codes8b, codes8)
    assert _sqnr(x, dequantize_nf4(codes, stored)) > 20.0  # as good as plain NF4's 20.7 dB, within a hair


def test_double_quantization_of_a_short_last_block_and_tiny_absmax():
    absmax = torch.tensor([1e-6, 0.5, 0.7, 0.2, 3.0])  # 5 values, one short block
    codes8, scale, offset = quantize_absmax_double(absmax, block=4)
    assert scale.shape == (2,)
    stored = dequantize_absmax_double(codes8, scale, offset, block=4)
    assert (stored >= 0).all() and torch.allclose(stored, absmax, atol=scale.max().item())
