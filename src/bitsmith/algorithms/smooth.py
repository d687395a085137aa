"""Per-channel scale migration between a layer's input and its weights.

For a layer ``y = x W^T`` and any positive per-input-channel vector ``s`` (K,),
``y = (x / s) (W * s)^T``: the ``1 / s`` is folded into the operation that produced ``x`` (a norm's
weight, or the output rows of a previous Linear) and ``W * s`` is what gets quantized.

- SmoothQuant (Xiao et al., 2022) picks ``s = max|x|^alpha / max|W|^(1-alpha)`` so that activation
  outlier channels shrink and the weights absorb them: int8 activations then lose less.
- AWQ (Lin et al., 2023) searches ``s = mean|x|^r / mean|W|^(1-r)`` over a grid of r for the value
  that minimises the layer outputs' quantization error, so input channels that carry large
  activations get finer weight steps; then searches, per group, how far to shrink the weight range
  (clipping) for the same objective.

Both objectives are measured with the layer's input Gram matrix ``H = X^T X`` (``accumulate_hessian``)
instead of stored activations: ``||X W^T - X W_hat^T||^2 = trace(E H E^T)`` with ``E = W - W_hat``.

    function                 |  takes                                 |  gives
      smoothquant_scales     |  max|x| (K,), weights [(N_i, K)], alpha |  s (K,)
      awq_scales             |  weights, H (K, K), mean|x| (K,)       |  s (K,), info
      awq_clip_ratios        |  W (N, K), H (K, K)                    |  range shrink per group (N, K/g)
      quantize_weight_ranged |  W (N, K), shrink ratios               |  QuantizedWeight
      fold_scales_           |  prev module, layers, s                |  prev and layers rescaled (new tensors)
"""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.algorithms._modules import assign_
from bitsmith.algorithms.rtn import QuantizedWeight, weight_format
from bitsmith.errors import BitsmithError
from bitsmith.formats.affine import _minmax_qparams, dequantize_affine, quantize_affine

__all__ = ["smoothquant_scales", "awq_scales", "awq_clip_ratios", "quantize_weight_ranged", "fold_scales_"]

_MIN_SCALE = 1e-5


def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """``s_k = max|x_k|^alpha / max_i max|W_i[:, k]|^(1 - alpha)``; channels never active keep s = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise BitsmithError(f"smoothquant alpha must be in [0, 1], got {alpha}")
    w_absmax = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).float()
    x = act_absmax.float()
    s = x.pow(alpha) / w_absmax.clamp(min=_MIN_SCALE).pow(1.0 - alpha)
    s = torch.where((x > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(min=_MIN_SCALE)


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """``w`` (N, K) as (N, G, group), zero-padded where group does not divide K (zeros change no range)."""
    pad = -w.shape[1] % group
    return torch.nn.functional.pad(w, (0, pad)).reshape(w.shape[0], -1, group)


def _fake_quant(w: torch.Tensor, bits: int, group: int, symmetric: bool, ratio: torch.Tensor | float = 1.0):
    """Round-to-nearest of ``w`` (N, K) per group, each group's range shrunk by ``ratio`` (scalar or (N, G))."""
    fmt = weight_format(bits, symmetric)
    blocks = _grouped(w, group)
    xmin, xmax = blocks.amin(dim=-1) * ratio, blocks.amax(dim=-1) * ratio
    scale, zero = _minmax_qparams(xmin, xmax, fmt, symmetric, eps=torch.finfo(torch.float32).tiny * 2**10)
    codes = quantize_affine(w, (1, group), scale, zero, fmt)
    return codes, scale, zero, fmt


def _dequant(w: torch.Tensor, bits: int, group: int, symmetric: bool, ratio=1.0) -> torch.Tensor:
    codes, scale, zero, _ = _fake_quant(w, bits, group, symmetric, ratio)
    return dequantize_affine(codes, (1, group), scale, zero)


