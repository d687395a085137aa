"""Stage handlers, one module per technique: the plumbing between a stage's config (bitsmith.recipe), its math
(bitsmith.algorithms) and the pipeline (bitsmith.pipeline). Importing this package registers them all."""

# each registers its handler (and gptq / awq their block method, in this order: the order they run in a block)
from bitsmith.stages import gptq  # noqa: F401, I001
from bitsmith.stages import awq, distill, fold, imatrix, prune, qat, qlora, quantize, smooth, structured  # noqa: F401
from bitsmith.stages.prune import prune_
from bitsmith.stages.qat import convert_, prepare_qat_
from bitsmith.stages.qlora import merge_lora_, prepare_qlora_
from bitsmith.stages.quantize import plan, quantize_

__all__ = ["convert_", "merge_lora_", "plan", "prepare_qat_", "prepare_qlora_", "prune_", "quantize_"]
