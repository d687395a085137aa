"""Static quantization plumbing: prepare the float model, observe activations on calibration data,
and build the static int8 modules (the math lives in algorithms/)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from bitsmith.algorithms.bias_correction import bias_shift
from bitsmith.algorithms.equalize import cross_layer_equalize_
from bitsmith.algorithms.fold import fold_batchnorm_
from bitsmith.algorithms.observers import make_observer, qparams_u8
from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.api.config import QuantizeConfig, Scheme
from bitsmith.errors import BitsmithError
from bitsmith.formats.affine import dequantize_affine
from bitsmith.nn.static import StaticInt8Conv2d, StaticInt8Linear

__all__ = [
    "prepare_static_", "collect_activation_stats", "calibration_batches", "call_on_calibration", "run_batch",
    "run_calibration",
    "build_static", "ActivationStats",
]


@dataclass
class ActivationStats:
    observer: object
    channel_sum: torch.Tensor | None = None  # (in,) running sum of the input per channel
    count: int = 0

    def channel_mean(self) -> torch.Tensor:
        return self.channel_sum / max(self.count, 1)


def prepare_static_(model: nn.Module, config: QuantizeConfig) -> dict:
    """Function-preserving rewrites before observing: BatchNorm folding, cross-layer equalization."""
    done = {}
    if config.fold_batchnorm:
        done["folded_batchnorm"] = fold_batchnorm_(model)
    if config.cross_layer_equalization:
        done["equalized"] = [list(pair) for pair in cross_layer_equalize_(model)]
    return done


def _is_batch(item) -> bool:
    if isinstance(item, torch.Tensor):
        return True
    if isinstance(item, (tuple, list)):
        return bool(item) and all(isinstance(v, torch.Tensor) for v in item)
    if isinstance(item, dict):
        return bool(item) and all(isinstance(k, str) for k in item)
    return False


def calibration_batches(calibration: Iterable) -> list:
    """The calibration set as a list of model inputs (tensors, tuples of tensors, keyword dicts), checked:
    an empty set or an item that is no model input is a one-line error, before the model changes."""
    if isinstance(calibration, (torch.Tensor, str, bytes, dict)):
        raise BitsmithError("calibration must be an iterable of batches (tensors, tuples or keyword dicts),"
                            f" not a single {type(calibration).__name__}")
    try:
        batches = list(calibration)
    except TypeError:
        raise BitsmithError(f"calibration must be an iterable of batches, not {type(calibration).__name__}") from None
    if not batches:
        raise BitsmithError("the calibration set is empty: give at least one sample")
    for number, batch in enumerate(batches, 1):
        if not _is_batch(batch):
            raise BitsmithError(f"calibration batch {number} is a {type(batch).__name__}, not a tensor, a tuple of"
                                " tensors or a dict of keyword inputs")
        tensors = batch.values() if isinstance(batch, dict) else (batch,) if isinstance(batch, torch.Tensor) else batch
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise BitsmithError(f"calibration batch {number} holds NaN or infinite values")
    return batches


def call_on_calibration(module: nn.Module, *args, **kwargs):
    """``module(*args, **kwargs)`` on calibration inputs; inputs it cannot take are a one-line BitsmithError."""
    try:
        return module(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BitsmithError(f"a calibration batch does not fit the model ({type(err).__name__}: {first[:200]})") from None


def run_batch(model: nn.Module, batch):
    """``model`` on one batch (a keyword dict, a tuple of positional inputs, or one tensor)."""
    if isinstance(batch, dict):
        return call_on_calibration(model, **batch)
    if isinstance(batch, (tuple, list)):
        return call_on_calibration(model, *batch)
    return call_on_calibration(model, batch)


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
    run_calibration(model, batches, handles, "static quantization", progress)
    return stats


def run_calibration(model: nn.Module, batches: Iterable, handles: list, what: str, progress=None) -> None:
    """Run every batch through ``model`` (observer hooks do the work), then remove ``handles``;
    an empty calibration set is an error naming ``what`` needed it."""
    seen = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                run_batch(model, batch)
                seen += 1
                if progress is not None:
                    progress(f"{what}: calibration batch {seen}")
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise BitsmithError(f"the calibration set is empty: {what} needs at least one sample")


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
    qweight = quantize_weight_rtn(flat, 8, w.granularity, symmetric=True, clip=w.clip)
    scale = qweight.scale.expand(flat.shape[0], 1)  # (out, 1): a per-tensor scale on every channel
    bias = None if module.bias is None else module.bias.detach().clone()
    if bias_correction:
        dequantized = dequantize_affine(qweight.codes, (1, flat.shape[1]), scale, torch.zeros_like(scale, dtype=torch.int32))
        shift = bias_shift(weight, dequantized.reshape(weight.shape), stats.channel_mean())
        bias = -shift if bias is None else bias - shift
    if isinstance(module, nn.Conv2d):
        new = StaticInt8Conv2d.like(module, fused_relu=fuse_relu)
        if bias is not None and new.bias is None:
            new.register_buffer("bias", torch.zeros(module.out_channels))
    else:
        new = StaticInt8Linear(module.in_features, module.out_features, bias is not None, fused_relu=fuse_relu)
    new.set_weight(qweight.codes.reshape(weight.shape), scale, bias)
    new.set_input_range(*qparams_u8(*stats.observer.range()))
    if getattr(module, "input_smooth", None) is not None:  # explicit SmoothQuant scale (api/smoothing.py)
        new.set_input_smooth(module.input_smooth)
    return new
