"""Quantize a model larger than memory: one decoder block in memory at a time, the rest on disk.

    1. The model is built from its config with every parameter on the ``meta`` device (no memory),
       buffers real (rotary tables); the parameters outside the blocks (embeddings, final norm,
       lm_head) are read from the checkpoint's safetensors files.
    2. The calibration batches run up to the first block; its inputs are kept.
    3. For each block: its tensors are read from the memory-mapped safetensors file(s) (the file is
       mapped for that read only, so its pages leave this process afterwards), its layers are
       quantized (GPTQ, AWQ or round-to-nearest, as the recipe says, on the kept inputs), the block
       runs once to give the next block's inputs, its quantized tensors are written to their own
       shard, and the block goes back to ``meta``.
    4. The layers outside the blocks are quantized round-to-nearest and written last.

Peak memory is about the non-block parameters plus one block, its quantization temporaries (a GPTQ
Hessian) and the calibration activations. The output is an ordinary bitsmith directory (one weights
file per block, all listed in bitsmith.json) that ``bitsmith.load`` reads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from bitsmith.api.calibrate import calibration_batches, run_batch
from bitsmith.api.config import QuantizeConfig, Recipe
from bitsmith.api.quantize import QuantizeReport, gptq_note, plan, quantize_, quantize_linear
from bitsmith.api.sequential import (
    _capture_inputs,
    _gptq_block,
    _run_block,
    awq_block,
    block_targets,
    find_blocks,
    finish_block_,
    model_family,
)
from bitsmith.api.models import read_model_config
from bitsmith.api.serialization import (
    SAFETENSORS_METADATA,
    build_on_meta,
    prepare_output_dir,
    publish,
    staging_dir,
    tensors_for_disk,
    write_metadata,
)
from bitsmith.checkpoint_files import weight_map
from bitsmith.errors import BitsmithError

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


def _weight_only_rtn(config: QuantizeConfig) -> QuantizeConfig:
    """The same rules with every calibrated algorithm replaced by round-to-nearest (for non-block layers)."""
    data = config.model_dump(mode="json")
    for rule in data["rules"]:
        if rule["scheme"] is not None:
            rule["scheme"]["weights"]["algorithm"] = "rtn"
    return QuantizeConfig.model_validate(data)


def _quantize_block(block, prefix, index, chosen, config, family, inputs, pending, report: QuantizeReport,
                    progress) -> None:
    names = block_targets(prefix, index, chosen)
    by_algorithm: dict[str, dict[str, str]] = {}
    for local, full in names.items():
        by_algorithm.setdefault(chosen[full].weights.algorithm, {})[local] = full
    done = {full: "rtn" for full in names.values()}
    if "gptq" in by_algorithm:
        infos = _gptq_block(block, by_algorithm["gptq"], chosen, inputs, config.gptq, pending, progress)
        for full, info in infos.items():
            done[full], note = gptq_note(info, config.gptq)
            if note:
                report.note(full, note)
    if "awq" in by_algorithm:
        infos, notes = awq_block(block, f"{prefix}.{index}.", {f: chosen[f] for f in by_algorithm["awq"].values()},
                                 family, inputs, config, pending, progress)
        for full, info in infos.items():
            done[full] = "rtn" if info.get("no_data") else "awq"
        for full, text in notes.items():
            report.note(full, text)
    with torch.no_grad():
        for local, full in by_algorithm.get("rtn", {}).items():
            block.set_submodule(local, quantize_linear(full, block.get_submodule(local), chosen[full]), strict=True)
            if progress is not None:
                progress(full)
    for full, algorithm in done.items():
        report.quantized[full] = chosen[full].describe(algorithm)


def quantize_offloaded(
    source: str | Path,
    config: QuantizeConfig | Recipe,
    out: str | Path,
    calibration: Iterable,
    *,
    source_info: dict | None = None,
    progress=None,
) -> dict:
    """Quantize the transformers causal-LM checkpoint in ``source`` block by block from disk into the
    bitsmith directory ``out``; returns {"quantized": {name: scheme}, "blocks": n, "files": [...]}.

    Weight-only schemes (round-to-nearest, GPTQ, AWQ) and dynamic W8A8 are supported; static
    activation ranges need the whole model run at once and are refused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = Path(source)
    if not source.is_dir():
        raise BitsmithError(f"no such model directory: {source}")
    recipe_dict = config.model_dump(mode="json")
    if isinstance(config, Recipe):
        config = config.quantize
    if config.is_static or config.smoothquant is not None:
        raise BitsmithError("the block-by-block pipeline quantizes weights (rtn, gptq, awq) and dynamic W8A8 only")
    out = prepare_output_dir(out)
    files = checkpoint_files(source)
    hf_config = read_model_config(source)
    with build_on_meta():
        model = AutoModelForCausalLM.from_config(hf_config).eval()
    # the whole recipe against every block, and the whole checkpoint, before the first block runs
    chosen, skipped = plan(model, config)
    prefix, blocks = find_blocks(model, chosen, "the block-by-block pipeline")
    calibrated = any(s.weights.algorithm != "rtn" for s in chosen.values())
    _check_checkpoint(model, files, chosen)
    outside = [n for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(prefix + ".")]
    present = [n for n in outside if n in files]
    _load_outside(model, prefix, present, files)
    family = model_family(model, blocks[0], config) if any(s.weights.algorithm == "awq" for s in chosen.values()) else None
    batches = calibration_batches(calibration) if calibrated else None
    _check_recipe_calibration(config, batches)

    report = QuantizeReport(skipped=skipped)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    try:
        inputs = _capture_inputs(model, blocks[0], batches, run_batch) if calibrated else None
        _params_to_meta(model, present)  # embeddings and lm_head wait on disk while the blocks run
        _release_memory()
        written = []
        for index, block in enumerate(blocks):
            block_prefix = f"{prefix}.{index}."
            _materialize(block, block_prefix, files)
            pending = []
            _quantize_block(block, prefix, index, chosen, config, family, inputs, pending, report, progress)
            if inputs is not None:
                inputs = _run_block(block, inputs)
            finish_block_(block, pending)
            name = f"model-block-{index:05d}.safetensors"
            save_file(tensors_for_disk(block.state_dict(prefix=block_prefix)), tmp / name, metadata=SAFETENSORS_METADATA)
            written.append(name)
            _to_meta(block)
            _release_memory()
            if progress is not None:
                progress(f"block {index + 1}/{len(blocks)} written")
        del inputs
        _load_outside(model, prefix, present, files)
        rest = {n: s for n, s in chosen.items() if not n.startswith(prefix + ".")}
        if rest:
            rest_report = quantize_(model, _weight_only_rtn(config))
            report.quantized.update(rest_report.quantized)
            for name in rest:
                if chosen[name].weights.algorithm != "rtn":
                    report.note(name, f"outside the repeated blocks: round-to-nearest instead of {chosen[name].weights.algorithm}")
        state = tensors_for_disk({k: v for k, v in model.state_dict().items() if not k.startswith(prefix + ".")})
        save_file(state, tmp / "model-rest.safetensors", metadata=SAFETENSORS_METADATA)
        written.append("model-rest.safetensors")
        model.bitsmith_recipe = recipe_dict
        model.bitsmith_skipped = report.skipped
        model.bitsmith_notes = report.notes
        model.bitsmith_quantized = report.quantized
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
    return {"quantized": report.quantized, "skipped": report.skipped, "notes": report.notes, "blocks": len(blocks),
            "files": written}


def _check_recipe_calibration(config: QuantizeConfig, batches) -> None:
    if config.needs_calibration and batches is None:
        raise BitsmithError("this recipe calibrates (gptq or awq): give calibration data (--calib)")


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
