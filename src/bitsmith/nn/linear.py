"""Runtime modules that replace ``nn.Linear`` and call the kernels in ``kernels.py``.

Each module keeps its *storage* tensors as persistent buffers (what ``bitsmith.save`` writes, packed
to the bits of the scheme) and builds any kernel-specific layout (oneDNN prepack, torch int4pack)
as a non-persistent cache. ``layer_info()`` describes the module so that ``from_info`` can rebuild an
empty one of the same shape at load time.
"""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.algorithms.rtn import QuantizedWeight
from bitsmith.formats.affine import dequantize_affine
from bitsmith.formats.packing import pack_codes, unpack_codes
from bitsmith.nn import kernels, native

__all__ = ["HalfLinear", "Int8WeightOnlyLinear", "Int8DynamicLinear", "IntxWeightOnlyLinear"]


class _QuantLinearBase(nn.Module):
    scheme: str

    def __init__(self, in_features: int, out_features: int, has_bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self._linear(x.reshape(-1, shape[-1]))  # (M, N) with M = prod(leading dims)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"

    def layer_info(self) -> dict:
        return {
            "module": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "has_bias": self.bias is not None,
        }


class HalfLinear(_QuantLinearBase):
    """fp16 or bf16 weight. bf16 computes in bf16 (AMX); fp16 has no fast CPU GEMM here, so it
    computes in fp32 on the upcast weight (storage savings only)."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool, dtype: str = "bf16"):
        super().__init__(in_features, out_features, has_bias)
        self.dtype_name = dtype
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch_dtype))
        self.scheme = dtype

    @classmethod
    def from_float(cls, linear: nn.Linear, dtype: str) -> "HalfLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype)
        module.weight.copy_(linear.weight.detach())
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype_name == "bf16":
            return kernels.dequantized_bf16_linear(x, self.weight, self.bias)
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)

    def kernel(self) -> str:
        if self.dtype_name == "bf16":
            return "bf16 matmul (oneDNN, AMX-bf16 where present)"
        return "fp16 storage, upcast to fp32 matmul (no fast fp16 GEMM on CPU)"

    def layer_info(self) -> dict:
        return {**super().layer_info(), "dtype": self.dtype_name}


class _Int8Linear(_QuantLinearBase):
    """Symmetric int8 per-channel weight: ``weight_codes`` (N, K) int8, ``weight_scale`` (N, 1) fp32."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool):
        super().__init__(in_features, out_features, has_bias)
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, 1))

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None):
        if not qweight.fmt.signed or qweight.fmt.bits != 8:
            raise ValueError("int8 linear modules take signed symmetric 8-bit codes")
        out_features, in_features = qweight.codes.shape
        module = cls(in_features, out_features, bias is not None)
        module.weight_codes.copy_(qweight.codes)
        module.weight_scale.copy_(qweight.scale.expand(out_features, 1))
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    def dequantize(self) -> torch.Tensor:
        return self.weight_codes.float() * self.weight_scale


class Int8WeightOnlyLinear(_Int8Linear):
    scheme = "w8a16"

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_weight_only_linear(x, self.weight_codes, self.weight_scale[:, 0], self.bias)

    def kernel(self) -> str:
        return (
            f"_weight_int8pack_mm, bf16 activations (M <= {kernels.WEIGHT_ONLY_MAX_M}); "
            "int8 -> bf16 dequant + bf16 matmul above"
        )


class Int8DynamicLinear(_Int8Linear):
    """W8A8 dynamic: activations quantized per token to int8 at run time."""

    scheme = "w8a8-dynamic"

    def __init__(self, in_features: int, out_features: int, has_bias: bool):
        super().__init__(in_features, out_features, has_bias)
        self._packed: torch.Tensor | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # the weight may change: rebuild the prepacked copy on next call
        super()._load_from_state_dict(*args, **kwargs)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if not kernels.onednn_int8_available():
            # no int8 GEMM reachable on this CPU: exact same math in fp32 (reported by kernel())
            return nn.functional.linear(_fake_quant_per_token(x), self.dequantize(), self.bias)
        if self._packed is None:
            self._packed = kernels.prepack_int8_weight(self.weight_codes)
        scale = self.weight_scale[:, 0].contiguous()
        return kernels.int8_dynamic_linear(x, self._packed, scale, self.bias, self.out_features).to(x.dtype)

    def kernel(self) -> str:
        if kernels.onednn_int8_available():
            how = "fused native" if native.available() else "eager torch (no C compiler: slower)"
            return f"oneDNN qlinear int8 x int8 (AMX/VNNI); per-token activation quantization: {how}"
        return "fallback: fp32 matmul on dequantized weight (oneDNN int8 not available)"


