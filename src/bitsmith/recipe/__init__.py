"""Recipes: what to do to a model, as typed configs (no torch here)."""

from bitsmith.recipe.builtin import builtin_recipes, load_recipe
from bitsmith.recipe.recipe import Recipe, config_from_dict, config_from_yaml
from bitsmith.recipe.schemes import ActivationSpec, Rule, Scheme, WeightSpec, target_matches
from bitsmith.recipe.stages import (
    STAGE_CONFIGS,
    AWQOptions,
    DistillConfig,
    EqualizeConfig,
    FoldBatchNormConfig,
    GPTQOptions,
    MappingSpec,
    PruneConfig,
    PruneRule,
    QATConfig,
    QLoRAConfig,
    QuantizeConfig,
    SmoothConfig,
    StageConfig,
    StructuredPruneConfig,
    StructuredRule,
)

__all__ = [
    "ActivationSpec", "AWQOptions", "DistillConfig", "EqualizeConfig", "FoldBatchNormConfig", "GPTQOptions", "MappingSpec",
    "PruneConfig", "PruneRule", "QATConfig", "QLoRAConfig", "QuantizeConfig", "Recipe", "Rule", "STAGE_CONFIGS", "Scheme", "SmoothConfig", "StageConfig",
    "StructuredPruneConfig", "StructuredRule", "WeightSpec",
    "builtin_recipes", "config_from_dict", "config_from_yaml", "load_recipe", "target_matches",
]
