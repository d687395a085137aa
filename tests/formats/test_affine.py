"""affine.py against a numpy reference written block by block, plus measured error on a seeded tensor."""

import numpy as np
import pytest
import torch

from bitsmith.errors import BitsmithError
from bitsmith.formats.affine import (
    IntFormat,
    block_size_for,
    choose_qparams_affine,
    dequantize_affine,
    fake_quantize_affine,
    quantize_affine,
)


def _sqnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    return 10 * torch.log10(x.pow(2).sum() / (x - x_hat).pow(2).sum()).item()


def _reference_block(block: np.ndarray, bits: int, signed: bool, symmetric: bool):
    """(codes, scale, zero) of one float32 block, written from the formulas with numpy float32 scalars."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    f32 = np.float32
    eps = f32(np.finfo(np.float32).tiny * 2**10)
    lo, hi = f32(min(block.min(), 0)), f32(max(block.max(), 0))
    if symmetric:
        amax = max(abs(lo), abs(hi))
        if signed:
            scale, zero = max(amax / f32(qmax), eps), 0
        else:
            scale, zero = max(amax / f32((qmax - 1) / 2), eps), (qmax + 1) // 2
    else:
        scale = max((hi - lo) / f32(qmax - qmin), eps)
        zero = int(min(max(qmin - np.round(lo / scale), qmin), qmax))
    codes = np.clip(np.round(block / scale) + zero, qmin, qmax)
    return codes, scale, zero


def _reference(x: np.ndarray, group: int, bits: int, signed: bool, symmetric: bool):
    """Codes and dequantized values of a 2-D x with blocks of (1, group), looping over blocks."""
    codes, x_hat = np.zeros_like(x), np.zeros_like(x)
    for row in range(x.shape[0]):
        for start in range(0, x.shape[1], group):
            cols = slice(start, start + group)
            q, scale, zero = _reference_block(x[row, cols], bits, signed, symmetric)
            codes[row, cols] = q
            x_hat[row, cols] = (q - np.float32(zero)) * scale
    return codes, x_hat


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["channel", 16])
def test_matches_reference_exactly(bits, signed, symmetric, granularity):
    torch.manual_seed(bits)
    x = torch.randn(4, 64) * torch.rand(4, 1) * 3 + 0.3  # rows with different ranges, slightly off-centre
    fmt = IntFormat(bits, signed)
    block_size = block_size_for(tuple(x.shape), granularity)
    scale, zero = choose_qparams_affine(x, block_size, fmt, symmetric)
    q = quantize_affine(x, block_size, scale, zero, fmt)
    x_hat = dequantize_affine(q, block_size, scale, zero)
    codes_ref, x_hat_ref = _reference(x.numpy(), block_size[1], bits, signed, symmetric)
    assert q.dtype == fmt.storage_dtype
    np.testing.assert_array_equal(q.numpy().astype(np.float32), codes_ref)
    np.testing.assert_array_equal(x_hat.numpy(), x_hat_ref)


def test_per_tensor_matches_reference_exactly():
    torch.manual_seed(1)
    x = torch.randn(1, 256)  # one row: per-tensor == one block of the whole row
    fmt = IntFormat(4, signed=False)
    x_hat = fake_quantize_affine(x, "tensor", fmt, symmetric=False)
    _, x_hat_ref = _reference(x.numpy(), 256, 4, False, False)
    np.testing.assert_array_equal(x_hat.numpy(), x_hat_ref)
    assert choose_qparams_affine(x, (1, 256), fmt, False)[0].shape == (1, 1)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_stay_in_range_and_error_is_half_a_step(bits, signed, symmetric):
    fmt = IntFormat(bits, signed)
    x = torch.linspace(-5.0, 5.0, 64).reshape(2, 32) * 1e3 + 700.0  # off-centre range, in one block
    scale, zero = choose_qparams_affine(x, (2, 32), fmt, symmetric)
    q = quantize_affine(x, (2, 32), scale, zero, fmt)
    x_hat = dequantize_affine(q, (2, 32), scale, zero)
    assert q.int().min().item() >= fmt.qmin and q.int().max().item() <= fmt.qmax
    # minmax never clips: every element, the range ends included, is within half a step
    assert (x - x_hat).abs().max().item() <= scale.item() * 0.5 * (1 + 1e-5)
    if symmetric:  # +amax lands exactly on the top code
        assert q.int().max().item() == fmt.qmax


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("offset", [0.0, 2.0, -2.0])  # straddling zero, all positive, all negative
def test_zero_is_exact_in_asymmetric_mode(signed, offset):
    torch.manual_seed(2)
    x = torch.randn(8, 64) + offset
    x[:, ::7] = 0.0
    for bits in (2, 3, 4, 8):
        x_hat = fake_quantize_affine(x, 16, IntFormat(bits, signed), symmetric=False)
        assert (x_hat[:, ::7] == 0).all()


def test_sqnr_on_seeded_normal():
    torch.manual_seed(0)
    x = torch.randn(256, 512)
    assert _sqnr(x, fake_quantize_affine(x, "tensor", IntFormat(8))) > 38.5  # 39.67
    assert _sqnr(x, fake_quantize_affine(x, "channel", IntFormat(8))) > 41.5  # 42.55
    assert _sqnr(x, fake_quantize_affine(x, "channel", IntFormat(4))) > 16.5  # 17.36
    assert _sqnr(x, fake_quantize_affine(x, 128, IntFormat(4))) > 17.5  # 18.59
    assert _sqnr(x, fake_quantize_affine(x, 128, IntFormat(4, False), symmetric=False)) > 19.0  # 19.93
    assert _sqnr(x, fake_quantize_affine(x, 32, IntFormat(2, False), symmetric=False)) > 7.0  # 7.81


@pytest.mark.parametrize("bits,granularity", [(4, "channel"), (4, 128), (3, "channel"), (3, 128)])
def test_mse_clipping_beats_minmax(bits, granularity):
    torch.manual_seed(0)
    x = torch.randn(256, 512)
    fmt = IntFormat(bits)
    minmax = _sqnr(x, fake_quantize_affine(x, granularity, fmt, clip="minmax"))
    mse = _sqnr(x, fake_quantize_affine(x, granularity, fmt, clip="mse"))
    gains = {(4, "channel"): 1.8, (4, 128): 1.1, (3, "channel"): 3.6, (3, 128): 2.6}
    # measured gains in dB: 4/channel 2.05, 4/g128 1.31, 3/channel 3.95, 3/g128 2.93
    assert mse - minmax > gains[(bits, granularity)]


def test_partial_last_group_has_its_own_range():
    """Group 100 on 512 inputs: groups of 100 and a last one of 12, with ceil(512 / 100) = 6 parameters a row,
    each exactly as if that group were quantized alone (as compressed-tensors stores a partial group)."""
    torch.manual_seed(0)
    x = torch.randn(4, 512)
    x[:, 500:] *= 10  # the partial group gets a range of its own, 10x wider
    fmt = IntFormat(4, signed=False)
    scale, zero = choose_qparams_affine(x, (1, 100), fmt, symmetric=False)
    assert scale.shape == zero.shape == (4, 6)
    alone_scale, alone_zero = choose_qparams_affine(x[:, 500:], (1, 12), fmt, symmetric=False)
    assert torch.equal(scale[:, 5:], alone_scale) and torch.equal(zero[:, 5:], alone_zero)
    codes = quantize_affine(x, (1, 100), scale, zero, fmt)
    back = dequantize_affine(codes, (1, 100), scale, zero)
    assert codes.shape == back.shape == x.shape
    step = scale.repeat_interleave(100, dim=1)[:, :512]
    assert ((back - x).abs() / step).max() <= 0.5 + 1e-5  # every element within half of its own group's step
    mse = choose_qparams_affine(x, (1, 100), fmt, symmetric=False, clip="mse")[0]
    assert mse.shape == (4, 6) and bool((mse <= scale + 1e-7).all())  # clipping only shrinks ranges


def test_block_that_does_not_divide_outside_affine_raises():
    from bitsmith.formats.affine import _blocked

    with pytest.raises(BitsmithError, match="block size 3 does not divide dimension 8"):
        _blocked(torch.randn(8, 4), (3, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(bad):
    x = torch.randn(4, 32)
    x[1, 3] = bad
    with pytest.raises(BitsmithError, match="NaN or infinite"):
        fake_quantize_affine(x, "channel", IntFormat(8))


def test_bad_arguments_raise():
    with pytest.raises(BitsmithError, match="2 to 8 bits, got 9"):
        IntFormat(9)
    with pytest.raises(BitsmithError, match="unknown granularity"):
        block_size_for((4, 4), "row")
    with pytest.raises(BitsmithError, match="unknown clipping"):
        choose_qparams_affine(torch.randn(4, 4), (1, 4), IntFormat(4), clip="percentile")


def test_dtype_is_kept_and_zeros_stay_zero():
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert fake_quantize_affine(x, 32, IntFormat(8)).dtype == torch.bfloat16
    zeros = torch.zeros(4, 64)
    assert torch.equal(fake_quantize_affine(zeros, "channel", IntFormat(4), symmetric=False), zeros)