def _fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    codes, scale = kernels.quantize_per_token(x.float())
    return (codes.float() - 128.0) * scale


class IntxWeightOnlyLinear(_QuantLinearBase):
    """2- to 8-bit group-wise weight, stored packed: ``weight_packed`` uint8, ``weight_scale`` (N, G) fp16,
    ``weight_zero_point`` (N, G) uint8 with ``w = (q - zero) * scale``. 4-bit with a group size the
    int4pack kernel accepts runs on ``_weight_int4pack_mm_for_cpu``; other widths dequantize (said by kernel())."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool, bits: int, group_size: int):
        super().__init__(in_features, out_features, has_bias)
        self.bits, self.group_size = bits, group_size
        self.scheme = f"w{bits}a16 g{group_size}"
        groups = in_features // group_size
        packed_numel = -(-(out_features * in_features * bits) // 8)
        self.register_buffer("weight_packed", torch.zeros(packed_numel, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.uint8))
        self._int4pack: tuple[torch.Tensor, torch.Tensor] | None = None
        self._int4pack_failed = False

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None):
        out_features, in_features = qweight.codes.shape
        module = cls(in_features, out_features, bias is not None, qweight.fmt.bits, qweight.group_size)
        # stored unsigned: signed codes (8-bit symmetric) move up by 2^(bits-1), their zero point with them
        offset = 2 ** (qweight.fmt.bits - 1) if qweight.fmt.signed else 0
        codes = (qweight.codes.to(torch.int16) + offset).to(torch.uint8)
        module.weight_packed.copy_(pack_codes(codes.flatten(), qweight.fmt.bits))
        module.weight_scale.copy_(qweight.scale.expand_as(module.weight_scale))
        module.weight_zero_point.copy_((qweight.zero_point + offset).expand_as(module.weight_zero_point))
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    def _load_from_state_dict(self, *args, **kwargs):
        self._int4pack, self._int4pack_failed = None, False
        super()._load_from_state_dict(*args, **kwargs)

    def codes(self) -> torch.Tensor:
        """Unpacked codes, (N, K) uint8."""
        numel = self.out_features * self.in_features
        return unpack_codes(self.weight_packed, self.bits, numel).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        block = (1, self.group_size)
        zero = self.weight_zero_point.to(torch.int32)
        return dequantize_affine(self.codes(), block, self.weight_scale.float(), zero, dtype)

    def _runtime_int4pack(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._int4pack is None and not self._int4pack_failed:
            try:
                self._int4pack = _to_int4pack(self.codes(), self.weight_scale, self.weight_zero_point)
            except RuntimeError:  # shape the kernel does not take: dequantize instead
                self._int4pack_failed = True
        return self._int4pack

    def _uses_int4pack(self) -> bool:
        return self.bits == 4 and self.group_size in (32, 64, 128, 256) and self._runtime_int4pack() is not None

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self._uses_int4pack():
            packed, scales_and_zeros = self._int4pack
            return kernels.int4_weight_only_linear(
                x, packed, self.group_size, scales_and_zeros, lambda: self.dequantize(torch.bfloat16), self.bias
            )
        return kernels.dequantized_bf16_linear(x, self.dequantize(torch.bfloat16), self.bias)

    def kernel(self) -> str:
        if self._uses_int4pack():
            return (
                f"_weight_int4pack_mm_for_cpu, bf16 activations (M <= {kernels.WEIGHT_ONLY_MAX_M}); "
                "int4 -> bf16 dequant + bf16 matmul above"
            )
        return f"no {self.bits}-bit kernel: dequantize to bf16 + bf16 matmul"

    def layer_info(self) -> dict:
        return {**super().layer_info(), "bits": self.bits, "group_size": self.group_size}


def _to_int4pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU int4 layout. Its dequant is ``(q - 8) * s + z_float``, so ``z_float = (8 - zero) * s``."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    scale_f = scale.float()
    zero_f = (8.0 - zero.float()) * scale_f
    scales_and_zeros = torch.stack([scale_f.t(), zero_f.t()], dim=-1)  # (G, N, 2)
    return packed, scales_and_zeros.to(torch.bfloat16).contiguous()
