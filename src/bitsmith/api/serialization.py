"""``save`` / ``load``: safetensors with packed low-bit tensors plus ``bitsmith.json``; never pickle.

A saved directory holds
    model.safetensors   every tensor of the model, quantized ones in their packed storage form (a model
                        quantized block by block from disk has one file per block instead, all listed
                        in bitsmith.json's "files")
    bitsmith.json       format version, source model, recipe, per-layer modules, library versions,
                        measured metrics, and each file's size and sha256 (so corruption is caught)
    config.json, tokenizer files   for transformers models, so the directory is self-contained

Writing goes to a temporary directory beside the target, renamed into place at the end, so a failed
save leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.nn import QUANTIZED_MODULES, module_from_info

__all__ = ["save", "load", "read_metadata", "write_metadata", "weight_files", "tensors_for_disk", "prepare_output_dir", "FORMAT_VERSION", "WEIGHTS_FILE", "META_FILE"]

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "bitsmith.json"


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("bitsmith", "torch", "transformers", "safetensors"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_output_dir(out: str | Path) -> Path:
    """Check that ``out`` can be created (absent or empty, parent writable) before any work is done."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BitsmithError(f"output {out} already exists and is not an empty directory; choose another --out")
    # missing parents are created at save time; the nearest existing one must be a writable directory
    ancestor = out.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BitsmithError(f"cannot write {out}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK):
        raise BitsmithError(f"cannot write {out}: no write permission in {ancestor}")
    return out


def _source_of(model: nn.Module) -> dict:
    source = dict(getattr(model, "bitsmith_source", {}) or {})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        source.setdefault("kind", "module")
        source["framework"] = "transformers"
        source["class"] = type(model).__name__
    else:
        source.setdefault("kind", "module")
        source["framework"] = "torch"
        source["class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    return source


def tensors_for_disk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with tied tensors stored once (safetensors refuses shared storage), contiguous, on the CPU."""
    tensors, seen = {}, {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and key in seen:  # tied weights: store once, record the alias
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors


def save(
    model: nn.Module,
    out: str | Path,
    *,
    tokenizer=None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Write ``model`` to the new directory ``out``; returns the metadata written to bitsmith.json."""
    out = prepare_output_dir(out)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))
    try:
        tensors = tensors_for_disk(model.state_dict())
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", "producer": "bitsmith"})
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = write_metadata(tmp, model, [WEIGHTS_FILE], metrics, extra)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def write_metadata(directory: Path, model: nn.Module, weight_files: list[str], metrics: dict | None = None,
                   extra: dict | None = None) -> dict:
    """Write bitsmith.json into ``directory`` (which already holds ``weight_files``) and return it."""
    layers = {n: m.layer_info() for n, m in model.named_modules() if isinstance(m, QUANTIZED_MODULES)}
    # layers that quantization turned into Identity (folded BatchNorm, ReLU fused into a kernel)
    layers.update({n: {"module": "Identity"} for n, m in model.named_modules() if isinstance(m, nn.Identity)})
    meta = {
        "format_version": FORMAT_VERSION,
        "source": _source_of(model),
        "recipe": getattr(model, "bitsmith_recipe", None),
        "layers": layers,
        "skipped": getattr(model, "bitsmith_skipped", {}),
        "versions": _versions(),
        "metrics": metrics or {},
        "files": {
            name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in weight_files
        },
        **(extra or {}),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def weight_files(meta: dict) -> list[str]:
    files = [name for name in meta.get("files", {}) if name.endswith(".safetensors")]
    return files or [WEIGHTS_FILE]


def read_metadata(path: str | Path, verify: bool = True) -> dict:
    """bitsmith.json of a saved directory, checked for completeness (and the weights' checksum)."""
    path = Path(path)
    if not path.exists():
        raise BitsmithError(f"no such model directory: {path}")
    if not path.is_dir():
        raise BitsmithError(f"{path} is not a directory; expected a bitsmith model directory")
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise BitsmithError(f"{path} is not a bitsmith checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BitsmithError(f"corrupt checkpoint: {meta_path} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "layers" not in meta:
        raise BitsmithError(f"corrupt or unsupported checkpoint: {meta_path} lacks format_version {FORMAT_VERSION}")
    for name in weight_files(meta):
        weights = path / name
        if not weights.exists():
            raise BitsmithError(f"incomplete checkpoint: {weights} is missing")
        if verify:
            recorded = meta.get("files", {}).get(name, {})
            if recorded.get("bytes") is not None and weights.stat().st_size != recorded["bytes"]:
                raise BitsmithError(
                    f"truncated or corrupt checkpoint: {weights} has {weights.stat().st_size} bytes,"
                    f" {recorded['bytes']} were written"
                )
            if recorded.get("sha256") and _sha256(weights) != recorded["sha256"]:
                raise BitsmithError(f"corrupt checkpoint: {weights} does not match the checksum in {META_FILE}")
    return meta


def _skeleton(path: Path, meta: dict) -> nn.Module:
    source = meta["source"]
    if source.get("kind") == "zoo":
        from bitsmith.zoo import zoo_skeleton

        skeleton = zoo_skeleton(source.get("name", ""))
        if skeleton is not None:
            return skeleton
    if source.get("framework") != "transformers":
        raise BitsmithError(
            f"{path} holds a {source.get('class', 'custom')} model: pass an instance of it, load(path, model=...)"
        )
    import transformers

    cls = getattr(transformers, source["class"], None)
    if cls is None:
        raise BitsmithError(f"{path}: transformers has no model class {source['class']}")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise BitsmithError(f"corrupt checkpoint: cannot read {path / 'config.json'} ({err})") from None
    return cls(config)


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model: the source class (e.g. transformers ``BertModel``), its quantized
    layers on their runtime kernels, in eval mode. For a plain ``nn.Module`` pass a float instance
    of it as ``model``; it is quantized in place."""
    path = Path(path)
    if model is None and path.is_dir() and not (path / META_FILE).exists():
        from bitsmith.export.llm_formats import is_compressed_tensors_dir, load_compressed_tensors

        if is_compressed_tensors_dir(path):  # a compressed-tensors checkpoint (ours or llm-compressor's)
            return load_compressed_tensors(path).eval()
    meta = read_metadata(path)
    if model is None:
        model = _skeleton(path, meta)
    for name, info in meta["layers"].items():
        try:
            new = module_from_info(info)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            getattr(parent, child)
        except (KeyError, AttributeError, TypeError):
            raise BitsmithError(f"corrupt checkpoint: layer '{name}' in {META_FILE} does not fit the model") from None
        setattr(parent, child, new)
    tensors = {}
    for name in weight_files(meta):
        try:
            tensors.update(load_file(path / name))
        except (SafetensorError, OSError) as err:
            raise BitsmithError(f"corrupt or truncated checkpoint: {path / name} ({err})") from None
    _load_tensors(model, tensors, path)
    model.bitsmith_recipe = meta.get("recipe")
    model.bitsmith_source = meta.get("source")
    model.bitsmith_skipped = meta.get("skipped", {})
    return model.eval()


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise BitsmithError(f"corrupt checkpoint: {path / WEIGHTS_FILE} has unexpected tensor '{unexpected[0]}'")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise BitsmithError(
                f"corrupt checkpoint: tensor '{name}' is {tensor.dtype} {list(tensor.shape)},"
                f" the model expects {expected[name].dtype} {list(expected[name].shape)}"
            )
    missing = set(expected) - set(tensors)
    # tied weights are stored once; anything else missing is an error
    for name in missing:
        if not any(expected[name].data_ptr() == expected[k].data_ptr() for k in tensors if k in expected):
            raise BitsmithError(f"incomplete checkpoint: tensor '{name}' is missing from {path / WEIGHTS_FILE}")
    model.load_state_dict(tensors, strict=False)
