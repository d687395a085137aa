"""Block-by-block GPTQ and AWQ: calibration runs one block (encoder/decoder layer) at a time.

1. The calibration batches run up to the first block, whose inputs (args and kwargs) are kept.
2. For each block, in order: its target Linears are grouped by the tensor they read (q/k/v share
   one), in execution order; for each group (true-sequential) the block runs on the kept inputs
   with hooks accumulating each Linear's Hessian, then GPTQ quantizes the group and it is replaced
   by its runtime module, so later groups see quantized outputs.
3. The quantized block runs once more; its outputs are the next block's inputs.

AWQ is the same loop with one statistics pass per block (each input's Gram matrix and mean
magnitude), then a scale search per mapping of the model family (algorithms/families.yaml), the
scales folded into the previous operation, a clipping search per layer, and round-to-nearest.

Only one block's inputs and outputs are held at a time, which is what lets models larger than
memory be quantized when blocks are loaded from disk one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bitsmith.algorithms._modules import assign_
from bitsmith.algorithms.gptq import accumulate_hessian, dequantize_weight, gptq_quantize
from bitsmith.algorithms.rtn import QuantizedWeight
from bitsmith.algorithms.smooth import awq_clip_ratios, awq_scales, fold_scales_, quantize_weight_ranged
from bitsmith.api.calibrate import call_on_calibration
from bitsmith.api.config import AWQOptions, GPTQOptions, QuantizeConfig, Scheme
from bitsmith.api.families import custom_family, family_for, resolve_block
from bitsmith.errors import BitsmithError
from bitsmith.nn import Int8WeightOnlyLinear, IntxWeightOnlyLinear

__all__ = ["find_blocks", "gptq_sequential_", "awq_sequential_", "finish_block_"]


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _Stop(Exception):
    """Raised by the hook on the first block once its inputs are captured."""


def find_blocks(model: nn.Module, targets: Iterable[str], what: str = "this method") -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated layers holding the most targets (e.g. ``encoder.layer``, ``model.layers``)."""
    targets = list(targets)
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            count = sum(t.startswith(f"{name}.") for t in targets)
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise BitsmithError(f"{what} needs a model made of repeated blocks (an nn.ModuleList of layers); none found")
    return best


