"""Resolving what the user names as MODEL: a zoo name, a transformers directory, or a bitsmith directory.

Model directories are read with ``trust_remote_code=False`` everywhere: bitsmith never runs Python code
shipped in a model directory (a config's ``auto_map``) and never asks about it on stdin. A tokenizer is
read only from real tokenizer files; a directory without them gets the tokenizer of its float source, or
none (then a task that needs one says so) - never transformers' placeholder tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.io.compressed_tensors import is_compressed_tensors_dir, load_compressed_tensors
from bitsmith.io.gguf import read_gguf
from bitsmith.io.serialization import META_FILE, load, read_metadata
from bitsmith.io.skeleton import first_line, is_causal_lm_dir, read_model_config
from bitsmith.zoo import ZOO

__all__ = [
    "LoadedModel", "ZOO", "DirectoryKind", "DIRECTORY_KINDS", "FILE_KINDS", "register_directory_kind", "load_model", "load_float_source", "state_bytes", "read_model_config", "load_tokenizer",
    "has_tokenizer_files",
]

# any one of these makes a directory's tokenizer real (a fast tokenizer file, or a slow one's vocabulary)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: dict  # how to get the float original back: {"kind": "zoo", "name": ...} or a directory
    compressed: bool = False
    meta: dict = field(default_factory=dict)  # bitsmith.json of a compressed directory


def has_tokenizer_files(path: Path) -> bool:
    path = Path(path)
    return any((path / name).is_file() for name in _TOKENIZER_FILES) or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file())


def load_tokenizer(path: Path):
    """The tokenizer in ``path``, or None when it has no tokenizer files."""
    from transformers import AutoTokenizer

    if not has_tokenizer_files(path):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise BitsmithError(f"cannot read the tokenizer in {path}: {first_line(err)}") from None


def _load_transformers_dir(path: Path):
    from transformers import AutoModel, AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = read_model_config(path)  # refuses remote code before any weights are read
    auto = AutoModelForCausalLM if is_causal_lm_dir(path) else AutoModel  # keep the LM head of a causal LM
    try:
        model, info = auto.from_pretrained(path, config=config, local_files_only=True, trust_remote_code=False,
                                           output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise BitsmithError(f"cannot load a transformers model from {path}: {first_line(err)}") from None
    # transformers fills tensors the checkpoint lacks with random values and only warns: a wrong model
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing:
        raise BitsmithError(f"{path}: the checkpoint does not fit a {type(model).__name__} (tensor {missing[0]}"
                            " is missing or of another shape); is it a bitsmith checkpoint without its bitsmith.json?")
    model.eval()
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise BitsmithError(f"{path} has no tokenizer files; bitsmith evaluates text models with their tokenizer")
    return model.float(), tokenizer


def load_float_source(source: dict) -> tuple[nn.Module, object]:
    """The float model a compressed one came from, for reference outputs."""
    if source.get("kind") == "zoo" and source.get("name") in ZOO:
        loaded = load_model(source["name"])
        return loaded.model, loaded.tokenizer
    path = source.get("path")
    if isinstance(path, str) and path and Path(path).is_dir():
        return _load_transformers_dir(Path(path))
    raise BitsmithError(f"the float source model of this checkpoint ({path or source}) is not available here")


def _source_tokenizer(source: dict):
    """The tokenizer of a compressed model's float source, without loading the source's weights."""
    if source.get("kind") == "zoo" and source.get("name") in ZOO:
        return load_model(source["name"]).tokenizer
    path = source.get("path")
    if isinstance(path, str) and path and Path(path).is_dir():
        return load_tokenizer(Path(path))
    return None


def _load_zoo(name: str) -> LoadedModel:
    model, tokenizer = ZOO[name].implementation().load()
    model.bitsmith_source = {"kind": "zoo", "name": name}  # save() records it; load() rebuilds it
    return LoadedModel(model, tokenizer, model.bitsmith_source)


def _read_bitsmith_dir(path: Path) -> LoadedModel:
    meta = read_metadata(path)
    model = load(path)
    tokenizer = load_tokenizer(path) or _source_tokenizer(meta["source"])
    return LoadedModel(model, tokenizer, meta["source"], compressed=True, meta=meta)


def _read_compressed_tensors_dir(path: Path) -> LoadedModel:
    model = load_compressed_tensors(path)  # e.g. made by llm-compressor: runs on bitsmith's modules
    source = {"kind": "compressed-tensors", "path": str(path.resolve())}
    model.bitsmith_source = source
    return LoadedModel(model, load_tokenizer(path), source, compressed=True)


def _read_transformers_dir(path: Path) -> LoadedModel:
    model, tokenizer = _load_transformers_dir(path)
    return LoadedModel(model, tokenizer, {"kind": "transformers-dir", "path": str(path.resolve())})


def _read_gguf_file(path: Path) -> LoadedModel:
    model, tokenizer, notes = read_gguf(path)  # a llama.cpp model: its codes on bitsmith's modules
    source = {"kind": "gguf", "path": str(path.resolve())}  # no float original to compare with
    model.bitsmith_source = source
    return LoadedModel(model, tokenizer, source, compressed=True, meta={"notes": notes})


FILE_KINDS: dict[str, Callable[[Path], LoadedModel]] = {".gguf": _read_gguf_file}  # a model in one file, by suffix


@dataclass(frozen=True)
class DirectoryKind:
    name: str
    claims: Callable[[Path], bool]  # whether a directory is of this kind (the first kind that claims it reads it)
    read: Callable[[Path], LoadedModel]


DIRECTORY_KINDS: list[DirectoryKind] = []


def register_directory_kind(kind: DirectoryKind) -> None:
    DIRECTORY_KINDS.append(kind)


register_directory_kind(DirectoryKind("bitsmith", lambda p: (p / META_FILE).exists(), _read_bitsmith_dir))
register_directory_kind(DirectoryKind("compressed-tensors", is_compressed_tensors_dir, _read_compressed_tensors_dir))
register_directory_kind(DirectoryKind("transformers", lambda p: (p / "config.json").exists(), _read_transformers_dir))


def load_model(name_or_path: str | os.PathLike) -> LoadedModel:
    """A zoo name (``minilm``), a directory of one of the registered kinds (bitsmith, compressed-tensors,
    transformers), or a file of one of FILE_KINDS (a llama.cpp ``.gguf``)."""
    text = str(name_or_path)
    if text in ZOO:
        return _load_zoo(text)
    path = Path(text)
    if not path.exists():
        raise BitsmithError(f"model not found: '{text}' is neither a zoo name ({', '.join(ZOO)}) nor a directory")
    if not path.is_dir():
        if path.suffix.lower() in FILE_KINDS:
            return FILE_KINDS[path.suffix.lower()](path)
        raise BitsmithError(f"model path {path} is a file; pass the model's directory (or a"
                            f" {' / '.join(FILE_KINDS)} file)")
    kind = next((k for k in DIRECTORY_KINDS if k.claims(path)), None)
    if kind is None:
        raise BitsmithError(f"{path} is neither a transformers model directory (no config.json) nor a bitsmith"
                            " checkpoint")
    return kind.read(path)


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as saved (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
