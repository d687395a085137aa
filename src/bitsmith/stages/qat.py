"""Quantization-aware training, the torchao shape: ``prepare_qat_`` then training then ``convert_``.

    prepare_qat_(model, config, calibration)   # matched Linear / Conv2d -> FakeQuantLayer (nn/qat.py)
    ... train model (any loop: every FakeQuantLayer's scale, zero point and weight is a Parameter) ...
    convert_(model)                             # FakeQuantLayer -> the runtime module PTQ builds

The ``qat`` recipe stage does all three: the model as it comes is the teacher, the loss is the distance of
the student's output to the teacher's (``algorithms/distill.py``), on the calibration batches (a held-out part
reports the loss before and after). Ranges start from round-to-nearest (the rule's ``clip``); static input
ranges from a min-max pass over the calibration data. ``convert_`` gives exactly the modules, kernels and
saved layout of post-training quantization, with the trained codes and ranges.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable

import torch
from torch import nn

from bitsmith.algorithms._modules import replace_module
from bitsmith.algorithms.distill import distill_loss, loss_kind, output_tensor
from bitsmith.algorithms.observers import qparams_u8
from bitsmith.algorithms.qat import codes_of
from bitsmith.algorithms.rtn import QuantizedWeight, weight_format
from bitsmith.errors import BitsmithError
from bitsmith.formats.affine import IntFormat, block_size_for, choose_qparams_affine, fp16_scales
from bitsmith.nn import Int8DynamicLinear
from bitsmith.nn.qat import FakeQuantLayer
from bitsmith.pipeline.calibration import calibration_batches, run_batch
from bitsmith.pipeline.registry import register_stage
from bitsmith.pipeline.report import StageReport
from bitsmith.pipeline.run import Context
from bitsmith.recipe.schemes import Scheme
from bitsmith.recipe.stages import QATConfig
from bitsmith.stages.quantize import plan
from bitsmith.stages.static import relu_followers, static_module
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


def _check_layer(name: str, module: nn.Module, scheme: Scheme) -> None:
    w = scheme.weights
    if not torch.isfinite(module.weight).all():
        raise BitsmithError(f"layer '{name}' has NaN or infinite weights; fix the model before quantizing")
    if isinstance(w.granularity, int) and module.weight[0].numel() % w.granularity:
        raise BitsmithError(f"layer '{name}': qat groups of {w.granularity} must divide its"
                            f" {module.weight[0].numel()} inputs")
    if getattr(module, "input_smooth", None) is not None:
        raise BitsmithError(f"layer '{name}' carries a SmoothQuant input scale; qat does not train through it")


def _wrap(module: nn.Module, scheme: Scheme) -> FakeQuantLayer:
    w = scheme.weights
    fmt, group, fp16 = _layout(module, scheme)
    flat = module.weight.detach().reshape(module.weight.shape[0], -1)
    symmetric = w.symmetric or scheme.activations is not None
    block = block_size_for(tuple(flat.shape), "tensor" if w.granularity == "tensor" else group)
    scale, zero = choose_qparams_affine(flat, block, fmt, symmetric=symmetric, clip=w.clip)
    activations = None if scheme.activations is None else "dynamic" if scheme.activations.dynamic else "static"
    return FakeQuantLayer(module, fmt, group, scale, zero, symmetric, activations, fp16)


def prepare_qat_(model: nn.Module, config: QATConfig, calibration: Iterable | None = None) -> dict[str, Scheme]:
    """Give every Linear / Conv2d the rules match its training form (ranges from round-to-nearest), in place;
    static input ranges start from a min-max pass over ``calibration``. Returns layer -> scheme."""
    layers, _, _ = _trained(model, config)
    modules = dict(model.named_modules())
    for name, scheme in layers.items():
        _check_layer(name, modules[name], scheme)
    static = [n for n, s in layers.items() if s.is_static]
    if static and calibration is None:
        raise BitsmithError("static activations start from observed ranges: give calibration data")
    wrapped = {}
    for name, scheme in layers.items():
        wrapped[name] = _wrap(modules[name], scheme)
        replace_module(model, name, wrapped[name])
    if static:
        _observe_inputs(model, [wrapped[n] for n in static], calibration_batches(calibration))
    model.bitsmith_qat = {name: scheme.to_dict() for name, scheme in layers.items()}
    return layers


def _observe_inputs(model: nn.Module, layers: list[FakeQuantLayer], batches: list) -> None:
    ranges = {id(layer): [math.inf, -math.inf] for layer in layers}

    def observe(module, args):
        low, high = torch.aminmax(args[0].detach().float())
        seen = ranges[id(module)]
        seen[0], seen[1] = min(seen[0], low.item()), max(seen[1], high.item())

    handles = [layer.register_forward_pre_hook(observe) for layer in layers]
    every = [m for m in model.modules() if isinstance(m, FakeQuantLayer)]
    for layer in every:  # all in float, static or not: the ranges of the float model, as PTQ observes them
        layer.observing = True
    try:
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for layer in every:
            layer.observing = False
    for layer in layers:
        scale, zero = qparams_u8(*ranges[id(layer)])
        with torch.no_grad():
            layer.input_scale.fill_(scale)
            layer.input_zero.fill_(float(zero))


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


def _split(batches: list, held_out: float, seed: int) -> tuple[list, list]:
    count = round(len(batches) * held_out) if len(batches) > 1 else 0
    count = min(max(count, 1 if held_out > 0 and len(batches) > 1 else 0), len(batches) - 1)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in order[count:]], [batches[i] for i in order[:count]]


def _mean_loss(model: nn.Module, teacher_outputs: list, batches: list, kind: str, temperature: float) -> float | None:
    if not batches:
        return None
    with torch.no_grad():
        losses = [distill_loss(output_tensor(run_batch(model, b)), t, kind, temperature).item()
                  for b, t in zip(batches, teacher_outputs)]
    return _figure(sum(losses) / len(losses))


def _figure(value: float) -> float:
    return float(f"{value:.6g}")


def _curve(losses: list[float], points: int = 50) -> list[list]:
    """[step, mean training loss of the steps since the last point], at most ``points`` of them."""
    every = max(-(-len(losses) // points), 1)
    return [[min(i + every, len(losses)), _figure(sum(losses[i:i + every]) / len(losses[i:i + every]))]
            for i in range(0, len(losses), every)]


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


def train_qat(model: nn.Module, teacher: nn.Module, config: QATConfig, batches: list, progress=None) -> dict:
    """``config.steps`` AdamW steps of the distillation loss; returns the figures the report shows."""
    train, held = _split(batches, config.held_out, config.seed)
    with torch.no_grad():
        first = run_batch(teacher, train[0])
        kind = loss_kind(first, config.loss)
        held_teacher = [output_tensor(run_batch(teacher, b)) for b in held]
    before = _mean_loss(model, held_teacher, held, kind, config.temperature)
    params = _trainable(model, config)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(config.steps, 1))))
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses = []
    start = time.perf_counter()
    try:
        with torch.enable_grad():
            for step in range(config.steps):
                if not order:
                    order = torch.randperm(len(train), generator=generator).tolist()
                batch = train[order.pop()]
                with torch.no_grad():
                    target = output_tensor(run_batch(teacher, batch))
                loss = distill_loss(output_tensor(run_batch(model, batch)), target, kind, config.temperature)
                if not torch.isfinite(loss):
                    raise BitsmithError(f"qat: the loss became {loss.item()} at step {step + 1}; lower lr"
                                        f" (now {config.lr:g}) and run again")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                if progress is not None:
                    progress(f"qat step {step + 1}/{config.steps} loss {loss.item():.4g}")
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
    after = _mean_loss(model, held_teacher, held, kind, config.temperature)
    tenth = max(len(losses) // 10, 1)
    return {"steps": config.steps, "loss": kind, "train_batches": len(train), "held_out_batches": len(held),
            "train_loss_first": _figure(sum(losses[:tenth]) / tenth) if losses else None,
            "train_loss_last": _figure(sum(losses[-tenth:]) / tenth) if losses else None,
            "held_out_loss_before": before, "held_out_loss_after": after, "loss_curve": _curve(losses),
            "seconds": round(time.perf_counter() - start, 1)}


def _check(model: nn.Module, config: QATConfig, context: Context) -> None:
    if context.offloaded:
        raise BitsmithError("qat trains the whole model in memory; run it without --offload")
    layers, _, _ = _trained(model, config)
    modules = dict(model.named_modules())
    for name, scheme in layers.items():
        _check_layer(name, modules[name], scheme)
    if not layers:
        raise BitsmithError("qat: no Linear or Conv2d layer matches its rules")


def _own_parameters_(model: nn.Module) -> None:
    """Bind a copy of every parameter (tied ones stay tied), so that the optimizer's in-place steps never write
    into the tensors the caller holds: a failed run restores the model exactly (pipeline/transaction.py)."""
    copies: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in copies:
                    copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = copies[id(p)]


@register_stage(QATConfig, check=_check, why_not_offload="it trains the whole model in memory")
def qat_stage(model: nn.Module, config: QATConfig, context: Context, report: StageReport) -> None:
    _, tables, skipped = _trained(model, config)
    for name, why in skipped.items():
        report.skip(name, why)
    teacher = copy.deepcopy(model).eval()
    _own_parameters_(model)
    followers = relu_followers(model)
    was_training = model.training
    model.eval()  # dropout off: the student follows the teacher's deterministic outputs
    torch.manual_seed(config.seed)
    layers = prepare_qat_(model, config, context.calibration)
    report.summary.update(train_qat(model, teacher, config, context.calibration, context.progress))
    done = convert_(model, followers)
    with torch.no_grad():
        for name, scheme in tables.items():
            replace_module(model, name, quantize_embedding(model.get_submodule(name), scheme))
            done[name] = scheme.describe("rtn")
    for name, what in done.items():
        asked = (layers.get(name) or tables[name]).describe("qat" if name in layers else "rtn")
        report.done(name, what, asked=asked)
    model.train(was_training)
    del teacher
