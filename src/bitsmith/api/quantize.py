"""``quantize_(model, config)``: replace matching layers in place with quantized runtime modules."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.api.calibrate import build_static, collect_activation_stats, prepare_static_, relu_followers, run_batch
from bitsmith.api.sequential import awq_sequential_, gptq_sequential_
from bitsmith.api.smoothing import smoothquant_
from bitsmith.api.config import QuantizeConfig, Recipe, Scheme, target_matches
from bitsmith.errors import BitsmithError
from bitsmith.nn import (
    QUANTIZED_MODULES,
    HalfEmbedding,
    HalfLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    IntxWeightOnlyLinear,
    QuantizedEmbedding,
)

__all__ = ["quantize_", "QuantizeReport", "plan"]

SUPPORTED_TYPES = (nn.Linear, nn.Embedding, nn.Conv2d)


@dataclass
class QuantizeReport:
    """What ``quantize_`` did: which modules got which scheme, and which matched but were skipped."""

    quantized: dict[str, str] = field(default_factory=dict)  # name -> scheme description
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason kept in float
    prepared: dict = field(default_factory=dict)  # BatchNorm folding / equalization applied
    notes: dict[str, str] = field(default_factory=dict)  # name -> how it was quantized, where not as asked


def plan(model: nn.Module, config: QuantizeConfig) -> tuple[dict[str, Scheme], dict[str, str]]:
    """Which module gets which scheme (first matching rule wins), and which matches cannot be handled."""
    chosen, skipped = {}, {}
    for name, module in model.named_modules():
        if not name or isinstance(module, QUANTIZED_MODULES):
            continue
        type_name = type(module).__name__
        if any(target_matches(t, name, type_name) for t in config.ignore):
            continue
        for rule in config.rules:
            if any(target_matches(t, name, type_name) for t in rule.targets):
                if rule.scheme is None:
                    break
                if not isinstance(module, SUPPORTED_TYPES):
                    if any(t.startswith("re:") or t == name for t in rule.targets):
                        skipped[name] = f"{type_name} is not a layer type bitsmith quantizes; left in float"
                    break
                reason = _unsupported(module, rule.scheme)
                if reason:
                    skipped[name] = reason
                else:
                    chosen[name] = rule.scheme
                break
    return chosen, skipped


def _unsupported(module: nn.Module, scheme: Scheme) -> str | None:
    """Why this scheme cannot run on this layer (it is then left in float and reported)."""
    if isinstance(module, nn.Conv2d):
        if not scheme.is_static or scheme.weights.dtype != "int8":
            return "Conv2d is quantized only by w8a8-static schemes here; left in float"
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return "Conv2d with string padding or non-zero padding mode has no int8 kernel; left in float"
    elif scheme.is_static and isinstance(module, nn.Embedding):
        return "static activation quantization does not apply to Embedding; left in float"
    return None


def _check_finite(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise BitsmithError(f"layer '{name}' has NaN or infinite weights; fix the model before quantizing")


def _check_group(name: str, scheme: Scheme, in_features: int) -> None:
    group = scheme.weights.granularity
    if isinstance(group, int) and in_features % group:
        raise BitsmithError(
            f"group size {group} does not divide layer '{name}' (in_features={in_features});"
            f" use a divisor of {in_features}, per-channel, or exclude the layer"
        )


def _quantize_linear(name: str, linear: nn.Linear, scheme: Scheme) -> nn.Module:
    w = scheme.weights
    if w.bits is None:
        return HalfLinear.from_float(linear, w.dtype)
    _check_group(name, scheme, linear.in_features)
    qweight = quantize_weight_rtn(linear.weight.detach(), w.bits, w.granularity, w.symmetric, w.clip)
    if w.bits == 8 and w.symmetric and w.granularity in ("channel", "tensor"):
        cls = Int8DynamicLinear if scheme.activations is not None else Int8WeightOnlyLinear
        return cls.from_quantized(qweight, linear.bias)
    if w.granularity == "tensor":  # stored as one group spanning each row, with the shared scale repeated
        qweight.group_size = linear.in_features
    return IntxWeightOnlyLinear.from_quantized(qweight, linear.bias)


def _quantize_embedding(name: str, embedding: nn.Embedding, scheme: Scheme) -> nn.Module:
    w = scheme.weights
    if w.bits is None:
        return HalfEmbedding.from_float(embedding, w.dtype)
    if scheme.activations is not None:
        raise BitsmithError(f"layer '{name}' is an Embedding: activation quantization does not apply to it")
    if w.granularity != "channel":
        raise BitsmithError(f"layer '{name}' is an Embedding: bitsmith quantizes embeddings per row (granularity: channel)")
    qweight = quantize_weight_rtn(embedding.weight.detach(), w.bits, "channel", w.symmetric, w.clip)
    return QuantizedEmbedding.from_quantized(qweight, embedding.padding_idx)


def _quantize_static(name, module, stats, relu_slot, bias_correction, report) -> nn.Module | None:
    if stats.count == 0:
        report.skipped[name] = "saw no calibration data; left in float"
        return None
    new = build_static(name, module, stats, relu_slot is not None, bias_correction)
    if relu_slot is not None:  # the ReLU now runs inside the int8 kernel
        parent, index = relu_slot
        parent[index] = nn.Identity()
    return new


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_(
    model: nn.Module, config: QuantizeConfig | Recipe, calibration: Iterable | None = None, progress=None
) -> QuantizeReport:
    """Quantize ``model`` in place. Every target is checked before any layer is replaced, so a bad
    layer (NaN weights, a group size that does not divide it) leaves the model untouched.

    Schemes with static activations need ``calibration``: an iterable of model inputs (tensors,
    tuples, or keyword dicts), run through the float model to fix each layer's input range."""
    recipe_dict = config.model_dump(mode="json")
    if isinstance(config, Recipe):
        config = config.quantize
    if config.needs_calibration and calibration is None:
        raise BitsmithError("this recipe calibrates (static activations, gptq, awq or smoothquant): give calibration data (--calib)")
    chosen, skipped = plan(model, config)
    modules = dict(model.named_modules())
    for name, scheme in chosen.items():
        _check_finite(name, modules[name].weight)
        if isinstance(modules[name], nn.Linear) and scheme.weights.bits is not None:
            _check_group(name, scheme, modules[name].in_features)
    report = QuantizeReport(skipped=skipped)
    static = {name: scheme for name, scheme in chosen.items() if scheme.is_static}
    stats, fusable = {}, {}
    if config.smoothquant is not None:
        w8a8 = {n: s for n, s in chosen.items() if s.activations is not None}
        if not w8a8:
            raise BitsmithError("smoothquant smooths int8 activations: the recipe quantizes no layer's activations")
        report.prepared["smoothquant"] = smoothquant_(model, w8a8, config, calibration, progress)
    if static:
        report.prepared.update(prepare_static_(model, config))
        modules = dict(model.named_modules())
        stats = collect_activation_stats(model, static, calibration, progress)
        fusable = relu_followers(model)
    gptq = {n: s for n, s in chosen.items() if s.weights.algorithm == "gptq" and isinstance(modules[n], nn.Linear)}
    if gptq:
        infos = gptq_sequential_(model, gptq, config.gptq, calibration, run_batch, progress)
        for name in infos:
            report.quantized[name] = chosen.pop(name).describe()
        for name in set(gptq) - set(infos):  # outside the repeated blocks: no block inputs to calibrate on
            report.notes[name] = "outside the repeated blocks: round-to-nearest instead of gptq"
        modules = dict(model.named_modules())
    awq = {n: s for n, s in chosen.items() if s.weights.algorithm == "awq" and isinstance(modules[n], nn.Linear)}
    if awq:
        infos, awq_notes = awq_sequential_(model, awq, config, calibration, run_batch, progress)
        for name in infos:
            report.quantized[name] = chosen.pop(name).describe()
        for name in set(awq) - set(infos):
            report.notes[name] = "outside the repeated blocks: round-to-nearest instead of awq"
        if awq_notes:
            report.prepared["awq_notes"] = awq_notes
        report.prepared["awq"] = {n: i for n, i in infos.items() if i}
        modules = dict(model.named_modules())
    with torch.no_grad():
        for name, scheme in chosen.items():
            module = modules[name]
            if name in static:
                new = _quantize_static(name, module, stats[name], fusable.get(name), config.bias_correction, report)
                if new is None:
                    continue
            elif isinstance(module, nn.Linear):
                new = _quantize_linear(name, module, scheme)
            else:
                new = _quantize_embedding(name, module, scheme)
            _set_module(model, name, new)
            report.quantized[name] = scheme.describe()
            if progress is not None:
                progress(name)
    model.bitsmith_recipe = recipe_dict
    model.bitsmith_skipped = {**getattr(model, "bitsmith_skipped", {}), **report.skipped}
    return report
