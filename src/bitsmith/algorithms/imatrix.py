"""llama.cpp's importance matrix, as a weight method: round to nearest, each block's range chosen for the least
squared error weighted by how much each input matters.

llama.cpp's ``llama-imatrix`` runs the float model on calibration text and keeps, for every weight matrix, the
mean square of each input column over the tokens; its quantizers then choose each block's scale to minimise
``sum_j imp_j (w_j - d q_j)^2`` instead of the plain squared error. A weight that multiplies a large input moves the
output more, so its rounding error counts more. Unlike GPTQ there is no error feedback between columns: every
weight is still rounded to its nearest code, only the grid (scale and zero point) is chosen differently.

    importance_from_hessian(H) -> (K,) the mean square of each input (the Hessian X^T X / n's diagonal)
    quantize_weight_imatrix(W, bits, granularity, symmetric, importance) -> QuantizedWeight
"""

from __future__ import annotations

import torch

from bitsmith.algorithms.rtn import QuantizedWeight, quantize_weight_rtn

__all__ = ["importance_from_hessian", "quantize_weight_imatrix"]


def importance_from_hessian(hessian: torch.Tensor) -> torch.Tensor:
    """The importance of each input: the diagonal of the calibration inputs' second moment (any positive multiple
    of it chooses the same ranges), floored at a millionth of its mean so that an input never seen still counts."""
    diagonal = hessian.diagonal().float().clamp(min=0)
    return diagonal + 1e-6 * diagonal.mean().clamp(min=torch.finfo(torch.float32).tiny)


def quantize_weight_imatrix(weight: torch.Tensor, bits: int, granularity: str | int, symmetric: bool,
                            importance: torch.Tensor) -> QuantizedWeight:
    """``weight`` (N, K) rounded to nearest on the grid of least importance-weighted error per block."""
    if importance.shape != (weight.shape[1],):
        raise ValueError(f"importance has shape {tuple(importance.shape)}, expected ({weight.shape[1]},)")
    return quantize_weight_rtn(weight, bits, granularity, symmetric, clip="mse", importance=importance[None, :])
