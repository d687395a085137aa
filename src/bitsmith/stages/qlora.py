"""QLoRA (Dettmers et al., 2023): a frozen low-bit base with trainable LoRA adapters, trained on the user's text.

    prepare_qlora_(model, config)   # matched Linears -> LoRALinear(base = the rule's weight-only module)
    ... train the adapters (stages/training.py: loss text, the next tokens; or kl to the float model) ...
    merge_lora_(model, floats)      # optional: W + B A * alpha / rank, quantized again by the same scheme

The ``qlora`` stage does all of it and keeps the adapters (``model.bitsmith_adapter``), which ``save`` writes in
peft's format under ``adapter/``: ``PeftModel.from_pretrained(float_model, OUT/adapter)`` loads them. Unmerged,
the saved model is the base plus adapters (``LoRALinear``, a module kind of its own); merged, it is an ordinary
quantized model of the rules' schemes.
"""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.algorithms._modules import replace_module
from bitsmith.algorithms.lora import lora_scaling, merged_weight
from bitsmith.errors import BitsmithError
from bitsmith.nn import LoRALinear
from bitsmith.pipeline.registry import register_stage
from bitsmith.pipeline.report import StageReport
from bitsmith.pipeline.run import Context
from bitsmith.recipe.schemes import Scheme
from bitsmith.recipe.stages import QLoRAConfig
from bitsmith.stages.quantize import plan
from bitsmith.stages.training import check_training, checkpoints_for, teacher_for, train_to_teacher
from bitsmith.stages.weights import quantize_linear

__all__ = ["prepare_qlora_", "merge_lora_", "adapter_record"]

_PEFT_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the model


def _adapted(model: nn.Module, config: QLoRAConfig) -> tuple[dict[str, Scheme], dict[str, str]]:
    """(Linear layers to adapt -> base scheme, matched layers left alone and why)."""
    chosen, skipped = plan(model, config)
    modules = dict(model.named_modules())
    layers = {}
    for name, scheme in chosen.items():
        if type(modules[name]) is nn.Linear:
            layers[name] = scheme
        else:
            skipped[name] = f"{type(modules[name]).__name__}: qlora adapts Linear layers; quantize it in a quantize stage"
    return layers, skipped


def _checked_layers(model: nn.Module, config: QLoRAConfig) -> dict[str, Scheme]:
    """``_adapted``'s layers, each with finite weights; one line if there are none or one is not finite."""
    layers, _ = _adapted(model, config)
    if not layers:
        raise BitsmithError("qlora: no Linear layer matches its rules")
    modules = dict(model.named_modules())
    for name in layers:
        if not torch.isfinite(modules[name].weight).all():
            raise BitsmithError(f"layer '{name}' has NaN or infinite weights; fix the model before quantizing")
    return layers


def prepare_qlora_(model: nn.Module, config: QLoRAConfig, generator: torch.Generator | None = None
                   ) -> dict[str, Scheme]:
    """Every Linear the rules match becomes its frozen base (the rule's scheme, rounded to nearest) with LoRA
    adapters of ``config.rank`` (B = 0: the model computes exactly the base at first), in place."""
    layers = _checked_layers(model, config)
    modules = dict(model.named_modules())
    generator = generator if generator is not None else torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for name, scheme in layers.items():
            linear = modules[name]
            layer = LoRALinear(quantize_linear(linear, scheme), config.rank, lora_scaling(config.alpha, config.rank),
                               config.dropout, linear.in_features, linear.out_features)
            layer.reset_adapters_(generator)
            replace_module(model, name, layer)
    model.bitsmith_qlora = {name: scheme.to_dict() for name, scheme in layers.items()}
    return layers


def merge_lora_(model: nn.Module, floats: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """Fold every LoRALinear's adapters into its weight (``floats[name]``, the float weight before quantizing,
    else the base dequantized) and quantize that again by the layer's scheme, in place; returns layer -> label."""
    schemes = {name: Scheme.model_validate(data) for name, data in getattr(model, "bitsmith_qlora", {}).items()}
    done = {}
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        if name not in schemes:
            raise BitsmithError(f"layer '{name}' was not prepared by prepare_qlora_ on this model")
        with torch.no_grad():
            weight = floats[name] if floats is not None else layer.base.float_weight()
            merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.base.bias is not None)
            merged.weight.copy_(merged_weight(weight, layer.lora_A, layer.lora_B, float(layer.lora_scaling)))
            if layer.base.bias is not None:
                merged.bias.copy_(layer.base.bias)
            replace_module(model, name, quantize_linear(merged, schemes[name]))
        done[name] = schemes[name].describe("rtn") + " (lora merged)"
    return done


def adapter_record(model: nn.Module, rank: int, alpha: float, dropout: float, layers: list[str]) -> dict:
    """What ``write_adapter`` writes: peft's config fields and the adapters' tensors, by peft's names."""
    modules = dict(model.named_modules())
    tensors = {}
    for name in layers:
        module = modules[name]
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().float().clone().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().float().clone().contiguous()
    config = getattr(model, "config", None)
    causal = type(model).__name__.endswith("ForCausalLM") or any(
        arch.endswith("ForCausalLM") for arch in (getattr(config, "architectures", None) or []))
    source = getattr(model, "bitsmith_source", None) or {}
    return {"config": {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(layers),
                       "bias": "none", "task_type": "CAUSAL_LM" if causal else None,
                       "base_model_name_or_path": source.get("path") or source.get("name")},
            "tensors": tensors}


def _check(model: nn.Module, config: QLoRAConfig, context: Context) -> None:
    if context.offloaded:
        raise BitsmithError("qlora trains adapters on the whole model in memory; run it without --offload")
    _checked_layers(model, config)
    check_training(model, config, context, "qlora")


@register_stage(QLoRAConfig, check=_check, why_not_offload="it trains adapters on the whole model in memory")
def qlora_stage(model: nn.Module, config: QLoRAConfig, context: Context, report: StageReport) -> None:
    layers, skipped = _adapted(model, config)
    for name, why in skipped.items():
        report.skip(name, why)
    teacher = teacher_for(model, context) if config.loss != "text" else None
    # only merge keeps the float weights; otherwise nothing here may hold the float layers prepare_qlora_ replaces
    floats = {name: model.get_submodule(name).weight.detach() for name in layers} if config.merge else None
    was_training = model.training
    model.eval()  # dropout of the model off; the adapters' own dropout acts in training steps
    torch.manual_seed(config.seed)
    prepare_qlora_(model, config)
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for layer in adapters.values():
        layer.train()
    params = [p for layer in adapters.values() for p in (layer.lora_A, layer.lora_B)]
    checkpoints = checkpoints_for(context, config, "qlora", params, context.calibration)
    try:
        report.summary.update(train_to_teacher(model, teacher, config, context.calibration, params, "qlora",
                                               context.progress, None, checkpoints))
    finally:
        for layer in adapters.values():
            layer.eval()
    report.summary["adapter_parameters"] = sum(p.numel() for p in params)
    model.bitsmith_adapter = adapter_record(model, config.rank, config.alpha, config.dropout, list(adapters))
    if config.merge:
        done = merge_lora_(model, floats)
    else:
        done = {name: f"{layers[name].describe('rtn')} + lora r{config.rank}" for name in adapters}
    del model.bitsmith_qlora
    for name, what in done.items():
        report.done(name, what)
    model.train(was_training)
