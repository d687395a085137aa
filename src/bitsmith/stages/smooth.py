"""The smooth stage (SmoothQuant): observe each mapped layer group's input range on calibration data, then
move part of it into the weights (algorithms/smooth.py), for the int8 activations of the quantize stage
that follows."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bitsmith.algorithms._modules import assign_
from bitsmith.algorithms.smooth import fold_scales_, smoothquant_scales
from bitsmith.errors import BitsmithError
from bitsmith.pipeline.blocks import find_blocks
from bitsmith.pipeline.calibration import run_calibration
from bitsmith.pipeline.distributed import gathered, local_batches
from bitsmith.pipeline.families import family_of, resolve_block
from bitsmith.pipeline.registry import register_stage
from bitsmith.pipeline.report import StageReport
from bitsmith.pipeline.run import Context
from bitsmith.recipe.schemes import Scheme
from bitsmith.recipe.stages import QuantizeConfig, SmoothConfig
from bitsmith.stages.quantize import plan

__all__ = ["smoothquant_"]


def _absmax_hook(store: dict, key: str):
    def observe(module, args):
        x = args[0].detach()
        amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        store[key] = amax if key not in store else torch.maximum(store[key], amax)

    return observe


def smoothquant_(
    model: nn.Module, targets: dict[str, Scheme], config: SmoothConfig, batches: Iterable, progress=None
) -> dict:
    """Smooth the inputs of the W8A8 ``targets`` in place (function-preserving on the float model).

    Every mapping of the model family whose layers are all targets gets
    ``s = max|x|^alpha / max|W|^(1-alpha)`` folded into its previous operation. Returns what was
    smoothed: {"family", "alpha", "smoothed": [prev -> layers], "notes": [...]}.
    """
    linear_targets = {n: s for n, s in targets.items() if isinstance(model.get_submodule(n), nn.Linear)}
    prefix, blocks = find_blocks(model, linear_targets, "smoothquant")
    family = family_of(model, blocks[0], config.family, config.mappings)
    plans, handles, absmax = [], [], {}
    for index, block in enumerate(blocks):
        block_prefix = f"{prefix}.{index}."
        local = {t[len(block_prefix):] for t in linear_targets if t.startswith(block_prefix)}
        plan = resolve_block(block, family, local)
        plans.append((block_prefix, block, plan))
        for mapping in plan.mappings:
            key = block_prefix + mapping.prev
            handles.append(block.get_submodule(mapping.layers[0]).register_forward_pre_hook(_absmax_hook(absmax, key)))
        for group in plan.unfoldable:
            key = block_prefix + group[0]
            handles.append(block.get_submodule(group[0]).register_forward_pre_hook(_absmax_hook(absmax, key)))
    mine, shared = local_batches(batches)  # data parallel: a share each, then the maxima of them all
    run_calibration(model, mine, handles, "smoothquant", progress)
    if shared:
        everyone = gathered(absmax)
        absmax = {key: torch.stack([amaxes[key] for amaxes in everyone if key in amaxes]).amax(dim=0)
                  for key in sorted({key for amaxes in everyone for key in amaxes})}
    alpha = config.alpha
    done = {"family": family.name, "alpha": alpha, "smoothed": [], "notes": [], "layer_notes": {}, "layer_done": {}}
    for block_prefix, block, plan in plans:
        done["notes"] += [block_prefix + note for note in plan.notes]
        for layers, why in plan.skipped:
            for local in layers:
                done["layer_notes"][block_prefix + local] = f"not smoothed ({why})"
        for mapping in plan.mappings:
            key = block_prefix + mapping.prev
            if key not in absmax:
                continue
            layers = [block.get_submodule(n) for n in mapping.layers]
            s = smoothquant_scales(absmax[key], [layer.weight for layer in layers], alpha)
            fold_scales_(block.get_submodule(mapping.prev), layers, s)
            done["smoothed"].append(f"{key} -> {', '.join(block_prefix + n for n in mapping.layers)}")
            for n in mapping.layers:
                done["layer_done"][block_prefix + n] = f"smoothed (alpha {alpha:g}), scale folded into {key}"
        for group in plan.unfoldable:
            key = block_prefix + group[0]
            full = [block_prefix + n for n in group]
            if key not in absmax:
                continue
            if not all(targets[n].is_static for n in full):
                done["notes"].append(f"{', '.join(full)}: no foldable producer and not static; not smoothed")
                for name in full:
                    done["layer_notes"][name] = "not smoothed: no operation can absorb the scale, and only static" \
                                                " int8 layers take it inside their quantization step"
                continue
            layers = [block.get_submodule(n) for n in group]
            s = smoothquant_scales(absmax[key], [layer.weight for layer in layers], alpha)
            for layer in layers:
                _smooth_explicitly_(layer, s)
            done["smoothed"].append(f"explicit per-channel scale -> {', '.join(full)}")
            for name in full:
                done["layer_done"][name] = f"smoothed (alpha {alpha:g}), scale kept for its int8 quantization step"
    return done


def _multiply_input(module: nn.Module, args):
    return (args[0] * module.input_smooth, *args[1:])


@torch.no_grad()
def _smooth_explicitly_(linear: nn.Linear, s: torch.Tensor) -> None:
    """``W * s`` with the input multiplied by ``1 / s`` first: a buffer the static int8 module takes
    over into its quantization step, and a hook that keeps the float layer exact until then."""
    assign_(linear, "weight", linear.weight * s.to(linear.weight.dtype))
    linear.register_buffer("input_smooth", (1.0 / s).to(linear.weight.dtype))
    linear.register_forward_pre_hook(_multiply_input)


def _int8_targets(model: nn.Module, context: Context) -> dict[str, Scheme]:
    """The Linear layers the next quantize stage gives int8 activations, as it would plan them now."""
    quantize = context.following(QuantizeConfig)
    if quantize is None:
        raise BitsmithError("smooth needs a quantize stage after it: it smooths the inputs of the layers that stage"
                            " gives int8 activations")
    chosen, _ = plan(model, quantize)
    modules = dict(model.named_modules())
    targets = {n: s for n, s in chosen.items() if s.activations is not None and isinstance(modules[n], nn.Linear)}
    if not targets:
        raise BitsmithError("smoothquant smooths int8 activations: the recipe quantizes no layer's activations")
    return targets


def _check(model: nn.Module, config: SmoothConfig, context: Context) -> None:
    _, blocks = find_blocks(model, _int8_targets(model, context), "smoothquant")
    if config.mappings is None:
        family_of(model, blocks[0], config.family, None)


@register_stage(SmoothConfig, check=_check, why_not_offload="it observes the whole model's activations at once")
def smooth_stage(model: nn.Module, config: SmoothConfig, context: Context, report: StageReport) -> None:
    done = smoothquant_(model, _int8_targets(model, context), config, context.calibration, context.progress)
    for name, text in done.pop("layer_done").items():
        report.done(name, text)
    for name, text in done.pop("layer_notes").items():
        report.note(name, text)
    report.summary["smoothquant"] = done
