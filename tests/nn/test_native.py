"""The fused native per-token quantization agrees with the eager torch reference."""

import pytest
import torch

from bitsmith.nn import kernels, native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler to build the native kernels")


@pytest.mark.parametrize("rows,cols", [(1, 7), (37, 384), (600, 1536)])
def test_quantize_per_token_matches_eager(rows, cols):
    torch.manual_seed(0)
    x = torch.randn(rows, cols) * 5
    codes, scale = native.quantize_per_token_u8(x)
    ref_codes, ref_scale = kernels.quantize_per_token(x)
    assert torch.equal(scale, ref_scale)
    # both round half to even; they may differ by one code only where x * 127 / amax lands on a tie
    diff = (codes.to(torch.int16) - ref_codes.to(torch.int16)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_zero_rows_and_extremes():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]])
    codes, scale = native.quantize_per_token_u8(x)
    assert codes.tolist() == [[128, 128, 128], [255, 1, 192]]
    assert scale[0, 0] > 0  # floored, never a division by zero


@pytest.mark.parametrize("with_bias", [True, False])
def test_scale_rows_add_bias(with_bias):
    out = torch.randn(50, 33)
    scale, bias = torch.rand(50, 1), torch.randn(33) if with_bias else None
    expected = out * scale + (bias if with_bias else 0)
    assert torch.allclose(native.scale_rows_add_bias(out.clone(), scale, bias), expected, atol=1e-6)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("BITSMITH_NATIVE", "0")
    native._library.cache_clear()
    try:
        assert not native.available()
    finally:
        monkeypatch.delenv("BITSMITH_NATIVE")
        native._library.cache_clear()
    assert native.available()
