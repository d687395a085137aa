"""The fold_batchnorm and equalize stages: function-preserving rewrites of a float convolutional model
before static quantization (the math is algorithms/fold.py and algorithms/equalize.py)."""

from __future__ import annotations

from torch import nn

from bitsmith.algorithms.equalize import cross_layer_equalize_
from bitsmith.algorithms.fold import fold_batchnorm_
from bitsmith.pipeline.registry import register_stage
from bitsmith.pipeline.report import StageReport
from bitsmith.pipeline.run import Context
from bitsmith.recipe.stages import EqualizeConfig, FoldBatchNormConfig

__all__ = ["fold_batchnorm_stage", "equalize_stage"]


@register_stage(FoldBatchNormConfig, why_not_offload="it rewrites convolutions of a model held in memory")
def fold_batchnorm_stage(model: nn.Module, config: FoldBatchNormConfig, context: Context, report: StageReport) -> None:
    folded = fold_batchnorm_(model)
    for name in folded:
        report.done(name, "BatchNorm folded in")
    report.summary["folded_batchnorm"] = folded


@register_stage(EqualizeConfig, why_not_offload="it rewrites convolutions of a model held in memory")
def equalize_stage(model: nn.Module, config: EqualizeConfig, context: Context, report: StageReport) -> None:
    pairs = cross_layer_equalize_(model)
    partners: dict[str, list[str]] = {}
    for first, second in pairs:
        partners.setdefault(first, []).append(second)
        partners.setdefault(second, []).append(first)
    for name, others in partners.items():
        report.done(name, f"equalized with {', '.join(others)}")
    report.summary["equalized"] = [list(pair) for pair in pairs]
