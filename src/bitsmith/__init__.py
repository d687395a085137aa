"""bitsmith: make trained PyTorch models smaller and faster, and prove it with measurements.

    import bitsmith
    bitsmith.quantize_(model, bitsmith.load_recipe("w8a8-dynamic"))
    bitsmith.save(model, "out/minilm-w8a8")
    model = bitsmith.load("out/minilm-w8a8")
"""

from bitsmith.api.compress import compress, evaluate
from bitsmith.api.config import ActivationSpec, QuantizeConfig, Recipe, Rule, Scheme, WeightSpec
from bitsmith.api.quantize import quantize_
from bitsmith.api.recipes import builtin_recipes, load_recipe
from bitsmith.api.serialization import load, read_metadata, save
from bitsmith.errors import BitsmithError

__version__ = "0.1.0"

__all__ = [
    "ActivationSpec",
    "BitsmithError",
    "QuantizeConfig",
    "Recipe",
    "Rule",
    "Scheme",
    "WeightSpec",
    "builtin_recipes",
    "compress",
    "evaluate",
    "load",
    "load_recipe",
    "quantize_",
    "read_metadata",
    "save",
]
