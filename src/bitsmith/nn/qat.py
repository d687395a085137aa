"""The training form of a quantized layer: a float Linear or Conv2d whose weight (and input) pass through fake
quantization with learned ranges (``algorithms/qat.py``). It lives between ``prepare_qat_`` and ``convert_``
(``stages/qat.py``), which turns it into the runtime module post-training quantization builds.

    activations | weight grid                                    | input
    none        | the scheme's: signed int8, or unsigned + zero  | float
    dynamic     | signed, zero 0 (held as int8 by the kernels)    | int8 per token, absmax (no parameter)
    static      | signed, zero 0                                  | uint8 per tensor, learned scale and zero (LSQ+)

The scale a weight-only int2-int8 layer is stored with is fp16 (``formats.affine.fp16_scales``), so training
sees that scale (rounded straight through): the converted module computes exactly what was trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.algorithms.qat import (fake_quantize_groups, fake_quantize_per_token, fake_quantize_tensor, lsq_factor,
                                     scale_grad)
from bitsmith.formats.affine import IntFormat, fp16_scales

__all__ = ["FakeQuantLayer"]


class FakeQuantLayer(nn.Module):
    """``layer`` (its weight and bias stay its own Parameters) with learned ``weight_scale`` (N, G) and
    ``weight_zero`` (N, G), and for static activations ``input_scale`` / ``input_zero`` (scalars)."""

    def __init__(self, layer: nn.Module, fmt: IntFormat, group_size: int, scale: torch.Tensor, zero: torch.Tensor,
                 symmetric: bool, activations: str | None, fp16_scale: bool):
        super().__init__()
        self.layer = layer
        self.fmt, self.group_size, self.symmetric = fmt, group_size, symmetric
        self.activations = activations  # None, "dynamic" or "static"
        self.fp16_scale = fp16_scale
        self.weight_scale = nn.Parameter(scale.detach().float().clone())  # (N, G), or (1, 1) for per tensor
        # a symmetric grid keeps its zero point where the scheme puts it; an asymmetric one learns it (LSQ+)
        if symmetric:
            self.register_buffer("weight_zero", zero.detach().float().clone())
        else:
            self.weight_zero = nn.Parameter(zero.detach().float().clone())
        self.input_scale = nn.Parameter(torch.ones(())) if activations == "static" else None
        self.input_zero = nn.Parameter(torch.zeros(())) if activations == "static" else None

    def flat_weight(self) -> torch.Tensor:
        weight = self.layer.weight
        return weight.reshape(weight.shape[0], -1)  # (out, in * taps)

    def stored_scale(self) -> torch.Tensor:
        """(N, G) scale as the runtime module keeps it, rounded straight through where that is fp16."""
        flat = self.flat_weight()
        scale = self.weight_scale.abs().clamp(min=1e-12)
        scale = scale.expand(flat.shape[0], -(-flat.shape[1] // self.group_size))  # a partial last group too
        if self.fp16_scale:
            scale = scale + (fp16_scales(scale.detach()).float() - scale).detach()
        return scale

    def quantized_weight(self) -> torch.Tensor:
        flat = self.flat_weight()
        factor = lsq_factor(self.group_size, self.fmt.qmax)
        scale = scale_grad(self.stored_scale(), factor)
        zero = self.weight_zero.expand_as(scale)
        return fake_quantize_groups(flat, scale, zero, self.fmt.qmin, self.fmt.qmax,
                                    self.group_size).reshape(self.layer.weight.shape)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations == "dynamic":
            return fake_quantize_per_token(x)
        if self.activations == "static":
            factor = lsq_factor(x[0].numel(), 255)
            scale = scale_grad(self.input_scale.abs().clamp(min=1e-8), factor)
            return fake_quantize_tensor(x, scale, self.input_zero)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        weight = self.quantized_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)

    def extra_repr(self) -> str:
        return (f"int{self.fmt.bits} {'signed' if self.fmt.signed else 'unsigned'} group={self.group_size}"
                f" activations={self.activations}")
