"""Runtime modules that replace ``nn.Linear`` and call the kernels in ``kernels.py``.

Each module keeps its *storage* tensors as persistent buffers (what ``bitsmith.save`` writes, packed
to the bits of the scheme) and builds any kernel-specific layout (oneDNN prepack, torch int4pack)
as a non-persistent cache. ``layer_info()`` describes the module so that ``from_info`` can rebuild an
empty one of the same shape at load time.

Every module offers the kernels that compute its scheme on this machine (``candidates``) and runs the one
``dispatch.choose`` measured fastest for the batch shape; ``kernel()`` says which can run and why,
``last_kernel`` which ran last.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bitsmith.algorithms.rtn import QuantizedWeight
from bitsmith.formats.affine import dequantize_affine, fp16_scales
from bitsmith.formats.packing import pack_codes, packed_bytes, unpack_codes
from bitsmith.nn import cpu, dispatch, kernels, native
from bitsmith.nn.kinds import tensor_problems

__all__ = ["HalfLinear", "Int8WeightOnlyLinear", "Int8DynamicLinear", "IntxWeightOnlyLinear", "KERNEL_NAMES"]

# what each candidate name means, for inspect and reports
KERNEL_NAMES = {
    "onednn-u8s8": "oneDNN qlinear, uint8 x int8 summed in int32",
    "onednn-u8s8-split": "oneDNN qlinear on split codes [p | q] x [W | W] (exact without VNNI, twice the inner size)",
    "fp32-dequant": "fp32 matmul on integer codes, scales applied after (exact W8A8 math, no int8 speed-up)",
    "int8pack-bf16": "torch _weight_int8pack_mm, bf16 activations",
    "int4pack-bf16": "torch _weight_int4pack_mm_for_cpu, bf16 activations",
    "dequant-bf16": "dequantize to bf16 per call + bf16 matmul",
    "dequant-fp32": "dequantize to fp32 per call + fp32 matmul",
    "bf16": "bf16 matmul",
    "fp16": "fp16 matmul",
    "upcast-fp32": "upcast the 16-bit weight to fp32 per call + fp32 matmul (storage saving only)",
}


def _bf16_note() -> str:
    bf16 = cpu.bf16_compute()
    return f"bf16 here: {bf16}"


class _QuantLinearBase(nn.Module):
    scheme: str
    family: str

    def __init__(self, in_features: int, out_features: int, has_bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)
        self.last_kernel: tuple[str, int] | None = None  # (candidate, rows) of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            # training through a frozen quantized layer (LoRA on it, or layers before it): its output needs a
            # gradient for x; the low-bit kernels have none, so the weight is dequantized, in backward too
            return _FrozenLinear.apply(x, self)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K) with M = prod(leading dims)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        candidates = self.candidates(x2)
        key = f"K={self.in_features} N={self.out_features} M<={dispatch.row_bucket(x2.shape[0])}"
        name = dispatch.choose(self.family, key, candidates)
        self.last_kernel = (name, x2.shape[0])
        out = candidates[name]()
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def float_weight(self) -> torch.Tensor:
        """The weight as float32 (N, K): what training through this layer multiplies by."""
        if hasattr(self, "dequantize"):
            return self.dequantize().float()
        return self.weight.float()

    def candidates(self, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
        """Kernel name -> a call computing this layer on ``x`` (M, K) float32, in preference order."""
        raise NotImplementedError

    def kernel_names(self, rows: int = 1) -> list[str]:
        """The kernels that can run this layer here on ``rows`` rows of input (some serve only a few rows)."""
        return list(self.candidates(torch.zeros(rows, self.in_features)))

    def kernel(self) -> str:
        """Which kernels can run this layer here, chosen how, and (after a forward) which one ran."""
        names = self.kernel_names()
        text = names[0] if len(names) == 1 else "fastest measured per batch shape of " + " | ".join(names)
        if self.last_kernel is not None:
            text += f"; ran {self.last_kernel[0]} at M={self.last_kernel[1]}"
        return text

    def kernel_why(self) -> str:
        return ""

    def storage_problem(self) -> str | None:
        """What is wrong with the loaded tensors (NaN, zero scales, codes out of range), or None."""
        return tensor_problems(self, finite=("bias",))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"

    def layer_info(self) -> dict:
        return {
            "module": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "has_bias": self.bias is not None,
        }


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with the gradient for x only (the layer is frozen), W dequantized again in backward rather
    than kept: memory holds the codes, never a float copy of every layer (bitsandbytes' 4-bit matmul does the same)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "_QuantLinearBase") -> torch.Tensor:
        ctx.module = module
        weight = module.float_weight()
        out = torch.nn.functional.linear(x.float(), weight, None if module.bias is None else module.bias.float())
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.module.float_weight()
        return (grad.float() @ weight).to(grad.dtype), None


class HalfLinear(_QuantLinearBase):
    """fp16 or bf16 weight. bf16 computes in bf16 where that is fast (AVX512-BF16, AMX) and on the fp32
    upcast otherwise; fp16 computes on the fp32 upcast unless the CPU has fp16 arithmetic."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool, dtype: str = "bf16"):
        super().__init__(in_features, out_features, has_bias)
        self.dtype_name = dtype
        self.family = dtype  # bf16 and fp16 have different candidates: one's decision is not the other's
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

    def candidates(self, x):
        found = {}
        if self.dtype_name == "bf16":
            found["bf16"] = lambda: kernels.matmul_bf16(x, self.weight, self.bias)
        elif cpu.cpu_flags() & {"avx512_fp16", "amx_fp16"}:
            found["fp16"] = lambda: kernels.add_bias(
                nn.functional.linear(x.half(), self.weight).float(), self.bias)
        found["upcast-fp32"] = lambda: kernels.matmul_fp32(x, self.weight, self.bias)
        return found

    def kernel_why(self) -> str:
        return _bf16_note() if self.dtype_name == "bf16" else "no fp16 GEMM without AVX512-FP16/AMX-FP16"

    def storage_problem(self) -> str | None:
        return tensor_problems(self, finite=("weight", "bias"))

    def layer_info(self) -> dict:
        return {**super().layer_info(), "dtype": self.dtype_name}


