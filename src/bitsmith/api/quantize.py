"""``quantize_(model, config)``: replace matching layers in place with quantized runtime modules.

All or nothing: every target and the whole recipe are checked before the model changes (schemes against
layers, NaN weights, repeated blocks and model families for GPTQ / AWQ / SmoothQuant, calibration data),
and a failure that only shows later (a calibration batch the model rejects) puts the model back exactly
as it was (``transaction.all_or_nothing``).

Every layer's outcome is reported: ``quantized`` (what was done, e.g. ``w4 g128 asym a16 gptq``),
``skipped`` (kept in float, and why) and ``notes`` (how what was done differs from what was asked, or what
happened on the way: GPTQ fell back to round-to-nearest, damping was escalated, no AWQ scale could be
folded, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.api.calibrate import build_static, calibration_batches, collect_activation_stats, prepare_static_, relu_followers, run_batch
from bitsmith.api.config import GPTQOptions, QuantizeConfig, Recipe, Rule, Scheme, target_matches
from bitsmith.api.families import family_for
from bitsmith.api.sequential import awq_sequential_, find_blocks, gptq_sequential_, model_family
from bitsmith.api.smoothing import smoothquant_
from bitsmith.api.transaction import all_or_nothing
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

__all__ = ["quantize_", "QuantizeReport", "plan", "gptq_note", "quantize_linear"]

SUPPORTED_TYPES = (nn.Linear, nn.Embedding, nn.Conv2d)


@dataclass
class QuantizeReport:
    """What ``quantize_`` did: which modules got which scheme, and which matched but were skipped."""

    quantized: dict[str, str] = field(default_factory=dict)  # name -> what was done (scheme label)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason kept in float
    prepared: dict = field(default_factory=dict)  # BatchNorm folding / equalization / smoothing applied
    notes: dict[str, str] = field(default_factory=dict)  # name -> how it was quantized, where not as asked

    def note(self, name: str, text: str) -> None:
        self.notes[name] = f"{self.notes[name]}; {text}" if name in self.notes else text


def _cannot(module: nn.Module, scheme: Scheme) -> str | None:
    """Why this scheme cannot run on this layer, or None."""
    w = scheme.weights
    if isinstance(module, nn.Conv2d):
        if not scheme.is_static or w.dtype != "int8":
            return "Conv2d is quantized only by static W8A8 schemes (int8 weights, calibrated activations)"
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return "Conv2d with string padding or a non-zero padding mode has no int8 kernel"
    elif isinstance(module, nn.Embedding):
        if scheme.activations is not None:
            return "an Embedding is a lookup: activation quantization does not apply to it"
        if w.bits is not None and w.granularity != "channel":
            return "embeddings are quantized per row (granularity: channel)"
        if w.algorithm != "rtn":
            return f"{w.algorithm} quantizes Linear layers; give Embedding rules algorithm: rtn"
    return None


def _named_exactly(rule: Rule, name: str) -> bool:
    return name in rule.targets


def plan(model: nn.Module, config: QuantizeConfig) -> tuple[dict[str, Scheme], dict[str, str]]:
    """Which module gets which scheme (first matching rule wins), and which matches cannot be handled.

    A rule that names a layer exactly and cannot be applied to it is an error; a rule matching by type or
    regex (which may over-match) leaves such layers in float and says why."""
    chosen, skipped = {}, {}
    for name, module in model.named_modules():
        if not name or isinstance(module, QUANTIZED_MODULES):
            continue
        type_name = type(module).__name__
        if any(target_matches(t, name, type_name) for t in config.ignore):
            continue
        for index, rule in enumerate(config.rules):
            if not any(target_matches(t, name, type_name) for t in rule.targets):
                continue
            if rule.scheme is None:
                break
            if isinstance(module, SUPPORTED_TYPES):
                reason = _cannot(module, rule.scheme)
            elif next(module.children(), None) is not None or not list(module.parameters(recurse=False)):
                if _named_exactly(rule, name) or type_name in rule.targets:
                    reason = f"{type_name} is a container of layers, not a layer: target its layers instead"
                else:
                    break  # a regex over-matching a container or a parameterless module: nothing to quantize
            else:
                reason = f"{type_name} is not a layer type bitsmith quantizes"
            if reason is None:
                chosen[name] = rule.scheme
            elif _named_exactly(rule, name):
                raise BitsmithError(f"layer '{name}' ({type_name}), named by rule {index + 1}: {reason}")
            else:
                skipped[name] = f"{reason}; left in float"
            break
    return chosen, skipped


def _untied_tables(model: nn.Module, chosen: dict[str, Scheme]) -> dict[str, str]:
    """Embeddings the plan quantizes whose matrix is shared with an output head that stays in float: the
    recipe is followed (the table is quantized, the head keeps the float matrix), so they come apart and the
    matrix is stored twice. Said in the report rather than done another way than asked."""
    modules = dict(model.named_modules())
    notes = {}
    for name in chosen:
        table = modules[name]
        if not isinstance(table, nn.Embedding):
            continue
        heads = [n for n, m in modules.items() if isinstance(m, nn.Linear) and m.weight is table.weight]
        float_heads = [head for head in heads if head not in chosen]
        if float_heads:
            notes[name] = (f"was tied to {', '.join(float_heads)}, which stays in float: now untied, the float matrix"
                           f" is kept by the head and the table stored quantized beside it (to keep them tied,"
                           f" ignore '{name}' too)")
    return notes


def _check_finite(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise BitsmithError(f"layer '{name}' has NaN or infinite weights; fix the model before quantizing")


def quantize_linear(name: str, linear: nn.Linear, scheme: Scheme) -> nn.Module:
    """The runtime module for ``linear`` under a round-to-nearest ``scheme``."""
    w = scheme.weights
    if w.bits is None:
        return HalfLinear.from_float(linear, w.dtype)
    qweight = quantize_weight_rtn(linear.weight.detach(), w.bits, w.granularity, w.symmetric, w.clip)
    if w.bits == 8 and w.symmetric and w.granularity in ("channel", "tensor"):
        cls = Int8DynamicLinear if scheme.activations is not None else Int8WeightOnlyLinear
        return cls.from_quantized(qweight, linear.bias)  # a per-tensor scale is repeated on every row
    if w.granularity == "tensor":  # stored as one group spanning each row, with the shared scale repeated
        qweight.group_size = linear.in_features
    return IntxWeightOnlyLinear.from_quantized(qweight, linear.bias)


def _quantize_embedding(embedding: nn.Embedding, scheme: Scheme) -> nn.Module:
    w = scheme.weights
    if w.bits is None:
        return HalfEmbedding.from_float(embedding, w.dtype)
    qweight = quantize_weight_rtn(embedding.weight.detach(), w.bits, "channel", w.symmetric, w.clip)
    return QuantizedEmbedding.from_quantized(qweight, embedding.padding_idx)


def gptq_note(info: dict, options: GPTQOptions) -> tuple[str, str | None]:
    """(what GPTQ's result is: "gptq" or "rtn", a note for the report or None) from gptq_quantize's info."""
    if info.get("fallback") == "rtn":
        return "rtn", "saw no calibration data: round-to-nearest instead of gptq"
    parts = []
    if info.get("fallback") == "diagonal":
        parts.append("Hessian not positive definite at any damping: rounded with GPTQ's group scales, no error feedback")
    elif info.get("damp_percent", 0.0) > options.damp_percent:
        parts.append(f"damping escalated from {options.damp_percent:g} to {info['damp_percent']:g} of mean(diag H)"
                     " (Hessian not positive definite)")
    if info.get("dead_columns"):
        parts.append(f"{info['dead_columns']} inputs were 0 in every calibration row: their weights set to 0")
    return "gptq", "; ".join(parts) or None


def _check_recipe(model: nn.Module, chosen: dict[str, Scheme], config: QuantizeConfig, calibration) -> None:
    """Everything that can be known before the model changes."""
    modules = dict(model.named_modules())
    for name in chosen:
        _check_finite(name, modules[name].weight)
    if config.needs_calibration and calibration is None:
        raise BitsmithError("this recipe calibrates (static activations, gptq, awq or smoothquant): give calibration"
                            " data (--calib)")
    by_algorithm: dict[str, list[str]] = {}
    for name, scheme in chosen.items():
        if isinstance(modules[name], nn.Linear):
            by_algorithm.setdefault(scheme.weights.algorithm, []).append(name)
    for algorithm in ("gptq", "awq"):
        if by_algorithm.get(algorithm):
            _, blocks = find_blocks(model, by_algorithm[algorithm], algorithm)
            if algorithm == "awq":
                model_family(model, blocks[0], config)
    if config.smoothquant is not None:
        w8a8 = [n for n, s in chosen.items() if s.activations is not None and isinstance(modules[n], nn.Linear)]
        if not w8a8:
            raise BitsmithError("smoothquant smooths int8 activations: the recipe quantizes no layer's activations")
        _, blocks = find_blocks(model, w8a8, "smoothquant")
        if config.mappings is None:
            family_for(model, blocks[0], config.family)


def quantize_(
    model: nn.Module, config: QuantizeConfig | Recipe, calibration: Iterable | None = None, progress=None
) -> QuantizeReport:
    """Quantize ``model`` in place, all or nothing (see the module docstring).

    Schemes with static activations, GPTQ, AWQ and SmoothQuant need ``calibration``: an iterable of model
    inputs (tensors, tuples of tensors, or keyword dicts), run through the model to observe its layers."""
    recipe_dict = config.model_dump(mode="json")
    if isinstance(config, Recipe):
        config = config.quantize
    chosen, skipped = plan(model, config)
    if calibration is not None:
        calibration = calibration_batches(calibration)
    _check_recipe(model, chosen, config, calibration)
    report = QuantizeReport(skipped=skipped)
    untied = _untied_tables(model, chosen)
    with all_or_nothing(model):
        _run(model, config, chosen, calibration, report, progress)
        for name, text in untied.items():
            report.note(name, text)
        model.bitsmith_recipe = recipe_dict
        model.bitsmith_skipped = {**getattr(model, "bitsmith_skipped", {}), **report.skipped}
        model.bitsmith_notes = {**getattr(model, "bitsmith_notes", {}), **report.notes}
        model.bitsmith_quantized = {**getattr(model, "bitsmith_quantized", {}), **report.quantized}
    return report


def _run(model, config: QuantizeConfig, chosen: dict[str, Scheme], calibration, report: QuantizeReport, progress):
    chosen = dict(chosen)
    static = {name: scheme for name, scheme in chosen.items() if scheme.is_static}
    stats, fusable = {}, {}
    if config.smoothquant is not None:
        w8a8 = {n: s for n, s in chosen.items() if s.activations is not None}
        done = smoothquant_(model, w8a8, config, calibration, progress)
        for name, text in done.pop("layer_notes", {}).items():
            report.note(name, text)
        report.prepared["smoothquant"] = done
    if static:
        report.prepared.update(prepare_static_(model, config))
        stats = collect_activation_stats(model, static, calibration, progress)
        fusable = relu_followers(model)
    modules = dict(model.named_modules())
    gptq = {n: s for n, s in chosen.items() if s.weights.algorithm == "gptq" and isinstance(modules[n], nn.Linear)}
    if gptq:
        infos = gptq_sequential_(model, gptq, config.gptq, calibration, run_batch, progress)
        for name, info in infos.items():
            done, note = gptq_note(info, config.gptq)
            report.quantized[name] = chosen.pop(name).describe(done)
            if note:
                report.note(name, note)
        for name in set(gptq) - set(infos):  # outside the repeated blocks: no block inputs to calibrate on
            report.note(name, "outside the repeated blocks: round-to-nearest instead of gptq")
    awq = {n: s for n, s in chosen.items() if s.weights.algorithm == "awq" and isinstance(modules[n], nn.Linear)}
    if awq:
        infos, awq_notes = awq_sequential_(model, awq, config, calibration, run_batch, progress)
        for name, info in infos.items():
            report.quantized[name] = chosen.pop(name).describe("rtn" if info.get("no_data") else "awq")
        for name, text in awq_notes.items():
            report.note(name, text)
        for name in set(awq) - set(infos):
            report.note(name, "outside the repeated blocks: round-to-nearest instead of awq")
        report.prepared["awq"] = {n: i for n, i in infos.items() if i}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, scheme in chosen.items():
            module = modules[name]
            done = scheme.describe("rtn")
            if name in static:
                if stats[name].count == 0:
                    report.skipped[name] = "saw no calibration data: no activation range to fix; left in float"
                    continue
                new = build_static(module, stats[name], scheme, fusable.get(name) is not None, config.bias_correction)
                if name in fusable:  # the ReLU now runs inside the int8 kernel
                    parent, index = fusable[name]
                    parent[index] = nn.Identity()
            elif isinstance(module, nn.Linear):
                new = quantize_linear(name, module, scheme)
            else:
                new = _quantize_embedding(module, scheme)
            model.set_submodule(name, new, strict=True)
            report.quantized[name] = done
            if progress is not None:
                progress(name)
