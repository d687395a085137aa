"""Compress a model larger than memory: the recipe's stages run on one decoder block in memory at a time,
the rest on disk. The stages are the same as in memory; only the block source differs (``DiskBlocks``).

    1. The model is built from its config with every parameter on the ``meta`` device (no memory),
       buffers real (rotary tables); the parameters outside the blocks (embeddings, final norm,
       lm_head) are read from the checkpoint's safetensors files.
    2. The pipeline runs the recipe (``pipeline.run_stages``); its block runner captures the first
       block's inputs, then ``DiskBlocks`` puts the outside parameters back on disk.
    3. For each block: its tensors are read from the memory-mapped safetensors file(s) (the file is
       mapped for that read only, so its pages leave this process afterwards), the stage changes it
       (GPTQ, AWQ or round-to-nearest, as the recipe says, on the kept inputs), the block runs once to
       give the next block's inputs, its tensors are written to their own shard, and the block goes
       back to ``meta``.
    4. The outside parameters are read again; the stage quantizes the layers there (round-to-nearest)
       and they are written last.

Peak memory is about the non-block parameters plus one block, its quantization temporaries (a GPTQ
Hessian) and the calibration activations. The output is an ordinary bitsmith directory (one weights
file per block, all listed in bitsmith.json) that ``bitsmith.load`` reads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.io.checkpoint_files import weight_map
from bitsmith.io.serialization import (
    SAFETENSORS_METADATA,
    prepare_output_dir,
    publish,
    staging_dir,
    tensors_for_disk,
    write_metadata,
)
from bitsmith.io.skeleton import float_skeleton, read_model_config
from bitsmith.pipeline import BlockSource, run_stages
from bitsmith.pipeline.run import check_stages
from bitsmith.pipeline.blocks import find_blocks
from bitsmith.recipe import QuantizeConfig, Recipe
from bitsmith.stages import plan

__all__ = ["quantize_offloaded", "checkpoint_files"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "generation_config.json", "vocab.json", "merges.txt")


def checkpoint_files(source: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a transformers checkpoint directory (single file or sharded)."""
    return weight_map(source)


def _read(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors by name, each file mapped once for this read and unmapped after."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        if name not in files:
            raise BitsmithError(f"incomplete checkpoint: tensor '{name}' is in no safetensors file")
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, keys in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                for key in keys:
                    out[key] = f.get_tensor(key).clone()  # aligned memory of our own, not a view of the mapped file
        except (SafetensorError, OSError) as err:
            raise BitsmithError(f"corrupt or truncated checkpoint: {path} ({err})") from None
    return out


def _materialize(module: nn.Module, prefix: str, files: dict[str, Path], locals_: list[str] | None = None) -> None:
    """Replace ``module``'s meta parameters (or those named in ``locals_``) with the checkpoint's tensors,
    stored under ``prefix + local``."""
    if locals_ is None:
        locals_ = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    tensors = _read(files, [prefix + n for n in locals_])
    for local in locals_:
        owner_name, _, attr = local.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        expected = owner._parameters[attr]
        tensor = tensors[prefix + local]
        if tuple(tensor.shape) != tuple(expected.shape):
            raise BitsmithError(
                f"corrupt checkpoint: tensor '{prefix + local}' is {list(tensor.shape)},"
                f" the model expects {list(expected.shape)}"
            )
        owner._parameters[attr] = nn.Parameter(tensor.to(expected.dtype), requires_grad=False)


def _to_meta(module: nn.Module) -> None:
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = buffer.to("meta")
        for name, value in list(vars(sub).items()):  # runtime caches (prepacked weights) go too
            if name.startswith("_") and (isinstance(value, torch.Tensor) or (
                    isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value))):
                setattr(sub, name, None)


