"""Structured pruning: whole channels (and the heads made of them) removed, so the layers get smaller.

A *group* is the set of layers whose channels move together: the producers, whose output channels (rows)
are removed, and the consumers, whose input columns are removed with them (an FFN: up/gate rows and
down-projection columns; attention heads: q/k/v rows and output-projection columns; a convolution: its
output channels, its BatchNorm, and the next convolution's input channels). Channels are removed in
*units* of ``unit`` consecutive channels (1 for an FFN channel, ``head_dim`` for a head).

    channel_energy    | how much each channel carries into the consumers: ||x_c||^2 * ||W_cons[:, c]||^2 from
                      | calibration activations, or ||W_prod[c]||^2 * ||W_cons[:, c]||^2 from the weights alone
    kept_units        | the ``keep`` highest-scoring units, in their original order
    shrink_linear     | a new Linear with only the given rows / columns
    shrink_conv       | the same for Conv2d (output channels, input channels)
    shrink_batchnorm  | a BatchNorm with only the given channels
    mean_shift        | what a consumer loses when channels of mean ``m`` are removed: W[:, removed] @ m
    refit_columns     | a Linear consumer's kept columns (and bias) refitted by least squares on its
                      | calibration inputs: min ||W x + b - W_K x_K - b'||^2 over the Gram matrix of [x; 1]

Every function returns new tensors or modules; nothing is written into a tensor it was given.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["channel_energy", "unit_scores", "kept_units", "unit_channels", "shrink_linear", "shrink_conv",
           "shrink_batchnorm", "mean_shift", "consumer_columns", "refit_columns"]


def consumer_columns(weight: torch.Tensor, spread: int = 1) -> torch.Tensor:
    """A consumer's weight as (out, channels, rest): a Linear's columns (``spread`` columns per channel, after a
    flatten of ``spread`` positions), or a convolution's input channels with their kernel positions."""
    if weight.dim() == 2:
        return weight.reshape(weight.shape[0], weight.shape[1] // spread, spread)
    return weight.reshape(weight.shape[0], weight.shape[1], -1)


def channel_energy(producers: list[torch.Tensor], consumers: list[tuple[torch.Tensor, int]],
                   input_energy: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per channel: the consumers' column energy times the channel's own, from its inputs (``input_energy``,
    sum over calibration positions of x_c^2) or else from the producers' rows (times ``scale``^2: a
    BatchNorm's gamma / sigma between them). ``consumers`` are (weight, spread) pairs."""
    columns = sum(consumer_columns(w.detach().float(), s).pow(2).sum(dim=(0, 2)) for w, s in consumers)
    if input_energy is not None:
        return input_energy.float() * columns
    rows = sum(w.detach().float().reshape(w.shape[0], -1).pow(2).sum(dim=1) for w in producers)
    if scale is not None:
        rows = rows * scale.float().pow(2)
    return rows * columns


def unit_scores(energy: torch.Tensor, unit: int) -> torch.Tensor:
    """Channel energies summed over units of ``unit`` consecutive channels (a head's ``head_dim``)."""
    if energy.numel() % unit:
        raise ValueError(f"{energy.numel()} channels are not whole units of {unit}")
    return energy.reshape(-1, unit).sum(dim=1)


def kept_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in increasing order (ties: the lower index stays)."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} units")
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return order[:keep].sort().values


def unit_channels(units: torch.Tensor, unit: int) -> torch.Tensor:
    """The channel indices of the given units."""
    return (units[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)


def _spread_index(index: torch.Tensor, spread: int) -> torch.Tensor:
    return unit_channels(index, spread) if spread > 1 else index


def _selected(module: nn.Module, rows: torch.Tensor | None, columns: torch.Tensor | None):
    """(weight, bias) of a Linear or Conv2d with only the given output rows and input columns (dim 1)."""
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if columns is not None:
        weight = weight.index_select(1, columns)
    return weight, bias


def _bound(new: nn.Module, old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """``new`` (built on meta) holding copies of ``weight`` and ``bias``, trainable and in the mode ``old`` was."""
    new.weight = nn.Parameter(weight.clone(), requires_grad=old.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=old.bias.requires_grad)
    return new.train(old.training)


def shrink_linear(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None,
                  spread: int = 1) -> nn.Linear:
    """A Linear keeping output ``rows`` and input ``columns`` (channel indices; ``spread`` columns each)."""
    weight, bias = _selected(linear, rows, _spread_index(columns, spread) if columns is not None else None)
    return _bound(nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta"), linear,
                  weight, bias)


def shrink_conv(conv: nn.Conv2d, out_channels: torch.Tensor | None = None,
                in_channels: torch.Tensor | None = None) -> nn.Conv2d:
    """A Conv2d (groups=1) keeping the given output and input channels."""
    weight, bias = _selected(conv, out_channels, in_channels)
    new = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    1, bias is not None, conv.padding_mode, device="meta")
    return _bound(new, conv, weight, bias)


def shrink_batchnorm(norm: nn.BatchNorm2d | nn.BatchNorm1d, channels: torch.Tensor) -> nn.Module:
    """A BatchNorm of the same kind keeping ``channels`` (affine parameters and running statistics)."""
    new = type(norm)(len(channels), norm.eps, norm.momentum, norm.affine, norm.track_running_stats, device="meta")
    for name, tensor in [*norm.named_parameters(recurse=False), *norm.named_buffers(recurse=False)]:
        value = tensor.detach()
        value = value.index_select(0, channels).clone() if value.dim() else value.clone()
        if name in norm._parameters:
            new._parameters[name] = nn.Parameter(value, requires_grad=tensor.requires_grad)
        else:
            new._buffers[name] = value
    return new.train(norm.training)


def mean_shift(weight: torch.Tensor, removed: torch.Tensor, mean: torch.Tensor, spread: int = 1) -> torch.Tensor:
    """Per output of a consumer: what the removed channels contributed on average (their mean input ``mean``
    per channel, times their columns; a convolution's kernel summed, exact away from padded borders)."""
    columns = consumer_columns(weight.detach().float(), spread)[:, removed]  # (out, removed, rest)
    return (columns.sum(dim=2) * mean.float()[removed][None, :]).sum(dim=1)


def refit_columns(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, kept: torch.Tensor,
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The consumer weight (out, columns) on the ``kept`` columns, and its bias, that best reproduce its outputs
    on calibration inputs. ``gram`` is sum over them of [x; 1][x; 1]^T (its last row and column the constant
    input); with ``bias`` None the consumer has no bias and none is fitted. The removed columns' part is
    projected onto the kept ones (and the bias); ``damp`` (a fraction of the mean diagonal) keeps the solve
    well posed."""
    full = weight.detach().double().reshape(weight.shape[0], -1)
    gram = gram.double()
    if bias is not None:
        full = torch.cat([full, bias.detach().double()[:, None]], dim=1)
        kept = torch.cat([kept, torch.tensor([gram.shape[0] - 1])])
    else:
        gram = gram[:-1, :-1]
    inner = gram[kept][:, kept]
    inner = inner + torch.eye(len(kept), dtype=inner.dtype) * damp * inner.diagonal().mean().clamp(min=1e-12)
    fitted = torch.linalg.solve(inner, gram[kept] @ full.T).T  # (out, kept [+ 1])
    if bias is None:
        return fitted.to(weight.dtype), None
    return fitted[:, :-1].to(weight.dtype), fitted[:, -1].to(bias.dtype)
