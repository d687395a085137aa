"""Where the zoo keeps what it builds, and how a cached transformers directory is written and checked.

Entries live in ``$BITSMITH_CACHE/zoo`` (default ``~/.cache/bitsmith/zoo``). A directory is written beside its
final name and renamed into place, so a reader (or a build killed half way) never leaves half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["zoo_root", "read_built_dir", "write_built_dir"]


def zoo_root() -> Path:
    root = os.environ.get("BITSMITH_CACHE") or Path.home() / ".cache" / "bitsmith"
    return Path(root) / "zoo"


def read_built_dir(path: Path, tensor: str) -> dict | None:
    """The ``bitsmith_zoo.json`` of a whole transformers directory (config, tokenizer, weights holding
    ``tensor``), or None when any part is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        info = json.loads((path / "bitsmith_zoo.json").read_text())
        json.loads((path / "tokenizer.json").read_text())
        json.loads((path / "config.json").read_text())
        with safe_open(path / "model.safetensors", framework="pt") as weights:
            whole = tensor in weights.keys()
    except (OSError, ValueError, SafetensorError):
        return None
    return info if whole and isinstance(info, dict) else None


def write_built_dir(path: Path, model, tokenizer, info: dict) -> None:
    """``model`` and ``tokenizer`` saved with ``info`` as ``bitsmith_zoo.json``, renamed into place at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "bitsmith_zoo.json").write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache entry is not secret
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        if path.exists():  # stale or broken: move it aside, then swap in the new one
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}-old-", dir=path.parent))
            os.replace(path, old / "entry")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
