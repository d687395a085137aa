"""Resolving what the user names as MODEL: a zoo name, a transformers directory, or a bitsmith directory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from bitsmith.errors import BitsmithError

__all__ = ["LoadedModel", "ZOO", "load_model", "load_float_source", "state_bytes"]

from bitsmith.zoo import ZOO


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: dict  # how to get the float original back: {"kind": "zoo", "name": ...} or a directory
    compressed: bool = False
    meta: dict = field(default_factory=dict)  # bitsmith.json of a compressed directory


def _is_causal_lm_dir(path: Path) -> bool:
    import json

    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForCausalLM") for a in architectures)


def _load_transformers_dir(path: Path):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    auto = AutoModelForCausalLM if _is_causal_lm_dir(path) else AutoModel  # keep the LM head of a causal LM
    try:
        model = auto.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BitsmithError(f"cannot load a transformers model from {path}: {first}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError):
        raise BitsmithError(f"{path} has no tokenizer files; bitsmith evaluates text models with their tokenizer") from None
    return model.float(), tokenizer


def load_float_source(source: dict) -> tuple[nn.Module, object]:
    """The float model a compressed one came from, for reference outputs."""
    if source.get("kind") == "zoo" or source.get("name") in ZOO:
        loaded = load_model(source["name"])
        return loaded.model, loaded.tokenizer
    path = source.get("path")
    if path and Path(path).is_dir():
        model, tokenizer = _load_transformers_dir(Path(path))
        return model, tokenizer
    raise BitsmithError(f"the float source model of this checkpoint ({path or source}) is not available here")


def load_model(name_or_path: str | os.PathLike) -> LoadedModel:
    """A zoo name (``minilm``), a local transformers model directory, or a bitsmith directory."""
    text = str(name_or_path)
    if text == "minilm":
        from bitsmith.zoo.minilm import load_minilm

        model, tokenizer = load_minilm()
        model.bitsmith_source = {"kind": "zoo", "name": "minilm"}
        return LoadedModel(model, tokenizer, model.bitsmith_source)
    if text == "docs-lm":
        from bitsmith.zoo.docs_lm import load_docs_lm

        model, tokenizer = load_docs_lm()
        model.bitsmith_source = {"kind": "zoo", "name": "docs-lm"}
        return LoadedModel(model, tokenizer, model.bitsmith_source)
    if text == "digits-cnn":
        from bitsmith.zoo.digits import load_digits_cnn

        model = load_digits_cnn()
        model.bitsmith_source = {"kind": "zoo", "name": "digits-cnn"}  # save() records it; load() rebuilds it
        return LoadedModel(model, None, model.bitsmith_source)
    path = Path(text)
    if not path.exists():
        raise BitsmithError(f"model not found: '{text}' is neither a zoo name ({', '.join(ZOO)}) nor a directory")
    if not path.is_dir():
        raise BitsmithError(f"model path {path} is a file; pass the model's directory")
    if (path / "bitsmith.json").exists():
        from bitsmith.api.serialization import load, read_metadata
        from transformers import AutoTokenizer

        meta = read_metadata(path)
        model = load(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError):
            tokenizer = None
        return LoadedModel(model, tokenizer, meta["source"], compressed=True, meta=meta)
    if (path / "config.json").exists():
        from bitsmith.export.llm_formats import is_compressed_tensors_dir, load_compressed_tensors

        if is_compressed_tensors_dir(path):  # e.g. made by llm-compressor: runs on bitsmith's modules
            from transformers import AutoTokenizer

            model = load_compressed_tensors(path)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            source = {"kind": "compressed-tensors", "path": str(path.resolve())}
            model.bitsmith_source = source
            return LoadedModel(model, tokenizer, source, compressed=True)
        model, tokenizer = _load_transformers_dir(path)
        return LoadedModel(model, tokenizer, {"kind": "transformers-dir", "path": str(path.resolve())})
    raise BitsmithError(f"{path} is neither a transformers model directory (no config.json) nor a bitsmith checkpoint")


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as saved (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total

