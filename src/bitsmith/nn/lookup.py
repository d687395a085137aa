"""Runtime modules for weight formats that are not integer grids: fp8 e4m3, NF4 and MXFP4 weight-only.

No CPU kernel here computes on these codes (torch's CPU fp8 GEMM takes fp8 activations too, and nothing takes
NF4 or e2m1 codes), so every call dequantizes the weight and runs the bf16 (or fp32) matmul: they save
storage, not time, and ``kernel_why`` says so. Ternary weights need no module of their own: {-1, 0, +1} times
a scale is a 2-bit grid with zero point 1, stored and run by ``IntxWeightOnlyLinear`` (int4pack kernel).

    module                  | buffers                                                   | scale blocks
    Fp8WeightOnlyLinear     | weight (N, K) float8_e4m3fn, weight_scale (N, G) fp32     | K / G inputs
    LookupWeightOnlyLinear  | weight_packed (N * K / 2) uint8, two 4-bit codes a byte;  | group_size inputs
                            | weight_scale (N, K / group) fp32 absmax (nf4) or uint8    |
                            | E8M0 exponent (mxfp4)                                     |
                            | nf4-dq: weight_scale int8 codes of the absmax, less their |
                            | mean (weight_scale_offset), weight_scale_scale fp32 per   |
                            | 256 of them (QLoRA's double quantization)                 |
"""

from __future__ import annotations

import torch

from bitsmith.formats.floats import (dequantize_absmax_double, dequantize_mxfp4, dequantize_nf4, quantize_fp8,
                                    quantize_mxfp4, quantize_nf4, quantize_nf4_double)
from bitsmith.formats.packing import pack_codes, packed_bytes, unpack_codes
from bitsmith.nn import kernels
from bitsmith.nn.kinds import tensor_problems
from bitsmith.nn.linear import _bf16_note, _QuantLinearBase

__all__ = ["Fp8WeightOnlyLinear", "LookupWeightOnlyLinear"]

_ABSMAX_BLOCK = 256  # nf4-dq: absmax values sharing one second-level scale (QLoRA's)
_NO_KERNEL = "no CPU kernel computes on {} codes: dequantized per call (storage saving, no speed-up); {}"


def _dequant_candidates(module, x: torch.Tensor) -> dict:
    return {
        "dequant-bf16": lambda: kernels.matmul_bf16(x, module.dequantize(torch.bfloat16), module.bias),
        "dequant-fp32": lambda: kernels.matmul_fp32(x, module.dequantize(), module.bias),
    }


class Fp8WeightOnlyLinear(_QuantLinearBase):
    """fp8 e4m3 weight with an fp32 scale per channel (group_size = K) or per group of inputs."""

    family = "fp8-a16"
    bits = 8

    def __init__(self, in_features: int, out_features: int, has_bias: bool, group_size: int):
        super().__init__(in_features, out_features, has_bias)
        self.group_size = group_size
        self.scheme = "fp8 e4m3 a16" + ("" if group_size == in_features else f" g{group_size}")
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size))

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, group_size: int) -> "Fp8WeightOnlyLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        codes, scale = quantize_fp8(linear.weight.detach(), "e4m3", (1, group_size))
        module.weight.copy_(codes)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        groups = self.weight.to(torch.float32).reshape(self.out_features, -1, self.group_size)
        return (groups * self.weight_scale.unsqueeze(-1)).reshape(self.out_features, self.in_features).to(dtype)

    def candidates(self, x):
        return _dequant_candidates(self, x)

    def kernel_why(self) -> str:
        return _NO_KERNEL.format("fp8 weight-only", _bf16_note())

    def storage_problem(self) -> str | None:
        weight = self.weight.float()
        if not torch.isfinite(weight).all():
            return "weight holds NaN or infinite fp8 codes"
        return tensor_problems(self, positive=("weight_scale",), finite=("bias",))

    def layer_info(self) -> dict:
        return {**super().layer_info(), "group_size": self.group_size}


class LookupWeightOnlyLinear(_QuantLinearBase):
    """4-bit codes into a fixed table of 16 values (``nf4``: QLoRA's NormalFloat levels times the group's
    absmax; ``mxfp4``: e2m1 values times the group's power of two), packed two a byte."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, has_bias: bool, fmt: str, group_size: int):
        super().__init__(in_features, out_features, has_bias)
        self.fmt, self.group_size = fmt, group_size
        self.family = f"{fmt}-a16"
        self.scheme = f"{fmt} g{group_size} a16"
        groups = in_features // group_size
        scale_dtype = {"mxfp4": torch.uint8, "nf4-dq": torch.int8}.get(fmt, torch.float32)
        self.register_buffer("weight_packed", torch.zeros(packed_bytes(out_features * in_features, 4), dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=scale_dtype))
        if fmt == "nf4-dq":
            blocks = -(-out_features * groups // _ABSMAX_BLOCK)
            self.register_buffer("weight_scale_scale", torch.ones(blocks))
            self.register_buffer("weight_scale_offset", torch.zeros(1))

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, fmt: str, group_size: int) -> "LookupWeightOnlyLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, group_size)
        weight = linear.weight.detach()
        if fmt == "nf4-dq":
            codes, scale, second, offset = quantize_nf4_double(weight, group_size, _ABSMAX_BLOCK)
            module.weight_scale_scale.copy_(second)
            module.weight_scale_offset.copy_(offset)
        else:
            codes, scale = quantize_mxfp4(weight, group_size) if fmt == "mxfp4" else quantize_nf4(weight, group_size)
        module.weight_packed.copy_(pack_codes(codes.flatten(), 4))
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def codes(self) -> torch.Tensor:
        numel = self.out_features * self.in_features
        return unpack_codes(self.weight_packed, 4, numel).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.fmt == "mxfp4":
            return dequantize_mxfp4(self.codes(), self.weight_scale, self.group_size, dtype)
        return dequantize_nf4(self.codes(), self.absmax(), self.group_size, dtype)

    def absmax(self) -> torch.Tensor:
        """nf4's absmax per group (N, K / group_size), float32 (double-quantized ones dequantized)."""
        if self.fmt == "nf4-dq":
            return dequantize_absmax_double(self.weight_scale, self.weight_scale_scale, self.weight_scale_offset,
                                            _ABSMAX_BLOCK)
        return self.weight_scale

    def candidates(self, x):
        return _dequant_candidates(self, x)

    def kernel_why(self) -> str:
        return _NO_KERNEL.format(self.fmt, _bf16_note())

    def storage_problem(self) -> str | None:
        if self.fmt == "mxfp4":  # exponents: any byte but 255 (E8M0's NaN) is a power of two
            if self.weight_scale.numel() and int(self.weight_scale.max()) == 255:
                return "weight_scale holds E8M0 NaN exponents (255)"
            return tensor_problems(self, finite=("bias",))
        if self.fmt == "nf4-dq":
            if self.weight_scale.numel() and int(self.weight_scale.min()) < -127:
                return "weight_scale holds -128, outside double quantization's [-127, 127]"
            return tensor_problems(self, finite=("bias", "weight_scale_offset"), nonnegative=("weight_scale_scale",))
        scale = self.weight_scale
        if not torch.isfinite(scale).all() or (scale < 0).any():
            return "weight_scale holds NaN, infinite or negative absmax values"
        return tensor_problems(self, finite=("bias",))

    def layer_info(self) -> dict:
        return {**super().layer_info(), "format": self.fmt, "group_size": self.group_size}
