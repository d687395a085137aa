"""Quantized linear modules: each kernel path against a float reference, with measured SQNR."""

import pytest
import torch
from torch import nn

from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.nn import kernels
from bitsmith.nn.linear import HalfLinear, Int8DynamicLinear, Int8WeightOnlyLinear, IntxWeightOnlyLinear
from conftest import sqnr_db


@pytest.fixture
def linear():
    torch.manual_seed(0)
    layer = nn.Linear(256, 384)
    torch.manual_seed(1)  # the inputs each test draws next
    return layer


@pytest.mark.parametrize("rows", [1, 8, 300])  # both sides of WEIGHT_ONLY_MAX_M
def test_int8_weight_only_matches_float(linear, rows):
    x = torch.randn(rows, 256)
    module = Int8WeightOnlyLinear.from_quantized(quantize_weight_rtn(linear.weight, 8, "channel", True), linear.bias)
    assert sqnr_db(linear(x), module(x)) > 43.0  # 45.4 .. 46.0


@pytest.mark.parametrize("rows", [1, 8, 300])
def test_int4_group_weight_only_matches_dequantized_weight(linear, rows):
    x = torch.randn(rows, 256)
    qweight = quantize_weight_rtn(linear.weight, 4, 128, symmetric=False)
    module = IntxWeightOnlyLinear.from_quantized(qweight, linear.bias)
    assert module._uses_int4pack()
    # against the module's own dequantized weight the kernel adds only bf16 rounding
    exact = nn.functional.linear(x, module.dequantize(), linear.bias)
    assert sqnr_db(exact, module(x)) > 47.0  # 49.6 .. 51.0: bf16 activation rounding
    assert sqnr_db(linear(x), module(x)) > 21.0  # 23.1 .. 23.6: int4 g128 error


def test_int3_falls_back_to_dequantize_and_says_so(linear):
    module = IntxWeightOnlyLinear.from_quantized(quantize_weight_rtn(linear.weight, 3, 64, False), linear.bias)
    assert "no 3-bit kernel" in module.kernel()
    x = torch.randn(4, 256)
    assert sqnr_db(linear(x), module(x)) > 15.5  # 17.5


def test_w8a8_dynamic_matches_float_reference(linear):
    x = torch.randn(2, 700, 256)  # 1400 rows: several W8A8_CHUNK_ROWS chunks
    module = Int8DynamicLinear.from_quantized(quantize_weight_rtn(linear.weight, 8, "channel", True), linear.bias)
    assert module(x).shape == (2, 700, 384)
    assert sqnr_db(linear(x), module(x)) > 40.0  # 42.0


def test_w8a8_kernel_equals_integer_reference(linear):
    """The oneDNN path computes exactly sum(q_x * q_w) * s_x * s_w + b (up to fp32 rounding)."""
    if not kernels.onednn_int8_available():
        pytest.skip("oneDNN int8 not available on this CPU")
    x = torch.randn(37, 256)
    module = Int8DynamicLinear.from_quantized(quantize_weight_rtn(linear.weight, 8, "channel", True), linear.bias)
    codes, token_scale = kernels.quantize_per_token(x)
    q_x = codes.to(torch.int32) - 128
    reference = (q_x @ module.weight_codes.to(torch.int32).T).double() * token_scale.double() * module.weight_scale.T.double()
    reference = reference + linear.bias.double()
    assert torch.allclose(module(x).double(), reference, rtol=1e-5, atol=1e-5)


def test_per_token_codes_round_to_nearest():
    x = torch.tensor([[0.5, -1.0, 0.25], [3.0, 0.0, -1.5]])
    codes, scale = kernels.quantize_per_token(x)
    assert (codes.to(torch.int32) - 128).tolist() == [[64, -127, 32], [127, 0, -64]]
    assert torch.allclose(scale[:, 0], torch.tensor([1.0, 3.0]) / 127)


@pytest.mark.parametrize("dtype,threshold", [("bf16", 49.0), ("fp16", 72.0)])  # measured 51.1, 74.8
def test_half_linear(linear, dtype, threshold):
    x = torch.randn(16, 256)
    assert sqnr_db(linear(x), HalfLinear.from_float(linear, dtype)(x)) > threshold


def test_int8_symmetric_groups_go_through_the_generic_module(linear):
    """Signed 8-bit codes are shifted to unsigned storage with the zero point moved along."""
    qweight = quantize_weight_rtn(linear.weight, 8, 64, symmetric=True)
    module = IntxWeightOnlyLinear.from_quantized(qweight, linear.bias)
    assert module.weight_zero_point.unique().tolist() == [128]
    # half a step of rounding, plus the fp16 rounding of the stored scale: measured 0.555 of a step
    error = (module.dequantize() - linear.weight).abs() / qweight.scale.repeat_interleave(64, dim=1)
    assert error.max() < 0.6  # before the shift, wrapped negative codes gave errors of ~250 steps
