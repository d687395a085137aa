"""Static W8A8 modules: int8 per-channel weights, uint8 activations with a calibrated per-tensor range.

The input is quantized with the fixed ``input_scale`` / ``input_zero_point`` (fused native loop, or
eager ops without a compiler), then oneDNN runs the int8 GEMM / convolution with the bias and an
optional fused ReLU inside, writing fp32. Without oneDNN the same math runs in fp32 on dequantized
tensors, and ``kernel()`` says so.
"""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.nn import kernels, native

__all__ = ["StaticInt8Linear", "StaticInt8Conv2d"]


def _quantize_input(x: torch.Tensor, scale: float, zero: int, smooth: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 codes of x; ``smooth`` (K,) multiplies the last dimension first (explicit SmoothQuant scale)."""
    x = x.float()
    if smooth is not None:
        multiplier = smooth.float() / scale
        if native.available():
            return native.quantize_static_channel_u8(x.contiguous(), multiplier, zero)
        return torch.clamp(torch.round(x * multiplier) + zero, 0, 255).to(torch.uint8)
    if native.available():
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        return native.quantize_static_u8(x, scale, zero)
    return torch.clamp(torch.round(x / scale) + zero, 0, 255).to(torch.uint8)


class _StaticBase(nn.Module):
    scheme = "w8a8-static"

    def _init_storage(self, weight_shape: tuple[int, ...], has_bias: bool, fused_relu: bool) -> None:
        out_channels = weight_shape[0]
        self.register_buffer("weight_codes", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels, 1))
        self.register_buffer("bias", torch.zeros(out_channels) if has_bias else None)
        self.register_buffer("input_scale", torch.ones(1))
        self.register_buffer("input_zero_point", torch.zeros(1, dtype=torch.int32))
        self.fused_relu = fused_relu
        self._packed = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def set_weight(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight_codes.copy_(codes)
        self.weight_scale.copy_(scale.reshape(-1, 1))
        if bias is not None:
            self.bias.copy_(bias.detach())
        self._packed = None

    def set_input_range(self, scale: float, zero_point: int) -> None:
        self.input_scale.fill_(scale)
        self.input_zero_point.fill_(zero_point)
        self._packed = None

    def dequantized_weight(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.weight_codes.dim() - 1)
        return self.weight_codes.float() * self.weight_scale.reshape(shape)

    def _fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.input_scale.item(), int(self.input_zero_point.item())
        return (_quantize_input(x, scale, zero, getattr(self, "input_smooth", None)).float() - zero) * scale

    def _post(self) -> str:
        return "relu" if self.fused_relu else "none"

    def kernel(self) -> str:
        if not kernels.onednn_int8_available():
            return "fallback: fp32 on dequantized weight and fake-quantized input (oneDNN int8 not available)"
        how = "fused native" if native.available() else "eager torch"
        if getattr(self, "input_smooth", None) is not None:
            how += " with per-channel smoothing"
        relu = " + fused ReLU" if self.fused_relu else ""
        return f"oneDNN {self._op} u8 x s8{relu}; static input quantization: {how}"


class StaticInt8Linear(_StaticBase):
    _op = "qlinear"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, fused_relu: bool = False,
                 smooth: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), has_bias, fused_relu)
        # explicit SmoothQuant: the input is multiplied by this (1 / s) per channel inside the quantization
        # step, where no previous operation could absorb it (e.g. a post-LayerNorm that is also the residual)
        self.register_buffer("input_smooth", torch.ones(in_features) if smooth else None)

    def set_input_smooth(self, inverse_scale: torch.Tensor) -> None:
        if self.input_smooth is None:
            self.register_buffer("input_smooth", torch.ones(self.in_features))
        self.input_smooth.copy_(inverse_scale.reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        if not kernels.onednn_int8_available():
            out = nn.functional.linear(self._fake_quant_input(x2), self.dequantized_weight(), self.bias)
            out = torch.relu(out) if self.fused_relu else out
            return out.reshape(*shape[:-1], self.out_features)
        if self._packed is None:
            self._packed = kernels.prepack_int8_weight(self.weight_codes)
        scale, zero = self.input_scale.item(), int(self.input_zero_point.item())
        codes = _quantize_input(x2, scale, zero, self.input_smooth)
        out = torch.ops.onednn.qlinear_pointwise(
            codes, scale, zero, self._packed, self.weight_scale[:, 0].contiguous(),
            torch.zeros(self.out_features, dtype=torch.long), self.bias, 1.0, 0, torch.float32, self._post(), [None], "",
        )
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def layer_info(self) -> dict:
        return {
            "module": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
            "has_bias": self.bias is not None, "fused_relu": self.fused_relu,
            "input_smooth": self.input_smooth is not None,
        }


class StaticInt8Conv2d(_StaticBase):
    _op = "qconv2d"

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, has_bias,
                 fused_relu: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_storage(shape, has_bias, fused_relu)

    @classmethod
    def like(cls, conv: nn.Conv2d, fused_relu: bool = False) -> "StaticInt8Conv2d":
        if isinstance(conv.padding, str):
            raise ValueError("string padding")
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.bias is not None, fused_relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not kernels.onednn_int8_available():
            out = nn.functional.conv2d(self._fake_quant_input(x), self.dequantized_weight(), self.bias,
                                       self.stride, self.padding, self.dilation, self.groups)
            return torch.relu(out) if self.fused_relu else out
        scale, zero = self.input_scale.item(), int(self.input_zero_point.item())
        if self._packed is None:
            self._packed = torch.ops.onednn.qconv_prepack(
                self.weight_codes, self.weight_scale[:, 0].contiguous(), scale, zero, list(self.stride),
                list(self.padding), list(self.dilation), self.groups, None,
            )
        codes = _quantize_input(x.contiguous(memory_format=torch.channels_last), scale, zero)
        return torch.ops.onednn.qconv2d_pointwise(
            codes, scale, zero, self._packed, self.weight_scale[:, 0].contiguous(),
            torch.zeros(self.out_channels, dtype=torch.long), self.bias, list(self.stride), list(self.padding),
            list(self.dilation), self.groups, 1.0, 0, torch.float32, self._post(), [], "",
        )

    def layer_info(self) -> dict:
        return {
            "module": type(self).__name__, "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
            "dilation": list(self.dilation), "groups": self.groups, "has_bias": self.bias is not None,
            "fused_relu": self.fused_relu,
        }
