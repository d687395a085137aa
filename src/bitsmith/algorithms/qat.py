"""Quantization-aware training: fake quantization with straight-through gradients and learned ranges.

Pure functions on tensors. The training modules that hold the learned scales (``nn/qat.py``) and the stage
that trains them (``stages/qat.py``) sit above.

    what            | forward                                         | gradient
    round           | round(x)                                        | 1 (straight through)
    weight codes    | clamp(round(w / s) + z, qmin, qmax)             | w: 1 inside the range, 0 outside (STE)
    scale s (LSQ)   | x_hat = (q - z) * s                             | autograd of the line above: -w/s + q - z
                    |                                                 |   inside the range, qmin/qmax - z outside,
                    |                                                 |   times 1 / sqrt(numel * qmax) (LSQ)
    zero z (LSQ+)   | rounded, learned as a float                     | straight through

LSQ: Esser et al., "Learned Step Size Quantization" (2020); LSQ+: Bhalgat et al. (2020), a learned offset for
asymmetric activations. Weights keep their scheme's grid: per channel or per group of inputs, symmetric (zero
point fixed) or asymmetric (zero point learned).
"""

from __future__ import annotations

import math

import torch

__all__ = ["round_ste", "scale_grad", "lsq_factor", "fake_quantize_groups", "fake_quantize_per_token",
           "fake_quantize_tensor", "codes_of"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def scale_grad(p: torch.Tensor, factor: float) -> torch.Tensor:
    """``p`` forward, its gradient times ``factor`` backward (LSQ's step-size gradient scale)."""
    return (p - p * factor).detach() + p * factor


def lsq_factor(values_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale 1 / sqrt(values sharing one scale * qmax): keeps a scale's update the size of a
    weight's, however many values it spans."""
    return 1.0 / math.sqrt(max(values_per_scale, 1) * max(qmax, 1))


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, ceil(K / group_size), group_size); a partial last group is zero-padded, as post-training
    quantization pads it (zero is always on the grid, so the padding quantizes exactly and is cut off again)."""
    pad = -x.shape[1] % group_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(x.shape[0], -1, group_size)


def _ungrouped(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``_grouped`` undone: (N, G, g) -> ``shape`` (N, K), the padding cut off."""
    return blocks.reshape(shape[0], -1)[:, :shape[1]]


def fake_quantize_groups(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                         group_size: int) -> torch.Tensor:
    """``w`` (N, K) quantized and dequantized per group of ``group_size`` inputs (K for per channel);
    ``scale`` and ``zero`` (N, ceil(K / group_size)), ``zero`` a float rounded straight through."""
    blocks = _grouped(w, group_size)  # (N, G, g)
    s = scale.unsqueeze(-1)  # (N, G, 1)
    z = torch.clamp(round_ste(zero), qmin, qmax).unsqueeze(-1)  # stored as a code: inside the code range
    q = torch.clamp(round_ste(blocks / s) + z, qmin, qmax)
    return _ungrouped((q - z) * s, w.shape)


def codes_of(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
             group_size: int) -> torch.Tensor:
    """The integer codes ``fake_quantize_groups`` stands for, (N, K) int32: what ``convert_`` stores."""
    blocks = _grouped(w.detach().float(), group_size)
    zero = torch.clamp(torch.round(zero), qmin, qmax).unsqueeze(-1)
    q = torch.clamp(torch.round(blocks / scale.unsqueeze(-1)) + zero, qmin, qmax)
    return _ungrouped(q, w.shape).to(torch.int32)


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row of the last dimension, absmax / 127 (what the W8A8 dynamic kernels do at run time);
    straight through, no learned parameter."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # (..., 1)
    scale = amax / 127.0
    return torch.clamp(round_ste(x / scale), -127, 127) * scale


def fake_quantize_tensor(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int = 0,
                         qmax: int = 255) -> torch.Tensor:
    """One learned scale and offset for the whole tensor (static uint8 activations, LSQ+)."""
    z = torch.clamp(round_ste(zero), qmin, qmax)
    return (torch.clamp(round_ste(x / scale) + z, qmin, qmax) - z) * scale
