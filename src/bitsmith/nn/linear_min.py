"""Runtime module for group-wise codes with a float min per group, ``w = q * scale + min``: GGUF's Q4_1.

The min is any fp16 value, not a whole number of steps, so it cannot be ``IntxWeightOnlyLinear``'s integer zero
point; a module of its own keeps the file's codes, scales and mins exactly as they were.
"""

from __future__ import annotations

import torch

from bitsmith.formats.packing import packed_bytes, unpack_codes
from bitsmith.nn import kernels
from bitsmith.nn.kinds import tensor_problems
from bitsmith.nn.linear import _bf16_note, _QuantLinearBase

__all__ = ["IntxMinWeightOnlyLinear"]

_INT4PACK_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4pack kernel takes


class IntxMinWeightOnlyLinear(_QuantLinearBase):
    """2- to 8-bit unsigned codes in groups of ``group_size`` along K: ``weight_packed`` uint8 (``pack_codes``),
    ``weight_scale`` and ``weight_min`` (N, K / group_size) fp16. Runs on torch's int4pack kernel (the min folded
    into its per-group offset) for codes of 4 bits or fewer, and dequantized otherwise."""

    family = "w4a16"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, bits: int, group_size: int):
        super().__init__(in_features, out_features, has_bias)
        if in_features % group_size:
            raise ValueError(f"groups of {group_size} do not divide in_features {in_features}")
        self.bits, self.group_size = bits, group_size
        self.scheme = f"w{bits}a16 g{group_size} min"
        groups = in_features // group_size
        numel = out_features * in_features
        self.register_buffer("weight_packed", torch.zeros(packed_bytes(numel, bits), dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("weight_min", torch.zeros(out_features, groups, dtype=torch.float16))
        self._int4pack: tuple[torch.Tensor, torch.Tensor] | None = None
        self._int4pack_failed = False
        if bits > 4:
            self.family = "wxa16"

    def _load_from_state_dict(self, *args, **kwargs):
        self._int4pack, self._int4pack_failed = None, False
        super()._load_from_state_dict(*args, **kwargs)

    def codes(self) -> torch.Tensor:
        """Unpacked codes, (N, K) uint8."""
        numel = self.out_features * self.in_features
        return unpack_codes(self.weight_packed, self.bits, numel).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # q * scale + min in float32, in the order of GGUF's own dequantizers: the same bits as theirs
        grouped = self.codes().float().reshape(self.out_features, -1, self.group_size)  # (N, G, group_size)
        weight = grouped * self.weight_scale.float()[..., None] + self.weight_min.float()[..., None]
        return weight.reshape(self.out_features, self.in_features).to(dtype)

    def _uses_int4pack(self) -> bool:
        if self.bits > 4 or self.group_size not in _INT4PACK_GROUPS or self._int4pack_failed:
            return False
        if self._int4pack is None:
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
            except RuntimeError:  # a shape the kernel does not take (N not a multiple of 16): dequantize instead
                self._int4pack_failed = True
                return False
            scale = self.weight_scale.float()
            offset = 8 * scale + self.weight_min.float()  # the kernel computes (q - 8) * s + offset = q * s + min
            scales_and_offsets = torch.stack([scale.t(), offset.t()], dim=-1)  # (G, N, 2)
            self._int4pack = packed, scales_and_offsets.to(torch.bfloat16).contiguous()
        return True

    def candidates(self, x):
        found = {}
        if self._uses_int4pack():
            packed, scales_and_offsets = self._int4pack
            found["int4pack-bf16"] = lambda: kernels.int4pack_bf16(
                x, packed, self.group_size, scales_and_offsets, self.in_features, self.bias)
        found["dequant-bf16"] = lambda: kernels.matmul_bf16(x, self.dequantize(torch.bfloat16), self.bias)
        found["dequant-fp32"] = lambda: kernels.matmul_fp32(x, self.dequantize(), self.bias)
        return found

    def kernel_why(self) -> str:
        if self._uses_int4pack():
            return f"the min folded into int4pack's per-group offset; {_bf16_note()}"
        return f"no int4pack for {self.bits}-bit codes in groups of {self.group_size} here: dequantized per call"

    def storage_problem(self) -> str | None:
        # GGUF's Q4_1 d = (max - min) / 15 is zero for a constant group: a zero scale is valid here
        return tensor_problems(self, nonnegative=("weight_scale",), finite=("weight_min", "bias"))

    def layer_info(self) -> dict:
        return {**super().layer_info(), "bits": self.bits, "group_size": self.group_size}
