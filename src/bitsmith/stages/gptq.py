"""GPTQ inside one block (the block runner calls it): layers grouped by the tensor they read, in execution
order (true-sequential); each group's Hessians accumulated on the block's inputs, then GPTQ quantizes the
group (algorithms/gptq.py), so later groups see the quantized outputs."""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.algorithms.gptq import gptq_quantize
from bitsmith.pipeline.blocks import execution_groups, input_statistics
from bitsmith.recipe.schemes import Scheme
from bitsmith.recipe.stages import GPTQOptions
from bitsmith.stages.methods import BlockMethod, register_method
from bitsmith.stages.weights import fake_quantize_, group_size

__all__ = ["gptq_block_", "gptq_note"]


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


def _quantize_layer(local: str, linear: nn.Linear, scheme: Scheme, hessian, options: GPTQOptions, pending: list,
                    sparse: bool):
    w = scheme.weights
    keep = linear.weight.detach() != 0 if sparse else None  # pruned earlier in the recipe: the zeros stay
    if hessian is None:  # the layer never ran on calibration data: zero Hessian -> RTN inside gptq_quantize
        hessian = torch.zeros(linear.in_features, linear.in_features)
    qweight, info = gptq_quantize(
        linear.weight.detach(), hessian, w.bits, group_size(linear, scheme), w.symmetric, act_order=options.act_order,
        static_groups=True, damp_percent=options.damp_percent, block_size=options.block_size, clip=w.clip, keep=keep,
    )
    fake_quantize_(linear, qweight, pending, local, scheme)
    return info


def gptq_block_(block: nn.Module, names: dict[str, str], schemes: dict[str, Scheme], inputs: list, config,
                pending: list, report, context, state=None) -> None:
    """GPTQ on one block's targets (local -> full names), group by group in execution order; the quantized
    layers stay fake-quantized (``pending``) until ``finish_block_``. Layers an earlier stage pruned keep
    their zeros (SparseGPT's joint form: the kept weights absorb the error)."""
    options = config.gptq
    sparse = context.sparse_layers()
    groups = execution_groups(block, names, inputs) if options.true_sequential else [list(names.values())]
    local_of = {full: local for local, full in names.items()}
    for group in groups:
        statistics = input_statistics(block, {local_of[f]: f for f in group}, inputs)
        for full in group:
            local = local_of[full]
            info = _quantize_layer(local, block.get_submodule(local), schemes[full], statistics[full][0], options,
                                   pending, full in sparse)
            done, note = gptq_note(info, options)
            if full in sparse:
                report.note(full, "pruned by an earlier stage: its zeros kept, the error moved to the kept weights")
            report.done(full, schemes[full].describe(done), asked=schemes[full].describe())
            if note:
                report.note(full, note)
            if context.progress is not None:
                context.progress(full)


register_method("gptq", BlockMethod(calibrated=True, quantize_block=gptq_block_))
