"""LoRA adapters in peft's format, so that peft loads them on the float base model:

    <dir>/adapter_config.json         peft's LoraConfig (r, lora_alpha, lora_dropout, target_modules, task_type),
                                      written by peft itself
    <dir>/adapter_model.safetensors   base_model.model.<layer>.lora_A.weight (rank, in_features)
                                      base_model.model.<layer>.lora_B.weight (out_features, rank)

``PeftModel.from_pretrained(float_model, dir)`` then gives the adapted float model. The tensors are bitsmith's
(``nn/lora.py``); peft's own layers wrap only torch's and a few quantization libraries' modules, so bitsmith
trains its own LoRALinear and uses peft for the file format and the check that it loads.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from bitsmith.errors import BitsmithError

__all__ = ["write_adapter", "ADAPTER_DIR"]

ADAPTER_DIR = "adapter"


def write_adapter(record: dict, directory: Path) -> None:
    """Write ``record`` (``stages/qlora.adapter_record``: peft's config fields, tensors by peft's names) into the
    new directory ``directory``."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise BitsmithError("writing LoRA adapters in peft's format needs peft: pip install peft") from None
    directory.mkdir(parents=True)
    LoraConfig(**record["config"]).save_pretrained(str(directory))
    save_file(record["tensors"], str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})

