"""Stage handlers, one module per technique: the plumbing between a stage's config (bitsmith.recipe), its math
(bitsmith.algorithms) and the pipeline (bitsmith.pipeline). Importing this package registers them all."""

from bitsmith.stages import awq, fold, gptq, quantize, smooth  # noqa: F401 - each registers its handler
from bitsmith.stages.quantize import plan, quantize_

__all__ = ["plan", "quantize_"]
