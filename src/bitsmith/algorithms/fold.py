"""BatchNorm folding: a convolution followed by BatchNorm in eval mode is one convolution.

    w' = w * gamma / sqrt(var + eps)            (per output channel)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta
"""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.algorithms._modules import assign_, replace_module

__all__ = ["fold_bn_weights", "fold_batchnorm_", "sequential_pairs"]


def fold_bn_weights(
    weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
    gamma: torch.Tensor, beta: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded (weight, bias); weight is (out, ...) and the BN statistics are (out,)."""
    factor = gamma / torch.sqrt(var + eps)  # (out,)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    bias = torch.zeros_like(mean) if bias is None else bias
    return weight * factor.reshape(shape), (bias - mean) * factor + beta


def sequential_pairs(model: nn.Module, first: tuple[type, ...], second: tuple[type, ...]):
    """(parent, index, name_a, a, b) for consecutive children a, b of every nn.Sequential in ``model``."""
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for index in range(len(children) - 1):
            (name_a, a), (_, b) = children[index], children[index + 1]
            if isinstance(a, first) and isinstance(b, second):
                full = f"{parent_name}.{name_a}" if parent_name else name_a
                yield parent, index, full, a, b


def fold_batchnorm_(model: nn.Module) -> list[str]:
    """Fold every Conv2d -> BatchNorm2d pair of consecutive Sequential children (BN becomes Identity).
    Returns the names of the convolutions that absorbed a BatchNorm."""
    folded = []
    for parent, index, name, conv, bn in list(sequential_pairs(model, (nn.Conv2d,), (nn.BatchNorm2d,))):
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        with torch.no_grad():
            weight, bias = fold_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var,
                bn.weight if bn.affine else torch.ones_like(bn.running_mean),
                bn.bias if bn.affine else torch.zeros_like(bn.running_mean), bn.eps,
            )
            assign_(conv, "weight", weight)
            assign_(conv, "bias", bias.to(weight.dtype))
        replace_module(parent, list(parent._modules)[index + 1], nn.Identity())
        folded.append(name)
    return folded
