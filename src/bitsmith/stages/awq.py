"""AWQ inside one block (the block runner calls it): one statistics pass (each input's Gram matrix and
mean magnitude), a scale search per mapping of the model family (pipeline/families.py), the scales folded
into the previous operation, then a clipping search and round-to-nearest per layer (algorithms/smooth.py)."""

from __future__ import annotations

from torch import nn

from bitsmith.algorithms.smooth import awq_clip_ratios, awq_scales, fold_scales_, quantize_weight_ranged
from bitsmith.pipeline.blocks import input_statistics
from bitsmith.pipeline.families import family_of, resolve_block
from bitsmith.recipe.schemes import Scheme
from bitsmith.recipe.stages import AWQOptions
from bitsmith.stages.methods import BlockMethod, register_method
from bitsmith.stages.weights import fake_quantize_, group_size

__all__ = ["awq_block_"]


def _search(block: nn.Module, names: dict[str, str], targets: dict[str, Scheme], plan, inputs: list,
            options: AWQOptions, pending: list) -> dict[str, dict]:
    """Scale search + fold per mapping, then clipping search + round-to-nearest per layer, in one block."""
    local_of = {full: local for local, full in names.items()}
    stats = input_statistics(block, names, inputs, absmean=True)  # full -> (H, rows, mean|x|)
    infos: dict[str, dict] = {full: {} for full in names.values()}
    for mapping in plan.mappings:
        fulls = [names[local] for local in mapping.layers]
        hessian, rows, absmean = stats[fulls[0]]
        if rows == 0:
            continue
        w0 = targets[fulls[0]].weights
        group = group_size(block.get_submodule(mapping.layers[0]), targets[fulls[0]])
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
        group = group_size(linear, targets[full])
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
        fake_quantize_(linear, qweight, pending, local, targets[full])
    return infos


def _family(model: nn.Module, first_block: nn.Module, config):
    return family_of(model, first_block, config.family, config.mappings)


def awq_block_(block: nn.Module, names: dict[str, str], schemes: dict[str, Scheme], inputs: list, config,
               pending: list, report, context, state=None) -> None:
    """AWQ on one block's targets (local -> full names); quantized layers are left in ``pending``. ``state`` is
    the model family. What AWQ found per layer goes to the report's summary under "awq"."""
    plan = resolve_block(block, state, set(names))
    infos = _search(block, names, schemes, plan, inputs, config.awq, pending)
    notes = {}
    for layers, why in plan.skipped:
        for local in layers:
            notes[names[local]] = f"no AWQ scale ({why}): clipping search only"
    for full, info in infos.items():
        text = info.pop("note", None)
        if text and full not in notes:
            notes[full] = text
        report.done(full, schemes[full].describe("rtn" if info.get("no_data") else "awq"), asked=schemes[full].describe())
        if info:
            report.summary.setdefault("awq", {})[full] = info
    for full, text in notes.items():
        report.note(full, text)
    if context.progress is not None:
        for full in names.values():
            context.progress(full)


register_method("awq", BlockMethod(calibrated=True, quantize_block=awq_block_, start=_family))
