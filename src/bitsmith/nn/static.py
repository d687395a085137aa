"""Static W8A8 modules: int8 per-channel weights, uint8 activations with a calibrated per-tensor range
(scale and zero point: asymmetric).

The input is quantized with the fixed ``input_scale`` / ``input_zero_point`` (fused native loop, or eager ops
without a compiler), then oneDNN runs the int8 GEMM / convolution with the bias and an optional fused ReLU
inside, writing fp32. Where oneDNN's one-pass products are not exact (no VNNI) the codes are split in two
(``kernels.split_codes``) against a doubled weight; the same math also runs in fp32 on the dequantized tensors.
The fastest exact one for the shape runs (``dispatch.choose``); ``kernel()`` says which.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bitsmith.nn import cpu, dispatch, kernels, native
from bitsmith.nn.kinds import tensor_problems

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


def _quantize_input_split(x2: torch.Tensor, scale: float, zero: int, block: int,
                          smooth: torch.Tensor | None = None) -> torch.Tensor:
    """Split codes (M, 2K) of the rows of x2 (M, K), [p | q] per run of ``block`` columns, zero point (zero + 1) // 2."""
    x2 = x2.float().contiguous()
    if native.available():
        multiplier = None if smooth is None else smooth.float() / scale
        return native.quantize_static_split_u8(x2, scale, zero, block, multiplier)
    return kernels.split_codes(_quantize_input(x2, scale, zero, smooth), zero, block)


