"""Cheap predictors of how much changing one layer hurts a model, and how well they rank the real effect.

Pure tensor functions. For a Linear with weight W (N, K) replaced by W + dW:

    proxy        | value                                    | needs
    sqnr_db      | 10 log10( tr(W H W^T) / tr(dW H dW^T) )  | H = 2/n X^T X of the layer's n calibration input
                 |                                          | rows (``gptq.accumulate_hessian``)
    output_error | tr(dW H dW^T) / 2 = mean_rows |dW x|^2   | the same H (GPTQ's layer objective)
    fisher       | sum(F * dW^2)                            | F = E[g^2], g the gradient of a random probe of
                 |                                          | the model's output: a diagonal Fisher / Gauss-Newton
                 |                                          | estimate of the output's change, through the model

An embedding table T (V, D) is a Linear on one-hot inputs: with f_v the share of calibration tokens that look up
row v, H is diagonal and the same proxies read ``lookup_energy`` = sum_v f_v |T_v|^2 (and of the change dT).

Higher ``sqnr_db`` means less harm; the other two grow with the harm. ``spearman`` compares a proxy's ranking
with the measured effects (scipy's rank correlation, ties averaged).
"""

from __future__ import annotations

import math

import torch

__all__ = ["output_energy", "output_error", "lookup_energy", "sqnr_db", "fisher_error", "spearman", "PROXIES"]

PROXIES = ("sqnr_db", "output_error", "fisher")  # name -> larger is worse, except sqnr_db (negated to rank)


def output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(W H W^T) / 2: the mean squared output of the layer over the calibration rows (bias left out)."""
    w = weight.detach().double()
    return float(((w @ hessian.double()) * w).sum()) / 2


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean over calibration rows of the squared change of the layer's output, |dW x|^2."""
    return output_energy(delta, hessian)


def lookup_energy(table: torch.Tensor, frequency: torch.Tensor) -> float:
    """sum_v f_v |T_v|^2: the mean squared looked-up row over the calibration tokens (``frequency`` (V,): each row's
    share of them); of a change dT, the mean squared change of the lookup's output."""
    return float((frequency.double() * table.detach().double().pow(2).sum(dim=1)).sum())


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB, from ``output_energy`` of the weight and of its change (inf if no change)."""
    if noise <= 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def fisher_error(fisher: torch.Tensor, delta: torch.Tensor) -> float:
    """sum(F * dW^2): the second-order estimate of the output change, F the diagonal Fisher of the weight."""
    return float((fisher.double() * delta.detach().double().pow(2)).sum())


def spearman(predicted: list[float], measured: list[float]) -> float | None:
    """Spearman rank correlation of two equally long lists; None when either is constant or shorter than 3."""
    from scipy.stats import spearmanr

    if len(predicted) < 3 or len(set(predicted)) < 2 or len(set(measured)) < 2:
        return None
    return float(spearmanr(predicted, measured).statistic)
