"""Block-by-block GPTQ: calibration runs one block (encoder/decoder layer) at a time.

1. The calibration batches run up to the first block, whose inputs (args and kwargs) are kept.
2. For each block, in order: its target Linears are grouped by the tensor they read (q/k/v share
   one), in execution order; for each group (true-sequential) the block runs on the kept inputs
   with hooks accumulating each Linear's Hessian, then GPTQ quantizes the group and it is replaced
   by its runtime module, so later groups see quantized outputs.
3. The quantized block runs once more; its outputs are the next block's inputs.

Only one block's inputs and outputs are held at a time, which is what lets models larger than
memory be quantized when blocks are loaded from disk one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bitsmith.algorithms.gptq import accumulate_hessian, gptq_quantize
from bitsmith.api.config import GPTQOptions, Scheme
from bitsmith.errors import BitsmithError
from bitsmith.nn import Int8WeightOnlyLinear, IntxWeightOnlyLinear

__all__ = ["find_blocks", "gptq_sequential_"]


class _Stop(Exception):
    """Raised by the hook on the first block once its inputs are captured."""


def find_blocks(model: nn.Module, targets: Iterable[str]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated layers holding the most targets (e.g. ``encoder.layer``, ``model.layers``)."""
    targets = list(targets)
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            count = sum(t.startswith(f"{name}.") for t in targets)
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise BitsmithError("gptq needs a model made of repeated blocks (an nn.ModuleList of layers); none found")
    return best


def _capture_inputs(model: nn.Module, first: nn.Module, batches: Iterable, run_batch) -> list:
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                try:
                    run_batch(model, batch)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if not captured:
        raise BitsmithError("the calibration set is empty: gptq needs at least one sample")
    return captured


def _run_block(block: nn.Module, inputs: list) -> list:
    outputs = []
    with torch.inference_mode():
        for args, kwargs in inputs:
            out = block(*args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            outputs.append(((hidden, *args[1:]), kwargs))
    return outputs


def _execution_groups(block: nn.Module, names: dict[str, str], inputs: list) -> list[list[str]]:
    """Target Linears of the block grouped by the input tensor they read, in execution order."""
    seen: dict[int, list[str]] = {}
    alive = []  # keeps every input tensor referenced, so no two share an id() during the run
    handles = []
    for local, full in names.items():
        def hook(module, args, full=full):
            alive.append(args[0])
            seen.setdefault(id(args[0]), [])
            if full not in seen[id(args[0])]:
                seen[id(args[0])].append(full)

        handles.append(block.get_submodule(local).register_forward_pre_hook(hook))
    try:
        _run_block(block, inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
    groups = list(seen.values())
    missing = set(names.values()) - {n for g in groups for n in g}
    return groups + ([sorted(missing)] if missing else [])


def _hessians(block: nn.Module, locals_: dict[str, str], inputs: list) -> dict[str, tuple]:
    state = {full: (None, 0) for full in locals_.values()}
    handles = []
    for local, full in locals_.items():
        def hook(module, args, full=full):
            state[full] = accumulate_hessian(*state[full][:1], args[0], state[full][1])

        handles.append(block.get_submodule(local).register_forward_pre_hook(hook))
    try:
        _run_block(block, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return state


def _replace(block: nn.Module, local: str, linear: nn.Linear, scheme: Scheme, hessian, options: GPTQOptions):
    w = scheme.weights
    group = w.granularity if isinstance(w.granularity, int) else None
    if w.granularity == "tensor":
        raise BitsmithError("gptq quantizes per channel or per group, not per tensor")
    if hessian is None:  # the layer never ran on calibration data: zero Hessian -> RTN inside gptq_quantize
        hessian = torch.zeros(linear.in_features, linear.in_features)
    qweight, info = gptq_quantize(
        linear.weight.detach(), hessian, w.bits, group, w.symmetric, act_order=options.act_order,
        static_groups=True, damp_percent=options.damp_percent, block_size=options.block_size, clip=w.clip,
    )
    if w.bits == 8 and w.symmetric:
        new = Int8WeightOnlyLinear.from_quantized(qweight, linear.bias)
    else:
        new = IntxWeightOnlyLinear.from_quantized(qweight, linear.bias)
    parent_name, _, child = local.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, new)
    return info


def gptq_sequential_(
    model: nn.Module, targets: dict[str, Scheme], options: GPTQOptions, batches: Iterable, run_batch, progress=None
) -> dict[str, dict]:
    """Quantize ``targets`` (names of nn.Linear inside the model's blocks) with GPTQ, block by block.
    Returns GPTQ's info per layer; targets outside the blocks are left for the caller."""
    prefix, blocks = find_blocks(model, targets)
    inputs = _capture_inputs(model, blocks[0], batches, run_batch)
    infos = {}
    for index, block in enumerate(blocks):
        block_prefix = f"{prefix}.{index}."
        names = {t[len(block_prefix):]: t for t in targets if t.startswith(block_prefix)}
        groups = _execution_groups(block, names, inputs) if options.true_sequential else [list(names.values())]
        local_of = {full: local for local, full in names.items()}
        for group in groups:
            state = _hessians(block, {local_of[f]: f for f in group}, inputs)
            for full in group:
                linear = block.get_submodule(local_of[full])
                infos[full] = _replace(block, local_of[full], linear, targets[full], state[full][0], options)
                if progress is not None:
                    progress(full)
        inputs = _run_block(block, inputs)
    return infos
