"""The distill stage: the model as the earlier stages left it trains to follow the float model.

    recipe                                   | student
    prune_structured, then distill           | the structurally pruned model (Minitron's recovery)
    distill with keep_blocks: N              | N of the repeated blocks, evenly spaced, from the teacher's weights
                                             |   (DistilBERT: every other layer)
    distill, then quantize / qat             | recovered first, then quantized

Training is ``stages/training.py``'s loop (loss on the output, ``match`` layers by MSE), every float parameter
of the student trained.
"""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.algorithms._modules import replace_module
from bitsmith.errors import BitsmithError
from bitsmith.pipeline.blocks import find_blocks
from bitsmith.pipeline.registry import register_stage
from bitsmith.pipeline.report import StageReport
from bitsmith.pipeline.run import Context
from bitsmith.recipe.stages import DistillConfig
from bitsmith.stages.training import (check_training, checkpoints_for, own_parameters_, sparsity_masks,
                                      teacher_for, train_to_teacher)

__all__ = ["kept_blocks", "cut_blocks_"]


def kept_blocks(count: int, keep: int) -> list[int]:
    """``keep`` of ``count`` block indices, evenly spaced from the first (30 -> 15: 0, 2, ..., 28)."""
    return sorted({(i * count) // keep for i in range(keep)})


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    return find_blocks(model, None, "distill's keep_blocks")


def cut_blocks_(model: nn.Module, keep: int) -> tuple[str, list[int]]:
    """Keep ``keep`` of the model's repeated blocks (the others removed), in place; the model's config and each
    attention's ``layer_idx`` (its KV-cache slot) follow. Returns (blocks' name, kept indices)."""
    prefix, blocks = _blocks(model)
    indices = kept_blocks(len(blocks), keep)
    replace_module(model, prefix, nn.ModuleList([blocks[i] for i in indices]))
    for new_index, block in enumerate(model.get_submodule(prefix)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(indices)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == len(blocks):
            config.layer_types = [layer_types[i] for i in indices]
    return prefix, indices


def _check(model: nn.Module, config: DistillConfig, context: Context) -> None:
    if context.offloaded:
        raise BitsmithError("distill trains the whole model in memory; run it without --offload")
    if config.keep_blocks is not None:
        _, blocks = _blocks(model)
        if config.keep_blocks >= len(blocks):
            raise BitsmithError(f"distill: keep_blocks {config.keep_blocks} is not fewer than the model's"
                                f" {len(blocks)} blocks")
    check_training(model, config, context, "distill")


@register_stage(DistillConfig, check=_check, why_not_offload="it trains the whole model in memory")
def distill_stage(model: nn.Module, config: DistillConfig, context: Context, report: StageReport) -> None:
    teacher = teacher_for(model, context) if config.loss != "text" else None
    own_parameters_(model)
    if config.keep_blocks is not None:
        prefix, indices = cut_blocks_(model, config.keep_blocks)
        report.summary["kept_blocks"] = {"blocks": prefix, "indices": indices}
    was_training = model.training
    model.eval()  # dropout off: the student follows the teacher's deterministic outputs
    torch.manual_seed(config.seed)
    params = list(dict.fromkeys(p for p in model.parameters() if p.is_floating_point()))  # tied ones once
    masks = sparsity_masks(model, context.sparse_layers())  # a pruned layer keeps its zeros
    checkpoints = checkpoints_for(context, config, "distill", params, context.calibration)
    report.summary.update(train_to_teacher(model, teacher, config, context.calibration, params, "distill",
                                           context.progress, masks, checkpoints))
    if masks:
        report.summary["kept_zeros_of"] = len(masks)
    model.train(was_training)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            report.done(name, "distilled")
