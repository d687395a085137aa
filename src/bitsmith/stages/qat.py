"""Quantization-aware training, the torchao shape: ``prepare_qat_`` then training then ``convert_``.

    prepare_qat_(model, config, calibration)   # matched Linear / Conv2d -> FakeQuantLayer (nn/qat.py)
    ... train model (any loop: every FakeQuantLayer's scale, zero point and weight is a Parameter) ...
    convert_(model)                             # FakeQuantLayer -> the runtime module PTQ builds

The ``qat`` recipe stage does all three, training by ``stages/training.py``: the model as the recipe was
given is the teacher, the loss the distance of the student's output (and of ``match`` layers') to the
teacher's, on the calibration batches (a held-out part reports the loss before and after). Ranges start from round-to-nearest (the rule's ``clip``); static input
ranges from the calibration data by the scheme's observer. ``convert_`` gives exactly the modules, kernels and
saved layout of post-training quantization, with the trained codes and ranges. A layer an earlier ``quantize``
stage made weight-only integer (RTN, GPTQ, AWQ) starts from that result instead: its dequantized weight, scales
and zero points (a recipe of ``quantize`` with ``algorithm: gptq``, then ``qat`` with the same scheme).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bitsmith.algorithms._modules import replace_module
from bitsmith.algorithms.observers import qparams_u8
from bitsmith.algorithms.qat import codes_of
from bitsmith.algorithms.rtn import QuantizedWeight, weight_format
from bitsmith.errors import BitsmithError
from bitsmith.formats.affine import IntFormat, block_size_for, choose_qparams_affine, fp16_scales
from bitsmith.nn import Int8DynamicLinear, Int8WeightOnlyLinear, IntxWeightOnlyLinear
from bitsmith.nn.qat import FakeQuantLayer
from bitsmith.pipeline.calibration import calibration_batches
from bitsmith.pipeline.registry import register_stage
from bitsmith.pipeline.report import StageReport
from bitsmith.pipeline.run import Context
from bitsmith.recipe.schemes import Scheme
from bitsmith.recipe.stages import QATConfig
from bitsmith.stages.quantize import plan
from bitsmith.stages.static import collect_activation_stats, relu_followers, static_module
from bitsmith.stages.training import (check_training, checkpoints_for, own_parameters_, sparsity_masks,
                                      teacher_for, train_to_teacher)
from bitsmith.stages.weights import module_for, quantize_embedding

__all__ = ["prepare_qat_", "convert_"]


def _trained(model: nn.Module, config: QATConfig) -> tuple[dict[str, Scheme], dict[str, Scheme], dict[str, str]]:
    """(Linear / Conv2d layers to train, Embedding tables to round, layers left in float and why)."""
    chosen, skipped = plan(model, config)
    modules = dict(model.named_modules())
    layers = {n: s for n, s in chosen.items() if isinstance(modules[n], (nn.Linear, nn.Conv2d))}
    tables = {n: s for n, s in chosen.items() if n not in layers}
    return layers, tables, skipped


def _layout(module: nn.Module, scheme: Scheme) -> tuple[IntFormat, int, bool]:
    """(code format, group size along the flattened inputs, fp16 stored scale) of the runtime module."""
    w = scheme.weights
    inputs = module.weight[0].numel()
    group = w.granularity if isinstance(w.granularity, int) else inputs
    if scheme.activations is not None:  # the W8A8 kernels: signed codes, fp32 scale per channel
        return IntFormat(w.bits, signed=True), group, False
    int8 = w.bits == 8 and w.symmetric and not isinstance(w.granularity, int)  # Int8WeightOnlyLinear: fp32 scales
    return weight_format(w.bits, w.symmetric), group, not int8


_WEIGHT_ONLY_INT = (IntxWeightOnlyLinear, Int8WeightOnlyLinear)


def _float_again_(model: nn.Module) -> dict[str, nn.Module]:
    """Every weight-only integer layer (an earlier stage's RTN, GPTQ or AWQ result) becomes an nn.Linear holding
    its dequantized weight, in place; returns name -> the quantized module, whose ranges QAT starts from."""
    earlier = {}
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, _WEIGHT_ONLY_INT)]:
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(module.dequantize())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        replace_module(model, name, linear)
        earlier[name] = module
    return earlier


def _earlier_ranges(name: str, module: nn.Module, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of an earlier stage's quantized layer, in the grid ``_layout`` gives ``scheme``;
    one line if the scheme asks for another grid."""
    w = scheme.weights
    if isinstance(module, IntxWeightOnlyLinear):
        group = w.granularity if isinstance(w.granularity, int) else module.in_features
        same = w.bits == module.bits and module.group_size == group and (w.bits < 8 or not w.symmetric)
        ranges = module.weight_scale.float(), module.weight_zero_point.float()
    else:  # Int8WeightOnlyLinear: signed codes, an fp32 scale per channel
        same = w.bits == 8 and w.symmetric
        ranges = module.weight_scale.float(), torch.zeros_like(module.weight_scale.float())
    same = same and w.granularity != "tensor" and scheme.activations is None
    if same and w.symmetric and w.bits < 8:
        same = bool((ranges[1] == 2 ** (w.bits - 1)).all())
    if not same:
        raise BitsmithError(f"layer '{name}' was quantized by an earlier stage ({module.scheme}); qat's rule gives it"
                            f" {scheme.describe()}: give qat the same scheme to start from that result")
    return ranges


def _check_layer(name: str, module: nn.Module, scheme: Scheme) -> None:
    w = scheme.weights
    if not torch.isfinite(module.weight).all():
        raise BitsmithError(f"layer '{name}' has NaN or infinite weights; fix the model before quantizing")
    if getattr(module, "input_smooth", None) is not None:
        raise BitsmithError(f"layer '{name}' carries a SmoothQuant input scale; qat does not train through it")


def _wrap(module: nn.Module, scheme: Scheme, ranges: tuple | None = None) -> FakeQuantLayer:
    w = scheme.weights
    fmt, group, fp16 = _layout(module, scheme)
    flat = module.weight.detach().reshape(module.weight.shape[0], -1)
    symmetric = w.symmetric or scheme.activations is not None
    block = block_size_for(tuple(flat.shape), "tensor" if w.granularity == "tensor" else group)
    scale, zero = ranges if ranges is not None else choose_qparams_affine(flat, block, fmt, symmetric=symmetric,
                                                                           clip=w.clip)
    activations = None if scheme.activations is None else "dynamic" if scheme.activations.dynamic else "static"
    return FakeQuantLayer(module, fmt, group, scale, zero, symmetric, activations, fp16)


def prepare_qat_(model: nn.Module, config: QATConfig, calibration: Iterable | None = None) -> dict[str, Scheme]:
    """Give every Linear / Conv2d the rules match its training form (ranges from round-to-nearest), in place;
    static input ranges start from ``calibration`` by the scheme's observer; layers an earlier stage quantized
    (weight-only integer) start from that result. Returns layer -> scheme."""
    earlier = _float_again_(model)
    layers, _, _ = _trained(model, config)
    for name in set(earlier) - set(layers):  # not qat's: back as they were
        replace_module(model, name, earlier[name])
    modules = dict(model.named_modules())
    for name, scheme in layers.items():
        _check_layer(name, modules[name], scheme)
    ranges = {name: _earlier_ranges(name, earlier[name], layers[name]) for name in layers if name in earlier}
    static = [n for n, s in layers.items() if s.is_static]
    if static and calibration is None:
        raise BitsmithError("static activations start from observed ranges: give calibration data")
    # input ranges of the float model, by the scheme's observer, exactly as post-training quantization takes them
    stats = collect_activation_stats(model, {n: layers[n] for n in static}, calibration_batches(calibration)) \
        if static else {}
    for name, scheme in layers.items():
        layer = _wrap(modules[name], scheme, ranges.get(name))
        if name in stats:
            scale, zero = qparams_u8(*stats[name].observer.range())
            with torch.no_grad():
                layer.input_scale.fill_(scale)
                layer.input_zero.fill_(float(zero))
        replace_module(model, name, layer)
    model.bitsmith_qat = {name: scheme.to_dict() for name, scheme in layers.items()}
    return layers


def _runtime(layer: FakeQuantLayer, scheme: Scheme, fuse_relu: bool) -> nn.Module:
    """The post-training runtime module holding ``layer``'s trained codes and ranges."""
    float_layer = layer.layer
    with torch.no_grad():
        scale = layer.stored_scale().detach().float()  # (N, G)
        if layer.fp16_scale:
            scale = fp16_scales(scale).float()
        zero = layer.weight_zero.detach().expand_as(scale)
        flat = layer.flat_weight().detach()
        codes = codes_of(flat, scale, zero, layer.fmt.qmin, layer.fmt.qmax, layer.group_size)
        bias = None if float_layer.bias is None else float_layer.bias.detach().clone()
        if scheme.is_static:
            input_range = (float(layer.input_scale.abs().clamp(min=1e-8)), int(torch.round(layer.input_zero).clamp(0, 255)))
            return static_module(float_layer, codes.to(torch.int8).reshape(float_layer.weight.shape), scale, bias,
                                 input_range, fuse_relu)
        zero = torch.round(zero).clamp(layer.fmt.qmin, layer.fmt.qmax)
        qweight = QuantizedWeight(codes.to(layer.fmt.storage_dtype), scale, zero.to(torch.int32),
                                  layer.fmt, layer.group_size)
        if scheme.activations is not None:
            return Int8DynamicLinear.from_quantized(qweight, bias)
        return module_for(qweight, bias, scheme)


def convert_(model: nn.Module, fuse_relu: dict | None = None) -> dict[str, str]:
    """Every ``FakeQuantLayer`` of ``model`` becomes its runtime module, in place; returns layer -> what it is.
    A static layer followed by a ReLU in a Sequential runs the ReLU inside its int8 kernel, as PTQ does."""
    schemes = {name: Scheme.model_validate(data) for name, data in getattr(model, "bitsmith_qat", {}).items()}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLayer)}
    missing = sorted(set(layers) - set(schemes))
    if missing:
        raise BitsmithError(f"layer '{missing[0]}' was not prepared by prepare_qat_ on this model")
    followers = fuse_relu if fuse_relu is not None else _relu_followers(model, layers)
    done = {}
    for name, layer in layers.items():
        scheme = schemes[name]
        fused = scheme.is_static and name in followers
        replace_module(model, name, _runtime(layer, scheme, fused))
        if fused:
            parent, index = followers[name]
            replace_module(parent, list(parent._modules)[index], nn.Identity())
        done[name] = scheme.describe("qat")
    del model.bitsmith_qat
    return done


