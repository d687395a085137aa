"""Static int8 modules against a fake-quantized float reference (same rounding, fp32 math)."""

import pytest
import torch
from torch import nn

from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.nn.static import StaticInt8Conv2d, StaticInt8Linear
from conftest import sqnr_db


def _reference(module, x, op):
    scale, zero = module.input_scale.item(), int(module.input_zero_point.item())
    x_q = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
    out = op(x_q, module.dequantized_weight(), module.bias)
    return torch.relu(out) if module.fused_relu else out


@pytest.mark.parametrize("fused_relu", [False, True])
def test_static_conv_matches_fake_quant_reference(fused_relu):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=1, padding=1)
    module = StaticInt8Conv2d.like(conv, fused_relu=fused_relu)
    q = quantize_weight_rtn(conv.weight.detach().flatten(1), 8, "channel", True)
    module.set_weight(q.codes.reshape(conv.weight.shape), q.scale, conv.bias)
    module.set_input_range(9.0 / 255, 128)  # covers randn to 4.5 sigma
    x = torch.randn(2, 8, 12, 12)
    op = lambda a, w, b: nn.functional.conv2d(a, w, b, padding=1)  # noqa: E731
    assert torch.allclose(module(x), _reference(module, x, op), atol=1e-4)
    assert sqnr_db(torch.relu(conv(x)) if fused_relu else conv(x), module(x)) > 37.0  # 39.1 / 38.9


def test_static_linear_on_3d_input():
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    module = StaticInt8Linear(32, 24, True)
    q = quantize_weight_rtn(linear.weight.detach(), 8, "channel", True)
    module.set_weight(q.codes, q.scale, linear.bias)
    module.set_input_range(6.0 / 255, 128)
    x = torch.randn(3, 5, 32)
    assert module(x).shape == (3, 5, 24)
    assert torch.allclose(module(x), _reference(module, x, nn.functional.linear), atol=1e-4)


@pytest.mark.parametrize("native_on", [True, False])
def test_static_linear_with_explicit_smoothing(monkeypatch, native_on):
    """input_smooth multiplies each input channel inside the quantization step (SmoothQuant where no
    previous operation can absorb the scale); native loop and eager ops give the same codes."""
    from bitsmith.nn import module_from_info, native

    if not native_on:
        monkeypatch.setattr(native, "available", lambda: False)
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    s = torch.rand(32) * 4 + 0.25
    module = StaticInt8Linear(32, 24, True)
    q = quantize_weight_rtn(linear.weight.detach() * s, 8, "channel", True)
    module.set_weight(q.codes, q.scale, linear.bias)
    x = torch.randn(3, 5, 32)
    module.set_input_range(2 * (x / s).abs().max().item() / 255, 128)  # the calibrated range of x / s
    module.set_input_smooth(1.0 / s)
    assert module.layer_info()["input_smooth"] and "smoothing" in module.kernel()
    expected = _reference(module, x / s, nn.functional.linear)
    assert torch.allclose(module(x), expected, atol=1e-4)
    assert sqnr_db(linear(x), module(x)) > 30.0
    rebuilt = module_from_info(module.layer_info())
    rebuilt.load_state_dict(module.state_dict())
    assert torch.equal(rebuilt(x), module(x))
