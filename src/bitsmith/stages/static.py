"""Static int8 activations: observe each layer's input range on calibration data and build the static int8
modules (the observers' math lives in algorithms/observers.py)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from bitsmith.algorithms.bias_correction import bias_shift
from bitsmith.algorithms.observers import make_observer, qparams_u8
from bitsmith.algorithms.rtn import quantize_weight_signed
from bitsmith.pipeline.calibration import run_calibration
from bitsmith.pipeline.distributed import gathered, local_batches
from bitsmith.recipe.schemes import Scheme
from bitsmith.formats.affine import dequantize_affine
from bitsmith.nn.static import StaticInt8Conv2d, StaticInt8Linear

__all__ = ["collect_activation_stats", "relu_followers", "build_static", "static_module", "ActivationStats"]


@dataclass
class ActivationStats:
    observer: object
    channel_sum: torch.Tensor | None = None  # (in,) running sum of the input per channel
    count: int = 0

    def channel_mean(self) -> torch.Tensor:
        return self.channel_sum / max(self.count, 1)

    def merge(self, other: "ActivationStats") -> None:
        """Add what ``other`` saw (another process's share of the calibration batches)."""
        self.observer.merge(other.observer)
        if other.channel_sum is not None:
            self.channel_sum = other.channel_sum if self.channel_sum is None else self.channel_sum + other.channel_sum
        self.count += other.count


def _hook(stats: ActivationStats, channel_dim: int):
    def observe(module, args):
        x = args[0].detach().float()
        stats.observer.update(x)
        dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
        total = x.sum(dim=dims)  # (in,)
        stats.channel_sum = total if stats.channel_sum is None else stats.channel_sum + total
        stats.count += x.numel() // x.shape[channel_dim]

    return observe


def collect_activation_stats(
    model: nn.Module, targets: dict[str, Scheme], batches: Iterable, progress=None
) -> dict[str, ActivationStats]:
    """Run ``batches`` through ``model`` with an observer on each target's input."""
    modules = dict(model.named_modules())
    stats, handles = {}, []
    for name, scheme in targets.items():
        stats[name] = ActivationStats(make_observer(scheme.activations.observer))
        channel_dim = 1 if isinstance(modules[name], nn.Conv2d) else -1
        handles.append(modules[name].register_forward_pre_hook(_hook(stats[name], channel_dim)))
    # data parallel: each process observes its share of the batches, then every process merges them all
    mine, shared = local_batches(batches, all(s.observer.mergeable for s in stats.values()))
    run_calibration(model, mine, handles, "static quantization", progress)
    if shared:
        everyone = gathered(stats)
        stats = everyone[0]
        for other in everyone[1:]:
            for name in stats:
                stats[name].merge(other[name])
    return stats


def relu_followers(model: nn.Module) -> dict[str, tuple[nn.Sequential, int]]:
    """Conv2d / Linear layers followed by nn.ReLU in a Sequential (Identity between, e.g. a folded
    BatchNorm, is skipped): name -> (parent, relu index)."""
    found = {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for index, (child_name, child) in enumerate(children):
            if not isinstance(child, (nn.Conv2d, nn.Linear)):
                continue
            after = index + 1
            while after < len(children) and isinstance(children[after][1], nn.Identity):
                after += 1
            if after < len(children) and isinstance(children[after][1], nn.ReLU):
                found[f"{parent_name}.{child_name}" if parent_name else child_name] = (parent, after)
    return found


def build_static(module: nn.Module, stats: ActivationStats, scheme: Scheme, fuse_relu: bool,
                 bias_correction: bool) -> nn.Module:
    """The static int8 replacement of ``module`` (Linear or Conv2d) with its calibrated input range; the
    weight is quantized as the scheme says (per channel or per tensor, min-max or MSE range)."""
    weight = module.weight.detach()
    flat = weight.reshape(weight.shape[0], -1)  # (out, in * taps)
    w = scheme.weights
    qweight = quantize_weight_signed(flat, w.bits, w.granularity, clip=w.clip)
    scale = qweight.scale.expand(flat.shape[0], 1)  # (out, 1): a per-tensor scale on every channel
    bias = None if module.bias is None else module.bias.detach().clone()
    if bias_correction:
        dequantized = dequantize_affine(qweight.codes, (1, flat.shape[1]), scale, torch.zeros_like(scale, dtype=torch.int32))
        shift = bias_shift(weight, dequantized.reshape(weight.shape), stats.channel_mean())
        bias = -shift if bias is None else bias - shift
    new = static_module(module, qweight.codes.reshape(weight.shape), scale, bias, qparams_u8(*stats.observer.range()),
                        fuse_relu)
    if getattr(module, "input_smooth", None) is not None:  # explicit SmoothQuant scale (stages/smooth.py)
        new.set_input_smooth(module.input_smooth)
    return new


def static_module(module: nn.Module, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  input_range: tuple[float, int], fuse_relu: bool) -> nn.Module:
    """The static int8 module for float ``module`` (Linear or Conv2d) holding signed ``codes`` (the weight's
    shape), per-channel ``scale`` (out, 1), ``bias`` and the input's (scale, zero point)."""
    if isinstance(module, nn.Conv2d):
        new = StaticInt8Conv2d.like(module, fused_relu=fuse_relu)
        if bias is not None and new.bias is None:
            new.register_buffer("bias", torch.zeros(module.out_channels))
    else:
        new = StaticInt8Linear(module.in_features, module.out_features, bias is not None, fused_relu=fuse_relu)
    new.set_weight(codes, scale, bias)
    new.set_input_range(*input_range)
    return new
