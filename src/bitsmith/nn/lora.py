"""LoRA on a frozen layer: ``y = base(x) + dropout(x) A^T B^T * scaling`` (QLoRA when ``base`` is low-bit).

    attribute      | what
    base           | the frozen layer: any of bitsmith's runtime linears (NF4, int4, ...) or an nn.Linear
    lora_A         | (rank, in_features) Parameter, Kaiming-uniform at the start (peft's init)
    lora_B         | (out_features, rank) Parameter, zero at the start: the layer starts as ``base`` exactly
    lora_scaling   | buffer (1,): alpha / rank

The base computes on its own kernels; when the input needs a gradient it dequantizes (``_FrozenLinear``,
nn/linear.py). The adapters' keys, ``<layer>.lora_A.weight`` in peft's files, are ``<layer>.lora_A`` here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bitsmith.algorithms.lora import lora_update

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    family = "lora"

    def __init__(self, base: nn.Module, rank: int, scaling: float = 1.0, dropout: float = 0.0,
                 in_features: int | None = None, out_features: int | None = None):
        super().__init__()
        self.base = base
        self.in_features = in_features if in_features is not None else base.in_features
        self.out_features = out_features if out_features is not None else base.out_features
        self.rank, self.dropout = rank, dropout
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        self.register_buffer("lora_scaling", torch.tensor([float(scaling)]))
        self.scheme = f"{getattr(base, 'scheme', 'fp32')} + lora r{rank}"

    @property
    def bits(self) -> int:
        return getattr(self.base, "bits", 16)

    def reset_adapters_(self, generator: torch.Generator | None = None) -> None:
        """peft's start: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero."""
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on (rank, in_features)
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
            self.lora_B.zero_()

    def delta(self) -> torch.Tensor:
        """The adapters' update of the weight, (out_features, in_features) float32: B A * scaling."""
        return lora_update(self.lora_A, self.lora_B, float(self.lora_scaling))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = x.to(self.lora_A.dtype)
        if self.training and self.dropout > 0 and torch.is_grad_enabled():  # training steps only, not evaluation
            h = nn.functional.dropout(h, self.dropout)
        return out + ((h @ self.lora_A.t()) @ self.lora_B.t() * self.lora_scaling).to(out.dtype)

    def kernel(self) -> str:
        inner = self.base.kernel() if hasattr(self.base, "kernel") else "torch linear"
        return f"{inner}; + rank-{self.rank} fp32 adapters"

    def kernel_why(self) -> str:
        return self.base.kernel_why() if hasattr(self.base, "kernel_why") else ""

    def storage_problem(self) -> str | None:
        for name in ("lora_A", "lora_B", "lora_scaling"):
            if not torch.isfinite(getattr(self, name)).all():
                return f"{name} holds NaN or infinite values"
        problem = getattr(self.base, "storage_problem", lambda: None)()
        return None if problem is None else f"base: {problem}"

    def layer_info(self) -> dict:
        return {"module": "LoRALinear", "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "base": self.base.layer_info()}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={float(self.lora_scaling):g}, dropout={self.dropout:g}"
