"""The prune stage, and ``prune_(model, config)``: set weights of Linear layers to zero in place.

    method     | how (algorithms/prune.py)
    magnitude  | the smallest |W| of each layer (or of all targets together, ``scope: global``)
    wanda      | the smallest |W| * ||x_j|| of each output row, on the inputs each block really sees
    sparsegpt  | SparseGPT's mask selection and OBS update, every layer of a block on the block's inputs (or layer group by
               | layer group with ``sparsegpt: {true_sequential: true}``)

Wanda and SparseGPT run in the one block runner (pipeline/blocks.py): each block is pruned on the outputs of
the blocks already pruned, as in both papers. Layers outside the repeated blocks get magnitude pruning, and
their report says so. The pruned layers stay ``nn.Linear`` (saved as a bitmask and the kept values): a later quantize
stage quantizes them like any float layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bitsmith.algorithms._modules import assign_
from bitsmith.algorithms.prune import keep_mask, sparsegpt_prune, sparsity_of, wanda_scores
from bitsmith.errors import BitsmithError
from bitsmith.nn import QUANTIZED_MODULES
from bitsmith.pipeline.blocks import block_targets, execution_groups, find_blocks, input_statistics, run_blocks
from bitsmith.pipeline.calibration import run_batch
from bitsmith.pipeline.registry import register_stage
from bitsmith.pipeline.report import Report, StageReport
from bitsmith.pipeline.run import Context, run_stages
from bitsmith.recipe.recipe import Recipe
from bitsmith.recipe.schemes import target_matches
from bitsmith.recipe.stages import PruneConfig, PruneRule

__all__ = ["prune_", "prune_plan"]


def prune_plan(model: nn.Module, config: PruneConfig) -> dict[str, PruneRule]:
    """Layer -> the rule it is pruned by (first matching rule wins). A rule naming a layer exactly that cannot
    be pruned (not a Linear, or already quantized) is an error; type and regex matches skip such modules."""
    chosen = {}
    for name, module in model.named_modules():
        type_name = type(module).__name__
        if not name or any(target_matches(t, name, type_name) for t in config.ignore):
            continue
        for index, rule in enumerate(config.rules):
            if not any(target_matches(t, name, type_name) for t in rule.targets):
                continue
            named = name in rule.targets
            if isinstance(module, QUANTIZED_MODULES) and (named or type_name in rule.targets
                                                          or "Linear" in rule.targets):
                raise BitsmithError(f"layer '{name}' is already quantized ({module.scheme}), named by prune rule"
                                    f" {index + 1}: prune before quantizing (list prune before quantize)")
            if type(module) is nn.Linear:
                if rule.fraction is not None:
                    if rule.nm is not None and module.in_features % rule.nm[1]:
                        raise BitsmithError(f"layer '{name}' has {module.in_features} inputs: the {rule.pattern}"
                                            f" pattern of prune rule {index + 1} needs whole groups of {rule.nm[1]}")
                    chosen[name] = rule
            elif named:
                raise BitsmithError(f"layer '{name}' ({type_name}), named by prune rule {index + 1}: prune applies"
                                    " to Linear layers")
            break
    return chosen


def _label(rule: PruneRule, method: str) -> str:
    shape = rule.pattern if rule.nm is not None else f"{rule.sparsity:.0%} unstructured"
    return f"{shape} {method}"


def _set(model_or_block: nn.Module, local: str, weight: torch.Tensor) -> None:
    assign_(model_or_block.get_submodule(local), "weight", weight)  # a new tensor: undo restores the old one


def _magnitude(model: nn.Module, chosen: dict[str, PruneRule], scope: str, report: StageReport) -> None:
    with torch.no_grad():
        threshold = None
        if scope == "global":  # one threshold over every target: the same kth-smallest |w| for all
            sparsity = next(iter(chosen.values())).sparsity
            scores = torch.cat([model.get_submodule(n).weight.detach().abs().flatten() for n in chosen])
            threshold = scores.kthvalue(max(1, int(scores.numel() * sparsity))).values if sparsity > 0 else None
        for name, rule in chosen.items():
            weight = model.get_submodule(name).weight.detach()
            if threshold is not None:
                keep = weight.abs() > threshold
            else:
                keep = keep_mask(weight.abs(), rule.sparsity or 0.0, rule.nm)
            _set(model, name, weight * keep)
            report.done(name, _label(rule, "magnitude" + (" global" if threshold is not None else "")))
            report.summary.setdefault("sparsity", {})[name] = round(sparsity_of(weight * keep), 4)


def _calibrated_block(config: PruneConfig, chosen: dict[str, PruneRule], report: StageReport, progress):
    """The work of one block for the block runner: Wanda or SparseGPT on its targets."""
    options = config.sparsegpt

    def prune_group(block: nn.Module, names: dict[str, str], inputs: list) -> None:
        statistics = input_statistics(block, names, inputs)  # full -> (H, rows)
        for local, full in names.items():
            rule, weight = chosen[full], block.get_submodule(local).weight.detach()
            hessian = statistics[full][0]
            if config.method == "wanda":
                if hessian is None:
                    hessian = torch.zeros(weight.shape[1])
                    report.note(full, "saw no calibration data: magnitude scores instead of wanda")
                keep = keep_mask(wanda_scores(weight, hessian), rule.sparsity or 0.0, rule.nm, per_row=True)
                pruned = weight * keep
            else:
                if hessian is None:
                    hessian = torch.zeros(weight.shape[1], weight.shape[1])
                pruned, info = sparsegpt_prune(weight, hessian, rule.fraction, rule.nm, options.block_size,
                                               options.damp_percent)
                if info["fallback"] == "magnitude":
                    report.note(full, "saw no calibration data: magnitude pruning instead of sparsegpt")
                elif info["fallback"] == "diagonal":
                    report.note(full, "Hessian not positive definite at any damping: pruned with no weight update")
            _set(block, local, pruned.to(weight.dtype))
            report.done(full, _label(rule, config.method))
            report.summary.setdefault("sparsity", {})[full] = round(sparsity_of(pruned), 4)
            if progress is not None:
                progress(full)

    def work(prefix: str):
        def run(index: int, block: nn.Module, inputs):
            names = block_targets(prefix, index, chosen)
            if not names:
                return None
            sequential = config.method == "sparsegpt" and options.true_sequential
            groups = execution_groups(block, names, inputs) if sequential else [list(names.values())]
            local_of = {full: local for local, full in names.items()}
            for group in groups:  # later groups see the pruned outputs of earlier ones
                prune_group(block, {local_of[f]: f for f in group}, inputs)
            return None

        return run

    return work


def _check(model: nn.Module, config: PruneConfig, context: Context) -> None:
    chosen = prune_plan(model, config)
    for name in chosen:
        weight = model.get_submodule(name).weight
        if weight.device.type != "meta" and not torch.isfinite(weight).all():
            raise BitsmithError(f"layer '{name}' has NaN or infinite weights; fix the model before pruning")
    if config.method != "magnitude" and chosen:
        find_blocks(model, chosen, config.method)
    if config.scope == "global" and len({r.sparsity for r in chosen.values()}) > 1:
        raise BitsmithError("a global magnitude threshold needs one sparsity for every target")


@register_stage(PruneConfig, check=_check, why_not_offload="pruned float blocks are not written from disk yet")
def prune_stage(model: nn.Module, config: PruneConfig, context: Context, report: StageReport) -> None:
    chosen = prune_plan(model, config)
    sizes = [model.get_submodule(n).weight.numel() for n in chosen]

    def summarize() -> None:
        zeros = sum(report.summary.get("sparsity", {}).get(n, 0.0) * size for n, size in zip(chosen, sizes))
        report.summary["pruned_layers"] = len(chosen)
        report.summary["overall_sparsity"] = round(zeros / max(sum(sizes), 1), 4)

    if config.method == "magnitude" or not chosen:
        _magnitude(model, chosen, config.scope, report)
        summarize()
        return
    prefix, blocks = find_blocks(model, chosen, config.method)
    inside = {n: r for n, r in chosen.items() if n.startswith(prefix + ".")}
    outside = {n: r for n, r in chosen.items() if n not in inside}
    work = _calibrated_block(config, inside, report, context.progress)(prefix)

    def finish(shared: bool) -> None:  # after the block pass: the layers outside the blocks, then the summary
        if shared:
            report.summary["pass"] = "one block pass with the next stage"
        if outside:
            _magnitude(model, outside, "layer", report)
            for name in outside:
                report.note(name, f"outside the repeated blocks: magnitude pruning instead of {config.method}")
        summarize()

    if context.offer(prefix, blocks, work, finish):  # e.g. GPTQ after: one pass, each block pruned then quantized
        return
    run_blocks(model, blocks, context.blocks, context.calibration, work, run_batch)
    finish(False)


def prune_(model: nn.Module, config: PruneConfig | Recipe, calibration: Iterable | None = None,
           progress=None) -> Report:
    """Prune ``model`` in place, all or nothing (see the module docstring); Wanda and SparseGPT need
    ``calibration`` (model inputs, as for ``quantize_``). A ``Recipe`` runs all its stages."""
    recipe = Recipe.of(config, "prune_")
    return run_stages(model, recipe, calibration, progress=progress)
