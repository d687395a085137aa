"""ternary.py against loop references, plus measured error on a seeded tensor."""

import numpy as np
import pytest
import torch

from bitsmith.errors import BitsmithError
from bitsmith.formats.affine import block_size_for
from bitsmith.formats.ternary import dequantize_binary, dequantize_ternary, quantize_binary, quantize_ternary


def _sqnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    return 10 * torch.log10(x.pow(2).sum() / (x - x_hat).pow(2).sum()).item()


def _ternary_reference_row(row: np.ndarray, ratio: float = 0.7):
    """TWN on one block, in float64: threshold, kept elements, their mean magnitude."""
    threshold = ratio * np.mean(np.abs(row))
    codes = np.array([(1 if v > 0 else -1) if abs(v) > threshold else 0 for v in row])
    kept = np.abs(row)[codes != 0]
    return codes, kept.mean() if kept.size else 0.0


def test_binary_matches_reference_per_channel():
    torch.manual_seed(5)
    x = torch.randn(8, 64) * torch.rand(8, 1)
    x[0, :5] = 0.0  # sign(0) -> +1
    block_size = block_size_for(tuple(x.shape), "channel")
    codes, scale = quantize_binary(x, block_size)
    rows = x.numpy().astype(np.float64)
    assert codes.dtype == torch.int8 and scale.shape == (8, 1)
    np.testing.assert_array_equal(codes.numpy(), np.where(rows >= 0, 1, -1))
    np.testing.assert_allclose(scale.numpy()[:, 0], np.abs(rows).mean(axis=1), rtol=1e-6)
    x_hat = dequantize_binary(codes, scale, block_size)
    np.testing.assert_array_equal(x_hat.numpy(), codes.numpy() * scale.numpy())


def test_ternary_matches_reference_per_group():
    torch.manual_seed(6)
    x = torch.randn(8, 64) * torch.rand(8, 1)
    codes, scale = quantize_ternary(x, (1, 16))
    assert codes.dtype == torch.int8 and scale.shape == (8, 4)
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    for r in range(8):
        for g in range(4):
            ref_codes, ref_scale = _ternary_reference_row(x[r, g * 16 : (g + 1) * 16].numpy().astype(np.float64))
            np.testing.assert_array_equal(codes[r, g * 16 : (g + 1) * 16].numpy(), ref_codes)
            np.testing.assert_allclose(scale[r, g].item(), ref_scale, rtol=1e-6)
    x_hat = dequantize_ternary(codes, scale, (1, 16))
    np.testing.assert_array_equal(x_hat.numpy(), (codes.view(8, 4, 16) * scale[..., None]).reshape(8, 64).numpy())


def test_ternary_hand_example():
    # mean |x| = 5 / 6, threshold 0.583: keep 2.0, -1.5 and 0.9 (scale = 4.4 / 3), drop 0.5, 0.1 and -0.0
    x = torch.tensor([[2.0, -1.5, 0.5, 0.1, 0.9, -0.0]])
    codes, scale = quantize_ternary(x, (1, 6))
    assert codes.tolist() == [[1, -1, 0, 0, 1, 0]]
    assert scale.item() == pytest.approx(4.4 / 3, rel=1e-6)


def test_sqnr_on_seeded_normal():
    torch.manual_seed(0)
    x = torch.randn(256, 512)
    per_channel = block_size_for(tuple(x.shape), "channel")
    codes, scale = quantize_binary(x, per_channel)
    assert _sqnr(x, dequantize_binary(codes, scale, per_channel)) > 4.2  # 4.41 (Gaussian theory: 4.40)
    codes, scale = quantize_ternary(x, per_channel)
    assert _sqnr(x, dequantize_ternary(codes, scale, per_channel)) > 7.0  # 7.20
    # TWN's threshold 0.7 * E|x| = 0.56 sigma zeroes P(|x| < 0.56) = 0.42 of a Gaussian
    assert (codes == 0).float().mean().item() == pytest.approx(0.42, abs=0.01)  # 0.4218


def test_all_zero_block_and_bad_input():
    codes, scale = quantize_ternary(torch.zeros(2, 8), (1, 8))
    assert not codes.any() and not scale.any()
    with pytest.raises(BitsmithError, match="block size 5 does not divide dimension 8"):
        quantize_binary(torch.randn(2, 8), (1, 5))
    with pytest.raises(BitsmithError, match="NaN or infinite"):
        quantize_ternary(torch.tensor([[1.0, float("nan")]]), (1, 2))
