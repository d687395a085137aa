"""Cross-layer equalization (Nagel et al., 2019) for consecutive convolutions.

A positive per-channel scale commutes with ReLU and max/avg pooling, so channel i of the first layer
can be divided by s_i and the matching input channel of the second multiplied by s_i without changing
the function. ``s_i = sqrt(r1_i / r2_i)`` makes both layers' per-channel ranges equal to
``sqrt(r1_i * r2_i)``, which helps per-tensor (and per-channel) weight quantization.
"""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.algorithms._modules import assign_

__all__ = ["equalization_scales", "equalize_pair_", "cross_layer_equalize_"]

_TRANSPARENT = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity)


def equalization_scales(weight1: torch.Tensor, weight2: torch.Tensor) -> torch.Tensor:
    """s (C,) for weight1 (C, ...) producing channels that weight2 (O, C, ...) consumes."""
    r1 = weight1.abs().reshape(weight1.shape[0], -1).amax(1)  # (C,)
    r2 = weight2.abs().transpose(0, 1).reshape(weight2.shape[1], -1).amax(1)  # (C,)
    scale = torch.sqrt(r1 / r2.clamp(min=1e-12))
    return torch.where((r1 > 0) & (r2 > 0), scale, torch.ones_like(scale))


def equalize_pair_(conv1: nn.Conv2d, conv2: nn.Conv2d) -> None:
    with torch.no_grad():
        scale = equalization_scales(conv1.weight, conv2.weight)
        assign_(conv1, "weight", conv1.weight / scale.reshape(-1, 1, 1, 1))
        if conv1.bias is not None:
            assign_(conv1, "bias", conv1.bias / scale)
        assign_(conv2, "weight", conv2.weight * scale.reshape(1, -1, 1, 1))


def cross_layer_equalize_(model: nn.Module) -> list[tuple[str, str]]:
    """Equalize each pair of group-1 Conv2d in a Sequential separated only by ReLU / pooling / Identity."""
    pairs = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for i, (name1, first) in enumerate(children):
            if not isinstance(first, nn.Conv2d) or first.groups != 1:
                continue
            j = i + 1
            while j < len(children) and isinstance(children[j][1], _TRANSPARENT):
                j += 1
            if j < len(children) and isinstance(children[j][1], nn.Conv2d) and children[j][1].groups == 1:
                equalize_pair_(first, children[j][1])
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + name1, prefix + children[j][0]))
    return pairs