def _capture_inputs(model: nn.Module, first: nn.Module, batches: Iterable, run_batch) -> list:
    captured = []

    def hook(module, args, kwargs):
        # a KV cache passed down the blocks would grow with every block run on these inputs
        kwargs = {k: (None if k in _CACHE_KWARGS or "Cache" in type(v).__name__ else v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
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
        raise BitsmithError("the calibration set is empty: gptq and awq need at least one sample")
    return captured


def _run_block(block: nn.Module, inputs: list) -> list:
    outputs = []
    with torch.inference_mode():
        for args, kwargs in inputs:
            out = call_on_calibration(block, *args, **kwargs)
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


def _hessians(block: nn.Module, locals_: dict[str, str], inputs: list, absmean: bool = False) -> dict[str, tuple]:
    """Per target: (H, rows) from ``accumulate_hessian``, plus mean |x| per input channel with ``absmean``.

    Targets that read the same tensor (q/k/v) share one accumulation. Each batch runs only as far
    into the block as the last target's input: the rest of the block is not needed for these."""
    state = {full: (None, 0) for full in locals_.values()}
    sums = {}
    handles = []
    fired: set[str] = set()
    readers: dict[int, tuple[torch.Tensor, str]] = {}  # this batch: id(input) -> (input, first target)
    same_input: dict[str, str] = {}  # target -> the target whose accumulation it shares (first batch)
    first_batch = True

    for local, full in locals_.items():
        def hook(module, args, full=full):
            x = args[0]
            if x.shape[-1] != module.in_features:
                raise BitsmithError(f"a calibration batch does not fit the model ({full} reads {module.in_features}"
                                    f" inputs, got {x.shape[-1]})")
            if first_batch and id(x) in readers and readers[id(x)][0] is x:
                same_input[full] = readers[id(x)][1]
            readers.setdefault(id(x), (x, full))
            if full not in same_input:
                state[full] = accumulate_hessian(*state[full][:1], x, state[full][1])
                if absmean:
                    total = x.detach().reshape(-1, x.shape[-1]).float().abs().sum(dim=0)
                    sums[full] = total if full not in sums else sums[full] + total
            fired.add(full)
            if len(fired) == len(state):
                raise _Stop

        handles.append(block.get_submodule(local).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for args, kwargs in inputs:
                fired.clear()
                readers.clear()
                try:
                    call_on_calibration(block, *args, **kwargs)
                except _Stop:
                    pass
                first_batch = False
    finally:
        for handle in handles:
            handle.remove()
    for full, source in same_input.items():
        state[full] = state[source]
        if source in sums:
            sums[full] = sums[source]
    if absmean:
        return {full: (h, n, sums.get(full, None) if n == 0 else sums[full] / n) for full, (h, n) in state.items()}
    return state


def _fake_quantize_(linear: nn.Linear, qweight: QuantizedWeight, pending: list, local: str, scheme: Scheme) -> None:
    """Give ``linear`` its quantized weight, dequantized, for the rest of the block's calibration runs
    (fp32 math, as fast as the float layer); ``finish_block_`` swaps in the runtime module after."""
    assign_(linear, "weight", dequantize_weight(qweight))  # a new tensor: the caller's weight is untouched
    pending.append((local, qweight, linear.bias, scheme))


def finish_block_(block: nn.Module, pending: list) -> None:
    """Replace the block's fake-quantized Linears by their runtime modules."""
    for local, qweight, bias, scheme in pending:
        _set_quantized(block, local, qweight, bias, scheme)
    pending.clear()


def _set_quantized(block: nn.Module, local: str, qweight: QuantizedWeight, bias, scheme: Scheme) -> None:
    w = scheme.weights
    if w.bits == 8 and w.symmetric and qweight.group_size == qweight.codes.shape[1]:
        new = Int8WeightOnlyLinear.from_quantized(qweight, bias)
    else:
        new = IntxWeightOnlyLinear.from_quantized(qweight, bias)
    block.set_submodule(local, new, strict=True)


def _group_size(linear: nn.Linear, scheme: Scheme) -> int:
    w = scheme.weights
    if w.granularity == "tensor":
        raise BitsmithError(f"{w.algorithm} quantizes per channel or per group, not per tensor")
    return w.granularity if isinstance(w.granularity, int) else linear.in_features


def _replace(block: nn.Module, local: str, linear: nn.Linear, scheme: Scheme, hessian, options: GPTQOptions,
             pending: list):
    w = scheme.weights
    group = _group_size(linear, scheme)
    if hessian is None:  # the layer never ran on calibration data: zero Hessian -> RTN inside gptq_quantize
        hessian = torch.zeros(linear.in_features, linear.in_features)
    qweight, info = gptq_quantize(
        linear.weight.detach(), hessian, w.bits, group, w.symmetric, act_order=options.act_order,
        static_groups=True, damp_percent=options.damp_percent, block_size=options.block_size, clip=w.clip,
    )
    _fake_quantize_(linear, qweight, pending, local, scheme)
    return info


def _gptq_block(block: nn.Module, names: dict[str, str], targets: dict[str, Scheme], inputs: list,
                options: GPTQOptions, pending: list, progress=None) -> dict[str, dict]:
    """GPTQ on one block's targets (local -> full names), group by group in execution order; the
    quantized layers stay fake-quantized (``pending``) until ``finish_block_``."""
    infos = {}
    groups = _execution_groups(block, names, inputs) if options.true_sequential else [list(names.values())]
    local_of = {full: local for local, full in names.items()}
    for group in groups:
        state = _hessians(block, {local_of[f]: f for f in group}, inputs)
        for full in group:
            linear = block.get_submodule(local_of[full])
            infos[full] = _replace(block, local_of[full], linear, targets[full], state[full][0], options, pending)
            if progress is not None:
                progress(full)
    return infos


def block_targets(prefix: str, index: int, targets) -> dict[str, str]:
    """Targets inside block ``index``: local name -> full name."""
    block_prefix = f"{prefix}.{index}."
    return {t[len(block_prefix):]: t for t in targets if t.startswith(block_prefix)}


def gptq_sequential_(
    model: nn.Module, targets: dict[str, Scheme], options: GPTQOptions, batches: Iterable, run_batch, progress=None
) -> dict[str, dict]:
    """Quantize ``targets`` (names of nn.Linear inside the model's blocks) with GPTQ, block by block.
    Returns GPTQ's info per layer; targets outside the blocks are left for the caller."""
    prefix, blocks = find_blocks(model, targets, "gptq")
    inputs = _capture_inputs(model, blocks[0], batches, run_batch)
    infos, pending = {}, []
    for index, block in enumerate(blocks):
        names = block_targets(prefix, index, targets)
        infos.update(_gptq_block(block, names, targets, inputs, options, pending, progress))
        inputs = _run_block(block, inputs)
        finish_block_(block, pending)
    return infos

def _awq_block(block: nn.Module, names: dict[str, str], targets: dict[str, Scheme], plan, inputs: list,
               options: AWQOptions, pending: list) -> dict[str, dict]:
    """Scale search + fold per mapping, then clipping search + round-to-nearest per layer, in one block."""
    local_of = {full: local for local, full in names.items()}
    stats = _hessians(block, names, inputs, absmean=True)  # full -> (H, rows, mean|x|)
    infos: dict[str, dict] = {full: {} for full in names.values()}
    for mapping in plan.mappings:
        fulls = [names[local] for local in mapping.layers]
        hessian, rows, absmean = stats[fulls[0]]
        if rows == 0:
            continue
        w0 = targets[fulls[0]].weights
        group = _group_size(block.get_submodule(mapping.layers[0]), targets[fulls[0]])
        layers = [block.get_submodule(local) for local in mapping.layers]
        schemes = {targets[f].weights for f in fulls}
        if len(schemes) != 1:  # layers sharing one input but quantized differently: no common search
            for full in fulls:
                infos[full]["note"] = "layers reading the same input have different schemes: no common AWQ scale"
            continue
        s, info = awq_scales([layer.weight for layer in layers], hessian, absmean, w0.bits, group, w0.symmetric,
                             grid=options.grid, duo_scaling=options.duo_scaling)
        fold_scales_(block.get_submodule(mapping.prev), layers, s)
        inv = 1.0 / s
        for full in fulls:  # the layers now read x / s: H -> H / (s s^T)
            h, n, m = stats[full]
            stats[full] = (h * inv[:, None] * inv[None, :], n, m * inv)
            infos[full] = {"scale_ratio": info["ratio"], "error_vs_rtn": info["error"] / max(info["rtn_error"], 1e-30),
                           "smoothed_by": mapping.prev}
    for full, local in local_of.items():
        linear = block.get_submodule(local)
        w = targets[full].weights
        group = _group_size(linear, targets[full])
        hessian, rows, _ = stats[full]
        ratios = None
        if rows == 0:
            infos[full] = {"no_data": True, "note": "saw no calibration data: round-to-nearest instead of awq"}
        elif "smoothed_by" not in infos[full] and "note" not in infos[full]:
            infos[full]["note"] = "no AWQ scale (no operation to fold one into): clipping search only"
        if options.clip_search and rows > 0:
            ratios = awq_clip_ratios(linear.weight, hessian, w.bits, group, w.symmetric,
                                     grid=options.clip_grid, max_shrink=options.max_shrink)
            infos[full]["mean_clip"] = float(ratios.mean())
        qweight = quantize_weight_ranged(linear.weight, w.bits, group, w.symmetric, ratios)
        _fake_quantize_(linear, qweight, pending, local, targets[full])
    return infos


def awq_sequential_(
    model: nn.Module, targets: dict[str, Scheme], config: QuantizeConfig, batches: Iterable, run_batch, progress=None
) -> tuple[dict[str, dict], dict[str, str]]:
    """Quantize ``targets`` (nn.Linear inside the model's blocks) with AWQ, block by block.
    Returns AWQ's info per layer and a note per layer that did not get everything AWQ does."""
    prefix, blocks = find_blocks(model, targets, "awq")
    family = model_family(model, blocks[0], config)
    inputs = _capture_inputs(model, blocks[0], batches, run_batch)
    infos, notes = {}, {}
    pending = []
    for index, block in enumerate(blocks):
        block_infos, block_notes = awq_block(block, f"{prefix}.{index}.", targets, family, inputs, config, pending,
                                             progress)
        infos.update(block_infos)
        notes.update(block_notes)
        inputs = _run_block(block, inputs)
        finish_block_(block, pending)
    return infos, notes


def model_family(model: nn.Module, first_block: nn.Module, config: QuantizeConfig):
    if config.mappings is not None:
        return custom_family(config.mappings)
    return family_for(model, first_block, config.family)


def awq_block(block, block_prefix: str, targets, family, inputs, config: QuantizeConfig, pending: list,
              progress=None):
    """AWQ on one block: returns (info per layer, note per layer); quantized layers are left in ``pending``."""
    names = {t[len(block_prefix):]: t for t in targets if t.startswith(block_prefix)}
    plan = resolve_block(block, family, set(names))
    infos = _awq_block(block, names, targets, plan, inputs, config.awq, pending)
    notes = {}
    for layers, why in plan.skipped:
        for local in layers:
            notes[names[local]] = f"no AWQ scale ({why}): clipping search only"
    for full, info in infos.items():
        text = info.pop("note", None)
        if text and full not in notes:
            notes[full] = text
    if progress is not None:
        for full in names.values():
            progress(full)
    return infos, notes
