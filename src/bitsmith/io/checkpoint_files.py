"""Which safetensors files a transformers checkpoint directory holds, read so that no name in it can point
outside the directory (``model.safetensors.index.json`` is user input like any other)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

from bitsmith.errors import BitsmithError

__all__ = ["weight_map", "shard_names"]

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")  # no directory part, no '..'


def _index(directory: Path) -> dict[str, str]:
    index = directory / INDEX_FILE
    try:
        mapping = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
        raise BitsmithError(f"corrupt checkpoint: {index} has no weight_map of tensor names to files") from None
    if not isinstance(mapping, dict) or not mapping:
        raise BitsmithError(f"corrupt checkpoint: {index} has no weight_map of tensor names to files")
    for tensor, name in mapping.items():
        if not (isinstance(name, str) and _PLAIN_NAME.match(name)):
            raise BitsmithError(f"corrupt checkpoint: {index} maps '{tensor}' to {name!r}, not a .safetensors file"
                                f" in {directory}")
        if not (directory / name).is_file():
            raise BitsmithError(f"incomplete checkpoint: {directory / name}, named in {INDEX_FILE}, is missing")
    return mapping


def weight_map(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for ``model.safetensors`` or the shards of its index."""
    directory = Path(directory)
    if (directory / INDEX_FILE).exists():
        return {tensor: directory / name for tensor, name in _index(directory).items()}
    single = directory / WEIGHTS_FILE
    if not single.is_file():
        raise BitsmithError(f"{directory} has no {WEIGHTS_FILE} or {INDEX_FILE}")
    try:
        with safe_open(single, framework="pt") as f:
            return {tensor: single for tensor in f.keys()}
    except (SafetensorError, OSError) as err:
        raise BitsmithError(f"corrupt or truncated checkpoint: {single} ({err})") from None


def shard_names(directory: str | Path) -> list[str]:
    """The safetensors file names of the checkpoint in ``directory``, sorted."""
    directory = Path(directory)
    if (directory / INDEX_FILE).exists():
        return sorted(set(_index(directory).values()))
    return [WEIGHTS_FILE]
