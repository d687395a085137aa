"""Static int8 modules: every kernel they offer here against a fake-quantized float reference (same rounding,
fp32 math), with even and odd zero points (the split path's two cases) and grouped convolutions."""

import pytest
import torch
from torch import nn

from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.nn import cpu
from bitsmith.nn.static import StaticInt8Conv2d, StaticInt8Linear
from conftest import each_kernel, sqnr_db


@pytest.fixture(params=[False, True], ids=["auto", "forced-exact"])
def int8_path(request, monkeypatch):
    """Each test runs once as this machine chooses and once with the no-VNNI exact path forced."""
    if request.param:
        monkeypatch.setenv("BITSMITH_INT8", "exact")
    return request.param


def _reference(module, x, op):
    scale, zero = module.input_scale.item(), int(module.input_zero_point.item())
    x_q = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
    out = op(x_q, module.dequantized_weight(), module.bias)
    return torch.relu(out) if module.fused_relu else out


def _check_split_offered(outputs, forced):
    if cpu.onednn_int8_available():
        one_pass = cpu.onednn_int8_exact() and not forced
        assert ("onednn-u8s8" if one_pass else "onednn-u8s8-split") in outputs


@pytest.mark.parametrize("fused_relu", [False, True])
@pytest.mark.parametrize("groups,zero", [(1, 128), (1, 127), (2, 131)])
def test_static_conv_every_kernel_matches_fake_quant_reference(fused_relu, groups, zero, int8_path, monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=1, padding=1, groups=groups)
    module = StaticInt8Conv2d.like(conv, fused_relu=fused_relu)
    q = quantize_weight_rtn(conv.weight.detach().flatten(1), 8, "channel", True)
    module.set_weight(q.codes.reshape(conv.weight.shape), q.scale, conv.bias)
    module.set_input_range(9.0 / 255, zero)  # covers randn to about 4.5 sigma
    x = torch.randn(2, 8, 12, 12)
    op = lambda a, w, b: nn.functional.conv2d(a, w, b, padding=1, groups=groups)  # noqa: E731
    outputs = each_kernel(module, x, monkeypatch)
    _check_split_offered(outputs, int8_path)
    reference = _reference(module, x, op)
    for name, out in outputs.items():
        assert torch.allclose(out, reference, atol=1e-4), name
    if groups == 1 and zero == 128:
        assert sqnr_db(torch.relu(conv(x)) if fused_relu else conv(x), outputs["fp32-dequant"]) > 37.0  # 39.1 / 38.9


@pytest.mark.parametrize("zero", [128, 61])
def test_static_linear_on_3d_input(zero, int8_path, monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    module = StaticInt8Linear(32, 24, True, fused_relu=zero == 61)
    q = quantize_weight_rtn(linear.weight.detach(), 8, "channel", True)
    module.set_weight(q.codes, q.scale, linear.bias)
    module.set_input_range(6.0 / 255, zero)
    x = torch.randn(3, 5, 32)
    outputs = each_kernel(module, x, monkeypatch)
    _check_split_offered(outputs, int8_path)
    for name, out in outputs.items():
        assert out.shape == (3, 5, 24)
        assert torch.allclose(out, _reference(module, x, nn.functional.linear), atol=1e-4), name


@pytest.mark.parametrize("native_on", [True, False])
def test_static_linear_with_explicit_smoothing(monkeypatch, native_on, int8_path):
    """input_smooth multiplies each input channel inside the quantization step (SmoothQuant where no
    previous operation can absorb the scale); native loop and eager ops, every kernel, the same result."""
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
    assert module.layer_info()["input_smooth"] and "smoothing" in module.kernel_why()
    expected = _reference(module, x / s, nn.functional.linear)
    outputs = each_kernel(module, x, monkeypatch)
    for name, out in outputs.items():
        assert torch.allclose(out, expected, atol=1e-4), name
    assert sqnr_db(linear(x), outputs["fp32-dequant"]) > 30.0
    rebuilt = module_from_info(module.layer_info())
    rebuilt.load_state_dict(module.state_dict(), assign=True)  # module_from_info builds on the meta device
    assert torch.equal(rebuilt(x), module(x))


def test_kernel_why_names_the_activation_format():
    module = StaticInt8Linear(32, 24, True)
    assert "uint8 activations with a calibrated zero point" in module.kernel_why()
    assert cpu.int8_dot_product() in module.kernel_why() or "BITSMITH_INT8" in module.kernel_why() \
        or "no oneDNN int8" in module.kernel_why()
