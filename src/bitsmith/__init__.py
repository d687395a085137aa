"""bitsmith: make trained PyTorch models smaller and faster, and prove it with measurements.

    import bitsmith
    bitsmith.quantize_(model, bitsmith.load_recipe("w8a8-dynamic"))
    bitsmith.save(model, "out/minilm-w8a8")
    model = bitsmith.load("out/minilm-w8a8")
"""

from bitsmith.api.compress import compress, evaluate
from bitsmith._version import __version__
from bitsmith.errors import BitsmithError
from bitsmith.io.serialization import load, read_metadata, save
from bitsmith.pipeline import run_stages
from bitsmith.recipe import (
    ActivationSpec,
    DistillConfig,
    EqualizeConfig,
    FoldBatchNormConfig,
    PruneConfig,
    QATConfig,
    QLoRAConfig,
    QuantizeConfig,
    Recipe,
    Rule,
    Scheme,
    SmoothConfig,
    StructuredPruneConfig,
    WeightSpec,
    builtin_recipes,
    load_recipe,
)
from bitsmith.stages import convert_, merge_lora_, prepare_qat_, prepare_qlora_, prune_, quantize_


__all__ = [
    "ActivationSpec",
    "BitsmithError",
    "DistillConfig",
    "EqualizeConfig",
    "FoldBatchNormConfig",
    "PruneConfig",
    "QATConfig",
    "QLoRAConfig",
    "QuantizeConfig",
    "Recipe",
    "Rule",
    "Scheme",
    "SmoothConfig",
    "StructuredPruneConfig",
    "WeightSpec",
    "__version__",
    "builtin_recipes",
    "compress",
    "convert_",
    "evaluate",
    "load",
    "load_recipe",
    "prepare_qat_",
    "prepare_qlora_",
    "merge_lora_",
    "prune_",
    "quantize_",
    "read_metadata",
    "run_stages",
    "save",
]
