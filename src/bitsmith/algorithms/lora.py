"""LoRA's math (Hu et al., 2021): a frozen weight W plus a trainable low-rank update.

    W' = W + B A * alpha / rank          A: (rank, in_features), B: (out_features, rank)

A starts Kaiming-uniform and B at zero, so training starts from W exactly. Merging for deployment folds the
update into the float W (``merged_weight``), which is then quantized again like any float layer.
"""

from __future__ import annotations

import torch

__all__ = ["lora_scaling", "lora_update", "merged_weight"]


def lora_scaling(alpha: float, rank: int) -> float:
    return alpha / rank


def lora_update(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """B A * scaling, (out_features, in_features) float32."""
    return (b.float() @ a.float()) * scaling


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``weight`` with the adapters folded in, in ``weight``'s dtype."""
    return (weight.float() + lora_update(a, b, scaling)).to(weight.dtype)
