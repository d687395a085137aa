"""The quantize stage, and ``quantize_(model, config)``: replace matching layers in place with quantized
runtime modules.

All or nothing: every target and the whole recipe are checked before the model changes (schemes against
layers, NaN weights, repeated blocks and model families for GPTQ / AWQ, calibration data), and a failure
that only shows later (a calibration batch the model rejects) puts the model back exactly as it was.

    layers                                  | how
    static int8 activations (Linear/Conv2d) | input ranges observed on the whole model, then built (stages/static.py)
    Linear inside the repeated blocks       | the block runner, by method (stages/methods.py: rtn, gptq, awq),
      (when a method calibrates, or blocks  |   calibrated methods first in each block
      come from disk)                       |
    everything else                         | round-to-nearest (a calibrated method outside the blocks says so)

Every layer's outcome is reported: what was done (e.g. ``w4 g128 asym a16 gptq``), what was asked where that
differs, layers kept in float and why, and notes (GPTQ fell back to round-to-nearest, damping was
escalated, no AWQ scale could be folded, ...).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bitsmith.algorithms._modules import replace_module
from bitsmith.errors import BitsmithError
from bitsmith.nn import QUANTIZED_MODULES
from bitsmith.pipeline.blocks import block_targets, find_blocks
from bitsmith.pipeline.registry import register_stage
from bitsmith.pipeline.report import Report, StageReport
from bitsmith.pipeline.run import Context, run_stages
from bitsmith.recipe.recipe import Recipe
from bitsmith.recipe.schemes import Rule, Scheme, target_matches
from bitsmith.recipe.stages import QuantizeConfig
from bitsmith.stages.methods import METHODS, BlockMethod, register_method
from bitsmith.stages.static import build_static, collect_activation_stats, relu_followers
from bitsmith.stages.weights import finish_block_, quantize_embedding, quantize_linear

__all__ = ["quantize_", "plan", "cannot_quantize"]

SUPPORTED_TYPES = (nn.Linear, nn.Embedding, nn.Conv2d)


def cannot_quantize(module: nn.Module, scheme: Scheme) -> str | None:
    """Why this scheme cannot run on this layer, or None."""
    w = scheme.weights
    if isinstance(module, nn.Conv2d):
        if not scheme.is_static:
            return "Conv2d is quantized only by static schemes (symmetric int weights, calibrated int8 activations)"
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return "Conv2d with string padding or a non-zero padding mode has no int8 kernel"
    elif w.is_lookup:
        if isinstance(module, nn.Embedding):
            return f"{w.dtype} weights apply to Linear layers; give embeddings an integer or fp16/bf16 scheme"
        if isinstance(w.granularity, int) and module.in_features % w.granularity:
            return f"{w.dtype} groups of {w.granularity} do not divide its {module.in_features} inputs"
    elif isinstance(module, nn.Embedding):
        if scheme.activations is not None:
            return "an Embedding is a lookup: activation quantization does not apply to it"
        if w.bits is not None and w.granularity not in ("channel",) and not isinstance(w.granularity, int):
            return "embeddings are quantized per row (granularity: channel) or per group of a row (a group size)"
        if isinstance(w.granularity, int) and module.embedding_dim % w.granularity:
            return f"groups of {w.granularity} do not divide its {module.embedding_dim} values per row"
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
                reason = cannot_quantize(module, rule.scheme)
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
    if weight.device.type == "meta":  # blocks still on disk: the checkpoint was checked tensor by tensor
        return
    if not torch.isfinite(weight).all():
        raise BitsmithError(f"layer '{name}' has NaN or infinite weights; fix the model before quantizing")


def _block_linears(model: nn.Module, chosen: dict[str, Scheme]) -> dict[str, Scheme]:
    """The Linear layers a block method (stages/methods.py) may quantize: every one without static activations."""
    modules = dict(model.named_modules())
    return {n: s for n, s in chosen.items() if not s.is_static and isinstance(modules[n], nn.Linear)}


def _calibrated(targets: dict[str, Scheme]) -> dict[str, Scheme]:
    return {n: s for n, s in targets.items() if METHODS[s.weights.algorithm].calibrated}


def _blocks_for(model: nn.Module, targets: dict[str, Scheme], context: Context):
    calibrated = _calibrated(targets)
    what = "the block-by-block pipeline" if context.offloaded else next(iter(calibrated.values())).weights.algorithm
    try:
        return find_blocks(model, calibrated or targets, what)
    except BitsmithError:
        if context.offloaded:
            raise
        # every calibrated target lies outside the repeated blocks (a per-layer mix giving GPTQ to a pooler alone):
        # they get round-to-nearest with a note, as outside-block layers of a whole-model recipe do
        # (by every module's name: an earlier stage of the recipe may have replaced every Linear of the blocks)
        return find_blocks(model, None, what)


def _check(model: nn.Module, config: QuantizeConfig, context: Context) -> None:
    """Everything that can be known before the model changes."""
    if context.offloaded and config.is_static:
        raise BitsmithError("the block-by-block pipeline quantizes weights (rtn, gptq, awq) and dynamic W8A8 only")
    chosen, _ = plan(model, config)
    modules = dict(model.named_modules())
    for name in chosen:
        _check_finite(name, modules[name].weight)
    targets = _block_linears(model, chosen)
    if _calibrated(targets) or context.offloaded:
        _, blocks = _blocks_for(model, targets, context)
        for algorithm in {s.weights.algorithm for s in targets.values()}:
            if METHODS[algorithm].start is not None:
                METHODS[algorithm].start(model, blocks[0], config)  # e.g. AWQ: a model family must match


def _quantize_blocks(model: nn.Module, config: QuantizeConfig, targets: dict[str, Scheme], context: Context,
                     report: StageReport) -> set[str]:
    """The block runner over the targets inside the repeated blocks; returns the names it quantized."""
    prefix, blocks = _blocks_for(model, targets, context)
    inside = {n: s for n, s in targets.items() if n.startswith(prefix + ".")}
    # calibrated methods first (they measure each block before round-to-nearest changes it), then in the
    # order they are registered (stages/__init__.py: gptq before awq)
    registered = list(METHODS)
    order = sorted({s.weights.algorithm for s in inside.values()},
                   key=lambda m: (not METHODS[m].calibrated, registered.index(m)))
    states = {m: METHODS[m].start(model, blocks[0], config) for m in order if METHODS[m].start is not None}
    batches = context.calibration if _calibrated(inside) else None

    def work(index: int, block: nn.Module, inputs):
        names = block_targets(prefix, index, inside)
        pending = []
        for method in order:
            mine = {local: full for local, full in names.items() if inside[full].weights.algorithm == method}
            if mine:
                METHODS[method].quantize_block(block, mine, inside, inputs, config, pending, report, context,
                                               states.get(method))
        return lambda: finish_block_(block, pending)

    context.run_blocks(model, prefix, blocks, batches, work)
    return set(inside)


def _joins(model: nn.Module, config: QuantizeConfig, context: Context) -> str | None:
    """The blocks of the calibrated pass this stage will run (GPTQ, AWQ), so that an earlier stage's offered
    block work (pruning) runs in it; None with static activations (observed on the model as it comes)."""
    if context.offloaded or config.is_static:
        return None
    chosen, _ = plan(model, config)
    targets = _block_linears(model, chosen)
    if not _calibrated(targets) or context.calibration is None:
        return None
    return _blocks_for(model, targets, context)[0]


def _rtn_block(block: nn.Module, names: dict[str, str], schemes: dict[str, Scheme], inputs, config, pending: list,
               report: StageReport, context: Context, state=None) -> None:
    with torch.no_grad():
        for local, full in names.items():
            replace_module(block, local, quantize_linear(block.get_submodule(local), schemes[full]))
            report.done(full, schemes[full].describe("rtn"), asked=schemes[full].describe())
            if context.progress is not None:
                context.progress(full)


register_method("rtn", BlockMethod(calibrated=False, quantize_block=_rtn_block))


@register_stage(QuantizeConfig, check=_check, offload=True, joins=_joins)
def quantize_stage(model: nn.Module, config: QuantizeConfig, context: Context, report: StageReport) -> None:
    chosen, skipped = plan(model, config)
    for name, why in skipped.items():
        report.skip(name, why)
    untied = _untied_tables(model, chosen)
    static = {name: scheme for name, scheme in chosen.items() if scheme.is_static}
    stats = collect_activation_stats(model, static, context.calibration, context.progress) if static else {}
    fusable = relu_followers(model) if static else {}
    targets = _block_linears(model, chosen)
    done = set()
    if _calibrated(targets) or context.offloaded:
        done = _quantize_blocks(model, config, targets, context, report)
    with torch.no_grad():
        for name, scheme in chosen.items():
            if name in done:
                continue
            module = model.get_submodule(name)
            if name in static:
                if stats[name].count == 0:
                    report.skip(name, "saw no calibration data: no activation range to fix; left in float")
                    continue
                new = build_static(module, stats[name], scheme, fusable.get(name) is not None, config.bias_correction)
                if name in fusable:  # the ReLU now runs inside the int8 kernel
                    parent, index = fusable[name]
                    replace_module(parent, list(parent._modules)[index], nn.Identity())
            elif isinstance(module, nn.Linear):
                new = quantize_linear(module, scheme)
                if scheme.weights.algorithm != "rtn":
                    report.note(name, f"outside the repeated blocks: round-to-nearest instead of {scheme.weights.algorithm}")
            else:
                new = quantize_embedding(module, scheme)
            replace_module(model, name, new)
            report.done(name, scheme.describe("rtn"), asked=scheme.describe())
            if context.progress is not None:
                context.progress(name)
    for name, text in untied.items():
        report.note(name, text)


def quantize_(model: nn.Module, config: QuantizeConfig | Recipe, calibration: Iterable | None = None,
              progress=None) -> Report:
    """Quantize ``model`` in place, all or nothing (see the module docstring). A ``Recipe`` runs all its stages
    (e.g. smooth, then quantize).

    Schemes with static activations, GPTQ, AWQ and SmoothQuant need ``calibration``: an iterable of model
    inputs (tensors, tuples of tensors, or keyword dicts), run through the model to observe its layers."""
    recipe = Recipe.of(config, "quantize_")
    return run_stages(model, recipe, calibration, progress=progress)