def _relu_followers(model: nn.Module, layers: dict[str, FakeQuantLayer]) -> dict:
    """``relu_followers`` as the model was before wrapping (it looks for Linear / Conv2d in Sequentials)."""
    for name, layer in layers.items():
        replace_module(model, name, layer.layer)
    try:
        return relu_followers(model)
    finally:
        for name, layer in layers.items():
            replace_module(model, name, layer)


def _trainable(model: nn.Module, config: QATConfig) -> list[nn.Parameter]:
    if config.trainable == "quantized":
        params = [p for m in model.modules() if isinstance(m, FakeQuantLayer) for p in m.parameters()]
    else:
        params = list(model.parameters())
    seen, unique = set(), []
    for p in params:  # tied weights appear once
        if p.is_floating_point() and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def _check(model: nn.Module, config: QATConfig, context: Context) -> None:
    if context.offloaded:
        raise BitsmithError("qat trains the whole model in memory; run it without --offload")
    layers, _, _ = _trained(model, config)
    modules = dict(model.named_modules())
    for name, scheme in layers.items():
        _check_layer(name, modules[name], scheme)
    if not layers:
        raise BitsmithError("qat: no Linear or Conv2d layer matches its rules")
    check_training(model, config, context, "qat")


@register_stage(QATConfig, check=_check, why_not_offload="it trains the whole model in memory")
def qat_stage(model: nn.Module, config: QATConfig, context: Context, report: StageReport) -> None:
    _, tables, skipped = _trained(model, config)
    for name, why in skipped.items():
        report.skip(name, why)
    teacher = teacher_for(model, context) if config.loss != "text" else None
    own_parameters_(model)
    followers = relu_followers(model)
    was_training = model.training
    model.eval()  # dropout off: the student follows the teacher's deterministic outputs
    torch.manual_seed(config.seed)
    masks = sparsity_masks(model, context.sparse_layers())  # a pruned layer keeps its zeros
    layers = prepare_qat_(model, config, context.calibration)
    params = _trainable(model, config)
    checkpoints = checkpoints_for(context, config, "qat", params, context.calibration)
    report.summary.update(train_to_teacher(model, teacher, config, context.calibration, params, "qat",
                                           context.progress, masks, checkpoints))
    done = convert_(model, followers)
    with torch.no_grad():
        for name, scheme in tables.items():
            replace_module(model, name, quantize_embedding(model.get_submodule(name), scheme))
            done[name] = scheme.describe("rtn")
    for name, what in done.items():
        asked = (layers.get(name) or tables[name]).describe("qat" if name in layers else "rtn")
        report.done(name, what, asked=asked)
    model.train(was_training)