class _Int8Linear(_QuantLinearBase):
    """Symmetric int8 per-channel weight: ``weight_codes`` (N, K) int8, ``weight_scale`` (N, 1) fp32."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool):
        super().__init__(in_features, out_features, has_bias)
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, 1))
        self._cache: dict[str, object] = {}

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}  # the weight may change: rebuild kernel layouts on next call
        super()._load_from_state_dict(*args, **kwargs)

    def _cached(self, name: str, build):
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None):
        if not qweight.fmt.signed:
            raise ValueError("int8 linear modules take signed symmetric codes (8 bits, or fewer held as int8)")
        out_features, in_features = qweight.codes.shape
        module = cls(in_features, out_features, bias is not None)
        module.weight_codes.copy_(qweight.codes)
        module.weight_scale.copy_(qweight.scale.expand(out_features, 1))
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    def dequantize(self) -> torch.Tensor:
        return self.weight_codes.float() * self.weight_scale

    def storage_problem(self) -> str | None:
        return tensor_problems(self, positive=("weight_scale",), finite=("bias",))


class Int8WeightOnlyLinear(_Int8Linear):
    scheme = "w8a16"
    family = "w8a16"

    def candidates(self, x):
        scale = self._cached("scale", lambda: self.weight_scale[:, 0].contiguous())
        scale_bf16 = self._cached("scale_bf16", lambda: scale.to(torch.bfloat16))
        return {
            "int8pack-bf16": lambda: kernels.int8pack_bf16(x, self.weight_codes, scale_bf16, self.bias),
            "dequant-bf16": lambda: kernels.matmul_bf16(
                x, self.weight_codes.to(torch.bfloat16).mul_(scale_bf16[:, None]), self.bias),
            "dequant-fp32": lambda: kernels.matmul_fp32(x, self.dequantize(), self.bias),
        }

    def kernel_why(self) -> str:
        return _bf16_note()


class Int8DynamicLinear(_Int8Linear):
    """W8A8 dynamic: activations quantized per token to int8 at run time."""

    scheme = "w8a8-dynamic"
    family = "w8a8-dynamic"

    def candidates(self, x):
        scale = self._cached("scale", lambda: self.weight_scale[:, 0].contiguous())
        found = {}
        if cpu.onednn_int8_exact("linear"):
            packed = self._cached("packed", lambda: kernels.prepack_int8_weight(self.weight_codes))
            found["onednn-u8s8"] = lambda: kernels.dynamic_onednn(x, packed, scale, self.bias, self.out_features)
        elif cpu.onednn_int8_available():
            split = self._cached("packed_split", lambda: kernels.prepack_split_weight(self.weight_codes))
            if split is not None:
                found["onednn-u8s8-split"] = lambda: kernels.dynamic_split(x, split, scale, self.bias)
        found["fp32-dequant"] = lambda: kernels.dynamic_fp32(x, self.weight_codes, scale, self.bias)
        return found

    def kernel_why(self) -> str:
        quantizer = "fused native loop" if native.available() else f"eager torch ops (native: {native.status()})"
        return f"{cpu.int8_reason('linear')}; per-token activation quantization: {quantizer}"


class IntxWeightOnlyLinear(_QuantLinearBase):
    """2- to 8-bit group-wise weight, stored packed: ``weight_packed`` uint8 (``pack_codes`` bit stream),
    ``weight_scale`` (N, G) fp16, ``weight_zero_point`` (N, G) uint8 with ``w = (q - zero) * scale`` and
    G = ceil(K / group_size) (a last group shorter than the others is allowed). Codes of 4 bits or fewer
    run on torch's int4pack kernel (2- and 3-bit codes widened to 4 bits: exact) where its layout takes
    the shape; every width can run dequantized."""

    family = "w4a16"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, bits: int, group_size: int):
        super().__init__(in_features, out_features, has_bias)
        self.bits, self.group_size = bits, group_size
        self.scheme = f"w{bits}a16 g{group_size}"
        groups = -(-in_features // group_size)
        packed_numel = packed_bytes(out_features * in_features, bits)
        self.register_buffer("weight_packed", torch.zeros(packed_numel, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.uint8))
        self._int4pack: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._int4pack_failed = False
        self._scale_fp32: torch.Tensor | None = None  # native int4 kernel's scales
        if bits > 4:
            self.family = "wxa16"

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None):
        out_features, in_features = qweight.codes.shape
        module = cls(in_features, out_features, bias is not None, qweight.fmt.bits, qweight.group_size)
        # stored unsigned: signed codes (8-bit symmetric) move up by 2^(bits-1), their zero point with them
        offset = 2 ** (qweight.fmt.bits - 1) if qweight.fmt.signed else 0
        codes = (qweight.codes.to(torch.int16) + offset).to(torch.uint8)
        module.weight_packed.copy_(pack_codes(codes.flatten(), qweight.fmt.bits))
        module.weight_scale.copy_(fp16_scales(qweight.scale).expand_as(module.weight_scale))
        module.weight_zero_point.copy_((qweight.zero_point + offset).expand_as(module.weight_zero_point))
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    def _load_from_state_dict(self, *args, **kwargs):
        self._int4pack, self._int4pack_failed, self._scale_fp32 = None, False, None
        super()._load_from_state_dict(*args, **kwargs)

    def codes(self) -> torch.Tensor:
        """Unpacked codes, (N, K) uint8."""
        numel = self.out_features * self.in_features
        return unpack_codes(self.weight_packed, self.bits, numel).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if native.available():
            weight = native.dequantize_packed(self.weight_packed, self.bits, self.out_features, self.in_features,
                                              self.group_size, self.weight_scale, self.weight_zero_point)
            return weight.to(dtype)
        zero = self.weight_zero_point.to(torch.int32)
        return dequantize_affine(self.codes(), (1, self.group_size), self.weight_scale.float(), zero, dtype)

    def _runtime_int4pack(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        if self._int4pack is None and not self._int4pack_failed:
            try:
                self._int4pack = _to_int4pack(self.codes(), self.weight_scale, self.weight_zero_point,
                                              self.group_size)
            except RuntimeError:  # a shape the kernel does not take (N not a multiple of 16): dequantize instead
                self._int4pack_failed = True
        return self._int4pack

    def _uses_int4pack(self) -> bool:
        return self.bits <= 4 and self.group_size in (32, 64, 128, 256) and self._runtime_int4pack() is not None

    def _native_int4(self, rows: int) -> bool:
        """bitsmith's own kernel reads the packed 4-bit codes directly: decoding's few rows, whole bytes a group."""
        return (native.available() and self.bits == 4 and rows <= native.INT4_MAX_ROWS
                and self.in_features % 2 == 0 and self.group_size % 2 == 0)

    def candidates(self, x):
        found = {}
        if self._uses_int4pack():
            packed, scales_and_zeros, padded_k = self._int4pack
            found["int4pack-bf16"] = lambda: kernels.int4pack_bf16(
                x, packed, self.group_size, scales_and_zeros, padded_k, self.bias)
        if self._native_int4(x.shape[0]):
            if self._scale_fp32 is None:
                self._scale_fp32 = self.weight_scale.float().contiguous()
            found["native-int4"] = lambda: native.int4_matmul(
                x, self.weight_packed, self.out_features, self.group_size, self._scale_fp32,
                self.weight_zero_point.contiguous(), self.bias)
        found["dequant-bf16"] = lambda: kernels.matmul_bf16(x, self.dequantize(torch.bfloat16), self.bias)
        found["dequant-fp32"] = lambda: kernels.matmul_fp32(x, self.dequantize(), self.bias)
        return found

    def kernel_why(self) -> str:
        native_note = (f"; at most {native.INT4_MAX_ROWS} rows (decoding): also bitsmith's native int4 kernel, fp32"
                       " activations, reading the packed codes") if self._native_int4(1) else ""
        if self._uses_int4pack():
            widened = f"{self.bits}-bit codes widened to int4; " if self.bits < 4 else ""
            return f"{widened}{_bf16_note()}{native_note}"
        if self.bits > 4:
            return f"no {self.bits}-bit kernel: dequantized per call; {_bf16_note()}"
        return (f"int4pack does not take this shape (N={self.out_features}, group {self.group_size}): dequantized per"
                f" call{native_note}")

    def storage_problem(self) -> str | None:
        # finite, not positive: llama.cpp's Q4_0 quantizer gives a block d = max / -8, negative when its extreme
        # is positive, and 0 for a block of zeros; an imported file keeps them (w = (q - 8) * d either way)
        return tensor_problems(self, finite=("weight_scale", "bias"),
                               codes={"weight_zero_point": 2**self.bits - 1})

    def layer_info(self) -> dict:
        return {**super().layer_info(), "bits": self.bits, "group_size": self.group_size}


def _to_int4pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 group_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """torch's CPU int4 layout, K padded with zero codes to a whole number of groups. Its dequant is
    ``(q - 8) * s + z_float``, so ``z_float = (8 - zero) * s``. Codes of 2 or 3 bits are moved up by
    ``8 - zero`` per group (they stay within 0..15): their zero point becomes 8 and z_float exactly 0, so
    the kernel's bf16 z_float adds no rounding."""
    out_features, in_features = codes.shape
    padded_k = -(-in_features // group_size) * group_size
    codes = codes.to(torch.int32)
    zero = zero.to(torch.int32)
    if int(codes.max()) < 8 and int(zero.max()) < 8:  # narrow codes: centre every group on 8
        shift = (8 - zero).repeat_interleave(group_size, dim=1)[:, :in_features]  # (N, K)
        codes, zero = codes + shift, torch.full_like(zero, 8)
    if padded_k != in_features:
        codes = torch.nn.functional.pad(codes, (0, padded_k - in_features), value=8)  # 8 - 8 = 0 either way
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale_f = scale.float()
    zero_f = (8.0 - zero.float()) * scale_f
    scales_and_zeros = torch.stack([scale_f.t(), zero_f.t()], dim=-1)  # (G, N, 2)
    return packed, scales_and_zeros.to(torch.bfloat16).contiguous(), padded_k
