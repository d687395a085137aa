"""Bias correction (Nagel et al., 2019): remove the mean shift that weight rounding adds to outputs.

E[W_q x] - E[W x] = (W_q - W) E[x], so subtracting that from the bias keeps each output channel's
mean. For a convolution the input mean is per input channel and the kernel's taps are summed
(padding at the borders is ignored).
"""

from __future__ import annotations

import torch

__all__ = ["bias_shift"]


def bias_shift(weight: torch.Tensor, weight_quantized: torch.Tensor, input_mean: torch.Tensor) -> torch.Tensor:
    """(out,) expected output shift; weights are (out, in) or (out, in, kh, kw), input_mean is (in,)."""
    error = (weight_quantized - weight).float()
    if error.dim() > 2:
        error = error.sum(dim=tuple(range(2, error.dim())))  # (out, in): all taps see the same mean
    return error @ input_mean.float()
