"""Runtime module that replaces ``nn.Embedding`` with integer rows and one scale per row or per group of a row."""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.algorithms.rtn import QuantizedWeight
from bitsmith.formats.affine import fp16_scales
from bitsmith.formats.packing import pack_codes, packed_bytes, unpack_codes
from bitsmith.nn.kinds import tensor_problems

__all__ = ["QuantizedEmbedding", "HalfEmbedding"]


class QuantizedEmbedding(nn.Module):
    """Rows of ``bits``-bit codes with a scale and zero point per row, or per ``group_size`` values of a row:
    ``row[g] = (q[g] - zero[g]) * scale[g]``.

    8-bit codes stay unpacked at run time (a gather of int8 rows, then one multiply per looked-up
    row); narrower codes are packed in ``weight_packed`` and unpacked once, at first use.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, padding_idx: int | None = None,
                 group_size: int | None = None):
        super().__init__()
        group_size = group_size or embedding_dim
        if embedding_dim % group_size:
            raise ValueError(f"groups of {group_size} do not divide the embedding's {embedding_dim} values per row")
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        self.padding_idx, self.group_size = padding_idx, group_size
        numel = num_embeddings * embedding_dim
        groups = embedding_dim // group_size
        if bits == 8:
            self.register_buffer("weight_codes", torch.zeros(num_embeddings, embedding_dim, dtype=torch.uint8))
        else:
            self.register_buffer("weight_packed", torch.zeros(packed_bytes(numel, bits), dtype=torch.uint8))
        # one fp32 scale per row; per group, fp16 scales as the grouped int4 Linears keep them (half their bytes)
        self.register_buffer("weight_scale", torch.ones(num_embeddings, groups,
                                                        dtype=torch.float32 if groups == 1 else torch.float16))
        self.register_buffer("weight_zero_point", torch.zeros(num_embeddings, groups, dtype=torch.uint8))
        self._codes_cache: torch.Tensor | None = None
        self.scheme = f"int{bits} per-row" if groups == 1 else f"int{bits} g{group_size}"

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, padding_idx: int | None) -> "QuantizedEmbedding":
        rows, dim = qweight.codes.shape
        module = cls(rows, dim, qweight.fmt.bits, padding_idx, qweight.group_size)
        # signed symmetric codes are shifted to unsigned with the zero point moved along
        offset = 2 ** (qweight.fmt.bits - 1) if qweight.fmt.signed else 0
        codes = (qweight.codes.to(torch.int16) + offset).to(torch.uint8)
        if qweight.fmt.bits == 8:
            module.weight_codes.copy_(codes)
        else:
            module.weight_packed.copy_(pack_codes(codes.flatten(), qweight.fmt.bits))
        scale = qweight.scale if module.weight_scale.dtype == torch.float32 else fp16_scales(qweight.scale)
        module.weight_scale.copy_(scale)
        module.weight_zero_point.copy_((qweight.zero_point + offset).to(torch.uint8))
        return module

    def _load_from_state_dict(self, *args, **kwargs):
        self._codes_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def codes(self) -> torch.Tensor:
        if self.bits == 8:
            return self.weight_codes
        if self._codes_cache is None:
            numel = self.num_embeddings * self.embedding_dim
            codes = unpack_codes(self.weight_packed, self.bits, numel)
            self._codes_cache = codes.reshape(self.num_embeddings, self.embedding_dim)
        return self._codes_cache

    def _grouped(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """(..., D) codes with their (..., G) scales and zero points as (..., D) floats."""
        groups = codes.shape[:-1] + (scale.shape[-1], self.group_size)
        rows = (codes.reshape(groups).float() - zero.float().unsqueeze(-1)).mul_(scale.float().unsqueeze(-1))
        return rows.reshape(codes.shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.codes())  # (..., D) uint8
        scale = nn.functional.embedding(ids, self.weight_scale)  # (..., G)
        zero = nn.functional.embedding(ids, self.weight_zero_point)  # (..., G)
        return self._grouped(rows, scale, zero)

    def dequantize(self) -> torch.Tensor:
        return self._grouped(self.codes(), self.weight_scale, self.weight_zero_point)

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads embeddings' .weight (e.g. for dtype or tied heads): hand it a float copy
        return self.dequantize()

    def kernel(self) -> str:
        per = "per-row" if self.group_size == self.embedding_dim else f"per-{self.group_size}"
        return f"int{self.bits} row gather + {per} scale (no float table kept)"

    def storage_problem(self) -> str | None:
        # finite, not positive: llama.cpp's blocks (a GGUF import) may have negative or zero scales
        return tensor_problems(self, finite=("weight_scale",), codes={"weight_zero_point": 2**self.bits - 1})

    def kernel_why(self) -> str:
        return "a lookup: no matmul to choose"

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"

    def layer_info(self) -> dict:
        return {
            "module": type(self).__name__,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "bits": self.bits,
            "padding_idx": self.padding_idx,
            "group_size": self.group_size,
        }


class HalfEmbedding(nn.Module):
    """fp16 / bf16 table; looked-up rows are returned in fp32."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str = "bf16", padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype_name = num_embeddings, embedding_dim, dtype
        self.padding_idx = padding_idx
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch_dtype))
        self.scheme = dtype

    @classmethod
    def from_float(cls, embedding: nn.Embedding, dtype: str) -> "HalfEmbedding":
        module = cls(embedding.num_embeddings, embedding.embedding_dim, dtype, embedding.padding_idx)
        module.weight.copy_(embedding.weight.detach())
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).float()

    def kernel(self) -> str:
        return f"{self.dtype_name} row gather"

    def storage_problem(self) -> str | None:
        return tensor_problems(self, finite=("weight",))

    def kernel_why(self) -> str:
        return "a lookup: no matmul to choose"

    def layer_info(self) -> dict:
        return {
            "module": type(self).__name__,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "dtype": self.dtype_name,
            "padding_idx": self.padding_idx,
        }