def _release_memory() -> None:
    """Give freed memory back to the OS (glibc keeps freed heap pages otherwise: RSS would grow by
    about a block per block)."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _params_to_meta(model: nn.Module, names: list[str]) -> None:
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._parameters[attr] = nn.Parameter(owner._parameters[attr].to("meta"), requires_grad=False)


class DiskBlocks(BlockSource):
    """Blocks read from the checkpoint when their turn comes, written to their own shard and dropped after."""

    offloaded = True

    def __init__(self, files: dict[str, Path], prefix: str, outside: list[str], tmp: Path, count: int, progress=None):
        self.files, self.prefix, self.outside, self.tmp, self.count = files, prefix, outside, tmp, count
        self.progress = progress
        self.written: list[str] = []

    def start(self, model: nn.Module) -> None:
        _params_to_meta(model, self.outside)  # embeddings and lm_head wait on disk while the blocks run
        _release_memory()

    def load(self, index: int, block: nn.Module) -> None:
        _materialize(block, f"{self.prefix}.{index}.", self.files)

    def release(self, index: int, block: nn.Module) -> None:
        name = f"model-block-{index:05d}.safetensors"
        state = tensors_for_disk(block.state_dict(prefix=f"{self.prefix}.{index}."))
        save_file(state, self.tmp / name, metadata=SAFETENSORS_METADATA)
        self.written.append(name)
        _to_meta(block)
        _release_memory()
        if self.progress is not None:
            self.progress(f"block {index + 1}/{self.count} written")

    def finish(self, model: nn.Module) -> None:
        _load_outside(model, self.prefix, self.outside, self.files)


def quantize_offloaded(
    source: str | Path,
    config: QuantizeConfig | Recipe,
    out: str | Path,
    calibration: Iterable | None,
    *,
    source_info: dict | None = None,
    progress=None,
) -> dict:
    """Run ``config`` (a recipe whose stages can work block by block: quantize with weight-only schemes or
    dynamic W8A8) on the transformers causal-LM checkpoint in ``source``, block by block from disk, into the
    bitsmith directory ``out``; returns {"quantized", "skipped", "notes", "stages", "blocks", "files"}."""
    source = Path(source)
    if not source.is_dir():
        raise BitsmithError(f"no such model directory: {source}")
    recipe = Recipe.of(config, "quantize_")
    out = prepare_output_dir(out)
    files = checkpoint_files(source)
    hf_config = read_model_config(source)
    model = float_skeleton(hf_config, causal=True).eval()
    # the whole recipe against every block, and the whole checkpoint, before the first block runs
    chosen = {name: scheme for stage in recipe.stages_of(QuantizeConfig) for name, scheme in plan(model, stage)[0].items()}
    prefix, blocks = find_blocks(model, chosen, "the block-by-block pipeline")
    check_stages(model, recipe, calibration, blocks=DiskBlocks(files, prefix, [], out, len(blocks)))
    _check_checkpoint(model, files, chosen)
    outside = [n for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(prefix + ".")]
    present = [n for n in outside if n in files]
    _load_outside(model, prefix, present, files)

    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    try:
        disk = DiskBlocks(files, prefix, present, tmp, len(blocks), progress)
        report = run_stages(model, recipe, calibration, blocks=disk, progress=progress)
        state = tensors_for_disk({k: v for k, v in model.state_dict().items() if not k.startswith(prefix + ".")})
        save_file(state, tmp / "model-rest.safetensors", metadata=SAFETENSORS_METADATA)
        written = [*disk.written, "model-rest.safetensors"]
        # where the float original is, so that `bitsmith eval` can compare against it
        model.bitsmith_source = source_info or {"kind": "transformers-dir", "path": str(source.resolve())}
        hf_config.save_pretrained(tmp)
        for name in _TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, tmp / name)
        write_metadata(tmp, model, written, extra={"pipeline": "block by block from disk"})
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"quantized": report.quantized, "skipped": report.skipped, "notes": report.notes,
            "stages": report.as_list(), "blocks": len(blocks), "files": written}


def _check_checkpoint(model: nn.Module, files: dict[str, Path], chosen: dict) -> None:
    """Every tensor the model needs is in the checkpoint with the right shape, and every float tensor is
    finite: read once, one tensor at a time, before any block is quantized (a NaN in the last block would
    otherwise surface hours in)."""
    expected = dict(model.named_parameters(remove_duplicate=False))
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                for name in names:
                    shape = list(f.get_slice(name).get_shape())
                    if shape != list(expected[name].shape):
                        raise BitsmithError(f"corrupt checkpoint: tensor '{name}' is {shape},"
                                            f" the model expects {list(expected[name].shape)}")
                    tensor = f.get_tensor(name)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        owner = name.rpartition(".")[0]
                        what = f"layer '{owner}'" if owner in chosen else f"tensor '{name}'"
                        raise BitsmithError(f"{what} has NaN or infinite weights in {path.name}; fix the model"
                                            " before quantizing")
                    del tensor
        except (SafetensorError, OSError) as err:
            raise BitsmithError(f"corrupt or truncated checkpoint: {path} ({err})") from None


def _load_outside(model: nn.Module, prefix: str, present: list[str], files: dict[str, Path]) -> None:
    """Parameters outside the blocks from the checkpoint; tied ones (lm_head = embedding) re-tied."""
    _materialize(model, "", files, present)
    outside = lambda: [(n, p) for n, p in model.named_parameters(remove_duplicate=False)  # noqa: E731
                       if not n.startswith(prefix + ".")]
    if any(p.device.type == "meta" for _, p in outside()):
        model.tie_weights()  # e.g. lm_head tied to the embedding and stored once
    missing = [n for n, p in outside() if p.device.type == "meta"]
    if missing:
        raise BitsmithError(f"incomplete checkpoint: tensor '{missing[0]}' is in no safetensors file")
