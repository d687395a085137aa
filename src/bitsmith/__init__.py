"""bitsmith: make trained PyTorch models smaller and faster, and prove it with measurements.

    import bitsmith
    bitsmith.quantize_(model, bitsmith.load_recipe("w8a8-dynamic"))
    bitsmith.save(model, "out/minilm-w8a8")
    model = bitsmith.load("out/minilm-w8a8")
"""

import importlib

from bitsmith._version import __version__
from bitsmith.errors import BitsmithError

# The rest is imported on first use (PEP 562), so that ``import bitsmith.cli.main`` (the command line's entry
# point) is quick and a Ctrl-C while torch loads reaches the command line's own handler, not a traceback.
_HOMES = {
    "compress": "bitsmith.api.compress", "evaluate": "bitsmith.api.compress",
    "load": "bitsmith.io.serialization", "read_metadata": "bitsmith.io.serialization",
    "save": "bitsmith.io.serialization", "run_stages": "bitsmith.pipeline",
    **{name: "bitsmith.recipe" for name in (
        "ActivationSpec", "DistillConfig", "EqualizeConfig", "FoldBatchNormConfig", "PruneConfig", "QATConfig",
        "QLoRAConfig", "QuantizeConfig", "Recipe", "Rule", "Scheme", "SmoothConfig", "StructuredPruneConfig",
        "WeightSpec", "builtin_recipes", "load_recipe")},
    **{name: "bitsmith.stages" for name in (
        "convert_", "merge_lora_", "prepare_qat_", "prepare_qlora_", "prune_", "quantize_")},
}


def __getattr__(name: str):
    if name in _HOMES:
        importlib.import_module("bitsmith.stages")  # every stage handler registered, as run_stages needs
        value = getattr(importlib.import_module(_HOMES[name]), name)
    else:
        try:  # a subpackage: bitsmith.algorithms, bitsmith.nn, ...
            value = importlib.import_module(f"bitsmith.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"bitsmith.{name}":
                raise
            raise AttributeError(f"module 'bitsmith' has no attribute '{name}'") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


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