class _StaticBase(nn.Module):
    scheme = "w8a8-static"
    family: str
    _op: str

    def _init_storage(self, weight_shape: tuple[int, ...], has_bias: bool, fused_relu: bool) -> None:
        out_channels = weight_shape[0]
        self.register_buffer("weight_codes", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels, 1))
        self.register_buffer("bias", torch.zeros(out_channels) if has_bias else None)
        self.register_buffer("input_scale", torch.ones(1))
        self.register_buffer("input_zero_point", torch.zeros(1, dtype=torch.int32))
        self.fused_relu = fused_relu
        self._cache: dict[str, object] = {}
        self.last_kernel: tuple[str, int] | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def _cached(self, name: str, build):
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    def set_weight(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight_codes.copy_(codes)
        self.weight_scale.copy_(scale.reshape(-1, 1))
        if bias is not None:
            self.bias.copy_(bias.detach())
        self._cache = {}

    def set_input_range(self, scale: float, zero_point: int) -> None:
        self.input_scale.fill_(scale)
        self.input_zero_point.fill_(zero_point)
        self._cache = {}

    def _input_qparams(self) -> tuple[float, int]:
        return self._cached("qparams", lambda: (self.input_scale.item(), int(self.input_zero_point.item())))

    def _weight_scale(self) -> torch.Tensor:
        return self._cached("weight_scale", lambda: self.weight_scale[:, 0].contiguous())

    def dequantized_weight(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.weight_codes.dim() - 1)
        return self.weight_codes.float() * self.weight_scale.reshape(shape)

    def _fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self._input_qparams()
        return (_quantize_input(x, scale, zero, getattr(self, "input_smooth", None)).float() - zero) * scale

    def _post(self) -> str:
        return "relu" if self.fused_relu else "none"

    def _run(self, candidates: dict[str, Callable[[], torch.Tensor]], key: str, rows: int) -> torch.Tensor:
        name = dispatch.choose(self.family, key, candidates)
        self.last_kernel = (name, rows)
        return candidates[name]()

    def kernel(self) -> str:
        names = self.kernel_names()
        text = "fastest measured per batch shape of " + " | ".join(names) if len(names) > 1 else names[0]
        relu = " (+ fused ReLU)" if self.fused_relu else ""
        if self.last_kernel is not None:
            text += f"; ran {self.last_kernel[0]} at {self.last_kernel[1]} rows"
        return text + relu

    def storage_problem(self) -> str | None:
        return tensor_problems(self, positive=("weight_scale", "input_scale", "input_smooth"), finite=("bias",),
                               codes={"input_zero_point": 255})

    def kernel_why(self) -> str:
        how = "fused native" if native.available() else f"eager torch (native: {native.status()})"
        if getattr(self, "input_smooth", None) is not None:
            how += " with per-channel smoothing"
        return f"{cpu.int8_reason(self._op)}; uint8 activations with a calibrated zero point, quantized by {how}"


class StaticInt8Linear(_StaticBase):
    _op = "linear"
    family = "w8a8-static"

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
        self._cache = {}

    def candidates(self, x2: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
        scale, zero = self._input_qparams()
        w_scale, post = self._weight_scale(), self._post()
        found = {}
        if cpu.onednn_int8_exact("linear"):
            packed = self._cached("packed", lambda: kernels.prepack_int8_weight(self.weight_codes))
            found["onednn-u8s8"] = lambda: kernels.qlinear(
                _quantize_input(x2, scale, zero, self.input_smooth), scale, zero, packed, w_scale, self.bias, post)
        elif cpu.onednn_int8_available():
            split = self._cached("packed_split", lambda: kernels.prepack_split_weight(self.weight_codes))
            if split is not None:
                found["onednn-u8s8-split"] = lambda: kernels.qlinear(
                    _quantize_input_split(x2, scale, zero, self.in_features, self.input_smooth), scale, (zero + 1) // 2,
                    split, w_scale, self.bias, post)
        found["fp32-dequant"] = lambda: self._fp32(x2)
        return found

    def _fp32(self, x2: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(self._fake_quant_input(x2), self.dequantized_weight(), self.bias)
        return torch.relu_(out) if self.fused_relu else out

    def kernel_names(self, rows: int = 1) -> list[str]:
        return list(self.candidates(torch.zeros(rows, self.in_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()  # (M, K)
        key = f"K={self.in_features} N={self.out_features} M<={dispatch.row_bucket(x2.shape[0])}"
        out = self._run(self.candidates(x2), key, x2.shape[0])
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def layer_info(self) -> dict:
        return {
            "module": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
            "has_bias": self.bias is not None, "fused_relu": self.fused_relu,
            "input_smooth": self.input_smooth is not None,
        }


class StaticInt8Conv2d(_StaticBase):
    _op = "conv"
    family = "w8a8-static-conv"

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

    def _conv_args(self) -> list:
        return [list(self.stride), list(self.padding), list(self.dilation), self.groups]

    def _qconv(self, codes: torch.Tensor, scale: float, zero: int, packed) -> torch.Tensor:
        zeros = torch.zeros(self.out_channels, dtype=torch.long)
        return torch.ops.onednn.qconv2d_pointwise(
            codes, scale, zero, packed, self._weight_scale(), zeros, self.bias, *self._conv_args(), 1.0, 0,
            torch.float32, self._post(), [], "",
        )

    def _prepack(self, weight: torch.Tensor, scale: float, zero: int):
        return torch.ops.onednn.qconv_prepack(weight, self._weight_scale(), scale, zero, *self._conv_args(), None)

    def _split(self, x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
        """Split codes of x (B, C, H, W) as a channels-last (B, 2C, H, W) tensor, [p | q] inside each group."""
        batch, channels, height, width = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # (B*H*W, C) in channels-last order
        codes = _quantize_input_split(rows, scale, zero, channels // self.groups)  # (B*H*W, 2C)
        return codes.view(batch, height, width, 2 * channels).permute(0, 3, 1, 2)

    def candidates(self, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
        scale, zero = self._input_qparams()
        found = {}
        if cpu.onednn_int8_exact("conv"):
            packed = self._cached("packed", lambda: self._prepack(self.weight_codes, scale, zero))
            found["onednn-u8s8"] = lambda: self._qconv(
                _quantize_input(x.contiguous(memory_format=torch.channels_last), scale, zero), scale, zero, packed)
        elif cpu.onednn_int8_available() and not bool((self.weight_codes == -128).any()):
            doubled = lambda: torch.cat([self.weight_codes, self.weight_codes], dim=1)  # noqa: E731  [W_g | W_g]
            packed = self._cached("packed_split", lambda: self._prepack(doubled(), scale, (zero + 1) // 2))
            found["onednn-u8s8-split"] = lambda: self._qconv(self._split(x, scale, zero), scale, (zero + 1) // 2, packed)
        found["fp32-dequant"] = lambda: self._fp32(x)
        return found

    def _fp32(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.conv2d(self._fake_quant_input(x), self.dequantized_weight(), self.bias,
                                   self.stride, self.padding, self.dilation, self.groups)
        return torch.relu_(out) if self.fused_relu else out

    def kernel_names(self, rows: int = 1) -> list[str]:
        """(``rows``: a convolution's kernels do not depend on the batch shape)"""
        return list(self.candidates(torch.zeros(1, self.in_channels, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        shape = "x".join(map(str, self.kernel_size))
        key = (f"C={self.in_channels} O={self.out_channels} k={shape} s={self.stride[0]} g={self.groups} "
               f"HW={height}x{width} B<={dispatch.row_bucket(batch)}")
        return self._run(self.candidates(x.float()), key, batch * height * width)

    def layer_info(self) -> dict:
        return {
            "module": type(self).__name__, "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
            "dilation": list(self.dilation), "groups": self.groups, "has_bias": self.bias is not None,
            "fused_relu": self.fused_relu,
        }