def _output_error(error: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """trace(E H E^T) for E (N, K), H (K, K)."""
    return ((error @ hessian) * error).sum()


def awq_scales(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    act_absmean: torch.Tensor,
    bits: int,
    group: int,
    symmetric: bool,
    grid: int = 20,
    duo_scaling: bool = True,
) -> tuple[torch.Tensor, dict]:
    """AWQ's scale search for the layers that share one input.

    Candidate ``s = mean|x|^r / w_mean^(1-r)`` (``w_mean``: each weight's magnitude relative to its
    group's maximum, averaged over output channels; without ``duo_scaling`` just ``mean|x|^r``) for
    r = 0, 1/grid, ..., (grid-1)/grid, normalised so that max(s) * min(s) = 1. Each candidate is
    scored by the summed output error ``trace(E H E^T)`` of round-to-nearest of ``W * s`` (seen
    through the ``1 / s`` on the input); r = 0 is plain round-to-nearest, so the result is never
    worse than it on this objective. Returns the best s (K,) and {"ratio", "error", "rtn_error"}.
    """
    ws = [w.detach().float() for w in weights]
    h = hessian.float()
    x_mean = act_absmean.float().clamp(min=_MIN_SCALE)
    if duo_scaling:
        rel = [_grouped(w.abs(), group) for w in ws]
        rel = [(r / r.amax(dim=-1, keepdim=True).clamp(min=_MIN_SCALE)).flatten(1)[:, : w.shape[1]]
               for r, w in zip(rel, ws)]
        w_mean = torch.cat(rel).mean(dim=0).clamp(min=_MIN_SCALE)
    best = (float("inf"), None, 0.0)
    rtn_error = None
    for step in range(grid):
        r = step / grid
        s = x_mean.pow(r) / w_mean.pow(1.0 - r) if duo_scaling else x_mean.pow(r)
        s = s / (s.max() * s.min()).sqrt()
        s = s.clamp(min=_MIN_SCALE)
        if step == 0:
            s = torch.ones_like(s)  # r = 0 is exactly round-to-nearest
        error = sum(float(_output_error(w - _dequant(w * s, bits, group, symmetric) / s, h)) for w in ws)
        if step == 0:
            rtn_error = error
        if error < best[0]:
            best = (error, s, r)
    return best[1], {"ratio": best[2], "error": best[0], "rtn_error": rtn_error}


def awq_clip_ratios(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group: int,
    symmetric: bool,
    grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """Per group, the range shrink factor in ``1 - max_shrink * i / grid`` (i = 0..grid-1) that
    minimises the group's own share of the output error, ``e_g H_gg e_g^T`` with H_gg the group's
    diagonal block of H. Returns (N, ceil(K / group)) ratios (1 = the full min-max range)."""
    w = weight.detach().float()
    n, k = w.shape
    g = -(-k // group)
    pad = g * group - k  # a shorter last group: H padded with zeros, which adds no error
    h = torch.nn.functional.pad(hessian.float(), (0, pad, 0, pad))
    blocks = h.reshape(g, group, g, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (G, gs, gs)
    best_err = torch.full((n, g), float("inf"))
    best_ratio = torch.ones(n, g)
    for step in range(grid):
        ratio = 1.0 - max_shrink * step / grid
        e = _grouped(w - _dequant(w, bits, group, symmetric, ratio), group)  # (N, G, gs)
        err = (torch.einsum("ngi,gij->ngj", e, blocks) * e).sum(dim=-1)  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def quantize_weight_ranged(
    weight: torch.Tensor, bits: int, group: int, symmetric: bool, ratios: torch.Tensor | None = None
) -> QuantizedWeight:
    """Round-to-nearest with each group's min-max range multiplied by ``ratios`` (N, ceil(K / group))."""
    codes, scale, zero, fmt = _fake_quant(weight.detach().float(), bits, group, symmetric, 1.0 if ratios is None else ratios)
    return QuantizedWeight(codes, scale, zero, fmt, group)


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(weight, torch.Tensor) and weight.dim() == 1


def output_width(module: nn.Module) -> int | None:
    """Channels of ``module``'s output a scale can be folded into (None: it cannot take one)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if _is_norm(module):
        return module.weight.numel()
    return None


@torch.no_grad()
def fold_scales_(prev: nn.Module, layers: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the ``layers``' input columns by it."""
    width = output_width(prev)
    if width is None:
        raise BitsmithError(f"cannot fold a scale into {type(prev).__name__}: not a Linear or a norm with a weight")
    if width != s.numel() or any(layer.in_features != s.numel() for layer in layers):
        raise BitsmithError(f"scale of {s.numel()} channels does not fit {type(prev).__name__} ({width} outputs)")
    s = s.to(prev.weight.dtype)
    assign_(prev, "weight", prev.weight / (s[:, None] if isinstance(prev, nn.Linear) else s))
    if getattr(prev, "bias", None) is not None:
        assign_(prev, "bias", prev.bias / s)
    for layer in layers:
        assign_(layer, "weight", layer.weight * s.to(layer.weight.dtype))
