"""``save`` / ``load``: safetensors with packed low-bit tensors plus ``bitsmith.json``; never pickle.

A saved directory holds
    model.safetensors   every tensor of the model, quantized ones in their packed storage form, sparse layers
                        as a bitmask and their kept values where that is smaller (``bitsmith.io.sparse_storage``,
                        recorded in bitsmith.json's "sparse_storage"); a model quantized block by block from
                        disk has one file per block instead, all listed in bitsmith.json's "files", stored dense
    bitsmith.json       format version, source model, recipe, per-layer modules, what each layer got
                        ("quantized") and where that differs from the recipe ("notes"), the kernels that ran
                        when it was measured, library versions, metrics, and each file's size and sha256
    config.json, tokenizer files   for transformers models, so the directory is self-contained

Writing is staged beside the target and renamed into place (``bitsmith.io.outputs``), so a failed or killed
save leaves nothing half-written. The bytes of model.safetensors depend only on the model.

Loading checks before it builds: bitsmith.json's structure and types, file names that stay inside the
directory, sizes and checksums; then the model is built with its parameters on the ``meta`` device (no
float copy of a large model is ever made), each layer description is checked against the checkpoint's
tensor shapes from the safetensors headers (a sparse layer's bitmask and values against its record), and only
then are tensors read, sparse ones rebuilt, and bound. Loaded scales must be finite and positive, every float
tensor finite.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.algorithms._modules import replace_module, resize_
from bitsmith.io.compressed_tensors import is_compressed_tensors_dir, load_compressed_tensors
from bitsmith.io.outputs import SAFETENSORS_METADATA, prepare_output_dir, publish, staging_dir
from bitsmith.io.skeleton import float_skeleton, read_model_config
from bitsmith.io.sparse_storage import STORAGE_KEY, compact, disk_layout, expand
from bitsmith.io.adapters import ADAPTER_DIR, write_adapter
from bitsmith.nn import QUANTIZED_MODULES, InfoError, module_from_info
from bitsmith.pipeline.transaction import all_or_nothing

__all__ = [
    "save", "load", "read_metadata", "write_metadata", "weight_files", "tensors_for_disk", "prepare_output_dir",
    "staging_dir", "publish", "FORMAT_VERSION", "WEIGHTS_FILE", "META_FILE", "SAFETENSORS_METADATA",
]

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "bitsmith.json"
_MAX_META_BYTES = 64 << 20  # a bitsmith.json of a 10^4-layer model is a few MB
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")  # a plain name: no path, no '..'
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


def _source_of(model: nn.Module) -> dict:
    source = dict(getattr(model, "bitsmith_source", {}) or {})
    config = getattr(model, "config", None)
    source.setdefault("kind", "module")
    if config is not None and hasattr(config, "save_pretrained"):
        source["framework"] = "transformers"
        source["class"] = type(model).__name__
    else:
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
    tmp = staging_dir(out)
    try:
        tensors, storage = compact(model, tensors_for_disk(model.state_dict()))
        save_file(tensors, tmp / WEIGHTS_FILE, metadata=SAFETENSORS_METADATA)
        if storage:
            extra = {**(extra or {}), STORAGE_KEY: storage}
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if isinstance(getattr(model, "bitsmith_adapter", None), dict):  # a qlora stage's adapters, in peft's format
            write_adapter(model.bitsmith_adapter, tmp / ADAPTER_DIR)
        meta = write_metadata(tmp, model, [WEIGHTS_FILE], metrics, extra)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def write_metadata(directory: Path, model: nn.Module, weight_files: list[str], metrics: dict | None = None,
                   extra: dict | None = None) -> dict:
    """Write bitsmith.json into ``directory`` (which already holds ``weight_files``) and return it."""
    layers = {}
    for name, module in model.named_modules():  # a layer inside another (LoRA's base) is in its description
        parts = name.split(".")
        if isinstance(module, QUANTIZED_MODULES) and not any(".".join(parts[:i]) in layers for i in range(1, len(parts))):
            layers[name] = module.layer_info()
    # layers that quantization turned into Identity (folded BatchNorm, ReLU fused into a kernel)
    layers.update({n: {"module": "Identity"} for n, m in model.named_modules() if isinstance(m, nn.Identity)})
    meta = {
        "format_version": FORMAT_VERSION,
        "source": _source_of(model),
        "recipe": getattr(model, "bitsmith_recipe", None),
        "stages": getattr(model, "bitsmith_stages", []),
        "layers": layers,
        "shapes": getattr(model, "bitsmith_shapes", {}),
        "quantized": getattr(model, "bitsmith_quantized", {}),
        "skipped": getattr(model, "bitsmith_skipped", {}),
        "notes": getattr(model, "bitsmith_notes", {}),
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


def _check_structure(meta, meta_path: Path) -> dict:
    """bitsmith.json's shape and value types, each problem one line naming the key."""
    what = f"corrupt checkpoint: {meta_path}"
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "layers" not in meta:
        raise BitsmithError(f"corrupt or unsupported checkpoint: {meta_path} lacks format_version {FORMAT_VERSION}")
    for key in ("source", "layers", "shapes", "files", "skipped", "notes", "quantized", "metrics", "kernels",
                "kernel_decisions"):
        if key in meta and not isinstance(meta[key], dict):
            raise BitsmithError(f"{what}: '{key}' must be a mapping, not {type(meta[key]).__name__}")
    if "stages" in meta and not (isinstance(meta["stages"], list) and all(isinstance(s, dict) for s in meta["stages"])):
        raise BitsmithError(f"{what}: 'stages' must be a list of mappings")
    if meta.get("recipe") is not None and not isinstance(meta["recipe"], dict):
        raise BitsmithError(f"{what}: 'recipe' must be a mapping or null")
    for key in ("skipped", "notes", "quantized"):
        for name, text in meta.get(key, {}).items():
            if not isinstance(text, str):
                raise BitsmithError(f"{what}: '{key}.{name}' must be a string")
    for name in [*meta["layers"], *meta.get("shapes", {})]:
        if not _MODULE_NAME.match(name):
            raise BitsmithError(f"{what}: layer name {name!r} is not a module path")
    files = meta.get("files", {})
    if not files:
        raise BitsmithError(f"{what}: 'files' lists no weights file")
    for name, entry in files.items():
        if not _FILE_NAME.match(name):
            raise BitsmithError(f"{what}: file name {name!r} is not a plain .safetensors name inside the checkpoint")
        if not isinstance(entry, dict) or type(entry.get("bytes")) is not int or entry["bytes"] < 0 \
                or not (isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
            raise BitsmithError(f"{what}: 'files.{name}' needs a byte count and a sha256")
    for key in ("class", "name", "path", "kind", "framework"):
        if key in meta.get("source", {}) and not isinstance(meta["source"][key], str):
            raise BitsmithError(f"{what}: 'source.{key}' must be a string")
    return meta


def read_metadata(path: str | Path, verify: bool = True) -> dict:
    """bitsmith.json of a saved directory, checked for structure and completeness (and the weights' checksum)."""
    path = Path(path)
    if not path.exists():
        raise BitsmithError(f"no such model directory: {path}")
    if not path.is_dir():
        raise BitsmithError(f"{path} is not a directory; expected a bitsmith model directory")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise BitsmithError(f"{path} is not a bitsmith checkpoint (no {META_FILE})")
    if meta_path.stat().st_size > _MAX_META_BYTES:
        raise BitsmithError(f"corrupt checkpoint: {meta_path} is larger than {_MAX_META_BYTES >> 20} MB")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BitsmithError(f"corrupt checkpoint: {meta_path} is not valid JSON") from None
    meta = _check_structure(meta, meta_path)
    for name in weight_files(meta):
        weights = path / name
        if not weights.is_file():
            raise BitsmithError(f"incomplete checkpoint: {weights} is missing")
        if verify:
            recorded = meta["files"][name]
            if weights.stat().st_size != recorded["bytes"]:
                raise BitsmithError(
                    f"truncated or corrupt checkpoint: {weights} has {weights.stat().st_size} bytes,"
                    f" {recorded['bytes']} were written"
                )
            if _sha256(weights) != recorded["sha256"]:
                raise BitsmithError(f"corrupt checkpoint: {weights} does not match the checksum in {META_FILE}")
    return meta


def _skeleton(path: Path, meta: dict) -> nn.Module:
    """The model class of the source, its parameters on ``meta`` (no memory) and buffers real."""
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

    cls = getattr(transformers, source.get("class", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise BitsmithError(f"corrupt checkpoint: {path}: {source.get('class')!r} is not a transformers model class")
    return float_skeleton(read_model_config(path), cls)


def _headers(path: Path, names: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) from the safetensors headers, without reading any data."""
    found = {}
    for name in names:
        try:
            with safe_open(path / name, framework="pt") as f:
                for key in f.keys():
                    if key in found:
                        raise BitsmithError(f"corrupt checkpoint: tensor '{key}' is stored twice ({name})")
                    view = f.get_slice(key)
                    found[key] = (tuple(view.get_shape()), view.get_dtype())
        except (SafetensorError, OSError) as err:
            raise BitsmithError(f"corrupt or truncated checkpoint: {path / name} ({err})") from None
    return found


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8, "U8": torch.uint8,
           "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool, "F64": torch.float64, "I16": torch.int16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _replacements(model: nn.Module, meta: dict) -> dict[str, nn.Module]:
    """An empty (meta) module for every layer in bitsmith.json, each checked to fit the model."""
    replacements = {}
    for name, info in meta["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise BitsmithError(f"corrupt checkpoint: layer '{name}' in {META_FILE} is not in the model") from None
        try:
            replacements[name] = module_from_info(info)
        except InfoError as err:
            raise BitsmithError(f"corrupt checkpoint: layer '{name}' in {META_FILE}: {err}") from None
    return replacements


def _resize(model: nn.Module, shapes: dict) -> None:
    """Give the modules structured pruning shrank their saved shapes (empty tensors, bound by the checkpoint)."""
    for name, record in shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise BitsmithError(f"corrupt checkpoint: resized module '{name}' in {META_FILE} is not in the model") from None
        try:
            resize_(module, record)
        except ValueError as err:
            raise BitsmithError(f"corrupt checkpoint: resized module '{name}' in {META_FILE}: {err}") from None


def _check_against_headers(expected: dict[str, torch.Tensor], headers: dict, path: Path) -> None:
    unexpected = sorted(set(headers) - set(expected))
    if unexpected:
        raise BitsmithError(f"corrupt checkpoint: {path} has unexpected tensor '{unexpected[0]}'")
    for name, (shape, dtype) in headers.items():
        want = expected[name]
        if shape != tuple(want.shape) or _DTYPES.get(dtype) != want.dtype:
            raise BitsmithError(
                f"corrupt checkpoint: tensor '{name}' is {dtype} {list(shape)},"
                f" the model expects {want.dtype} {list(want.shape)}"
            )


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model: the source class (e.g. transformers ``BertModel``), its quantized layers on
    their runtime kernels, in eval mode. For a plain ``nn.Module`` pass a float instance of it as ``model``;
    it is changed in place, and only if the whole checkpoint fits it."""
    path = Path(path)
    if model is None and path.is_dir() and not (path / META_FILE).exists():
        if is_compressed_tensors_dir(path):  # a compressed-tensors checkpoint (ours or llm-compressor's)
            return load_compressed_tensors(path).eval()
    meta = read_metadata(path)
    target = model if model is not None else _skeleton(path, meta)
    with all_or_nothing(target):
        _resize(target, meta.get("shapes", {}))  # structured pruning's smaller layers, before the quantized ones
        replacements = _replacements(target, meta)
        for name, new in replacements.items():
            replace_module(target, name, new)
        _load_tensors(target, path, weight_files(meta), meta.get(STORAGE_KEY, {}))
        target.bitsmith_recipe = meta.get("recipe")
        target.bitsmith_stages = meta.get("stages", [])
        target.bitsmith_source = meta.get("source")
        target.bitsmith_skipped = meta.get("skipped", {})
        target.bitsmith_notes = meta.get("notes", {})
        target.bitsmith_quantized = meta.get("quantized", {})
        target.bitsmith_shapes = meta.get("shapes", {})
    from bitsmith.nn import dispatch

    dispatch.seed(meta.get("kernel_decisions"))  # the kernels it was measured with, if this is that machine
    return target.eval()


def _float_pair(model: nn.Module) -> bool:
    """Whether the input embedding and the output head are both float modules, as tying needs (a quantized
    table was untied from its float head when it was quantized, and each is stored on its own)."""
    try:
        pair = (model.get_input_embeddings(), model.get_output_embeddings())
    except (AttributeError, NotImplementedError):
        return False
    return all(isinstance(getattr(m, "weight", None), nn.Parameter) for m in pair)


def _load_tensors(model: nn.Module, path: Path, files: list[str], storage: dict) -> None:
    """Check every tensor's shape and dtype against the headers, then read, rebuild sparse ones and bind them
    (``assign``)."""
    expected = disk_layout(model, storage, model.state_dict(keep_vars=True))
    headers = _headers(path, files)
    _check_against_headers(expected, headers, path)
    tensors = {}
    for name in files:
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():
                # a copy of our own: get_tensor may hand out a view of the memory-mapped file, 8-byte aligned
                # only, and torch's packed kernels use aligned vector loads (a view crashed _weight_int8pack_mm)
                tensor = f.get_tensor(key).clone()
                # fp8 has no isfinite: checked as fp32 (e4m3fn holds NaN codes, e5m2 infinities too)
                values = tensor.float() if tensor.element_size() == 1 and tensor.is_floating_point() else tensor
                if values.is_floating_point() and not torch.isfinite(values).all():
                    raise BitsmithError(f"corrupt checkpoint: tensor '{key}' holds NaN or infinite values")
                tensors[key] = tensor
    tensors = expand(model, storage, tensors)
    model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights") and _float_pair(model):
        model.tie_weights()  # a tied head is stored once; the skeleton's meta copy is bound to the loaded one
    state = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        if name in tensors:
            continue
        shared = any(state[k].data_ptr() == tensor.data_ptr() for k in tensors if k in state)
        if tensor.device.type == "meta" or not shared:
            raise BitsmithError(f"incomplete checkpoint: tensor '{name}' is missing from {path}")
    for name, module in model.named_modules():
        check = getattr(module, "storage_problem", None)
        problem = check() if check is not None else None
        if problem:
            raise BitsmithError(f"corrupt checkpoint: layer '{name}': {problem}")

