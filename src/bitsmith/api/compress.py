"""``compress``: the orchestrator. Load the model, read calibration data once, run the recipe's stages
(``pipeline.run_stages``), measure the result against the float original on the same input, save it."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.evaluation.measure import interleaved_latency, read_text
from bitsmith.evaluation.tasks import LanguageModelTask, task_for
from bitsmith.io.models import load_float_source, load_model, load_tokenizer, state_bytes
from bitsmith.io.serialization import prepare_output_dir, save
from bitsmith.io.sparse_storage import zero_mask
from bitsmith.nn import cpu, dispatch, native
import bitsmith.stages  # noqa: F401  (registers every stage handler run_stages looks up)
from bitsmith.pipeline import run_stages
from bitsmith.pipeline.distributed import init_from_env, is_main, shutdown, world  # noqa: F401 (the CLI's --nproc)
from bitsmith.recipe import Recipe, load_recipe
from bitsmith.zoo import ZOO, zoo_model_dir

__all__ = ["compress", "evaluate", "machine_summary", "check_counts"]


def machine_summary() -> dict:
    """The machine a measurement was taken on, with the facts that decide its kernels."""
    facts = cpu.summary()
    return {"cpu": facts["cpu"], "threads": torch.get_num_threads(), "torch": torch.__version__,
            "flags": facts["flags"], "int8": facts["onednn_int8"], "int8_dot_product": facts["int8_dot_product"],
            "bf16": facts["bf16"], "library_caps": facts["library_caps"], "native": native.status()}


def check_counts(repeats: int | None = None, calib_samples: int | None = None) -> None:
    """Counts the user gave, checked before any work: whole numbers, at least 1."""
    for flag, value in (("--repeats", repeats), ("--calib-samples", calib_samples)):
        if value is not None and (type(value) is not int or value < 1):
            raise BitsmithError(f"{flag} must be a whole number of at least 1, got {value!r}")


def _kernels_ran(model: nn.Module) -> dict[str, dict]:
    """Per layer, the kernel that ran last (during the timed runs) and on how many rows."""
    ran = {}
    for name, module in model.named_modules():
        last = getattr(module, "last_kernel", None)
        if last is not None:
            ran[name] = {"kernel": last[0], "rows": last[1]}
    return ran


def pruning_figures(model: nn.Module, report) -> dict:
    """What pruning stages left, measured on the final model: the fraction of zero weights over the layers a
    prune stage made sparse (after quantization too: codes at their zero point), and the parameters that
    structured pruning removed. Empty without a pruning stage."""
    figures = {}
    sparse = {name for stage in report.stages for name in stage.summary.get("sparsity", {})}
    masks = [zero_mask(model.get_submodule(name)) for name in sorted(sparse)]
    masks = [m for m in masks if m is not None]
    if masks:
        figures["sparsity"] = round(sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks), 4)
        figures["sparse_layers"] = len(masks)
    for stage in report.stages:
        if "parameters_removed" in stage.summary:
            figures["parameters_removed"] = stage.summary["parameters_removed"]
            figures["original_parameters"] = stage.summary["parameters_before"]
            figures["parameters"] = stage.summary["parameters_after"]
    return figures


def _measure(task, float_model, quant_model, repeats: int) -> dict:
    """Fidelity and latency of the two models on the task's same input, timed in turn."""
    fidelity = task.fidelity(float_model, quant_model)
    latency = interleaved_latency({"float": task.runner(float_model), "compressed": task.runner(quant_model)}, repeats)
    return {
        "task": task.name,
        "evaluation": task.evaluation,
        "original_latency_s": round(latency["float"], 4),
        "latency_s": round(latency["compressed"], 4),
        "latency_ratio": round(latency["compressed"] / latency["float"], 3),
        **fidelity,
    }


def _own_measure(task, model, repeats: int) -> dict:
    """A model on its own (no float original to compare with): its figures and its latency, timed once."""
    figures = task.own_figures(model)
    latency = interleaved_latency({"model": task.runner(model)}, repeats)
    return {"task": task.name, "evaluation": task.evaluation, "latency_s": round(latency["model"], 4), **figures}


def merged_recipe(recipe: Recipe) -> Recipe:
    """``recipe`` with every qlora stage's ``merge`` on (compress --merge)."""
    try:
        return recipe.with_options("qlora", merge=True)
    except ValueError:
        raise BitsmithError(f"--merge folds LoRA adapters into the weights: the recipe {recipe.name!r} has no"
                            " qlora stage") from None


def compress(
    model: str | nn.Module,
    recipe: str | Recipe = "w8a8-dynamic",
    out: str | Path | None = None,
    *,
    tokenizer=None,
    text: str | Path | None = None,
    calib: str | Path | None = None,
    calib_samples: int = 128,
    repeats: int = 5,
    progress=None,
    checkpoints: str | Path | None = None,
    resume: bool = False,
    merge: bool = False,
) -> dict:
    """Quantize ``model`` (a zoo name, a directory, or a module with its ``tokenizer``) by ``recipe``,
    measure size, latency and fidelity against the float original on the same input, and save to
    ``out`` (if given). Returns the metrics, also written to ``out/bitsmith.json``. Training stages with
    ``checkpoint_every`` keep checkpoints under ``checkpoints`` (default ``<out>.checkpoints``); ``resume`` starts
    them from there. ``merge`` folds qlora stages' adapters into the float weights and quantizes again."""
    check_counts(repeats, calib_samples)
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if merge:
        recipe = merged_recipe(recipe)
    if checkpoints is not None and Path(checkpoints).exists() and not Path(checkpoints).is_dir():
        raise BitsmithError(f"--checkpoints {checkpoints} is a file, not a folder")
    if out is not None:
        prepare_output_dir(out)
    if text is not None:
        read_text(text)  # a bad text file fails before the slow work
    if isinstance(model, (str, Path)):
        loaded = load_model(model)
        if loaded.compressed:
            raise BitsmithError(f"{model} is already compressed; compress its float original instead")
        float_model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source
    else:
        float_model, source = model, getattr(model, "bitsmith_source", {"kind": "module"})
    task = task_for(source, tokenizer, text, model=float_model)
    calibration = None
    if recipe.needs_calibration or calib is not None:
        calibration = task.calibration(calib, calib_samples)
    quant_model = copy.deepcopy(float_model)
    if checkpoints is None and out is not None:
        checkpoints = Path(f"{out}.checkpoints")
    # quant_model is this call's own copy, dropped on a failure: no undo record (it would keep the float layers)
    report = run_stages(quant_model, recipe, calibration, progress=progress, checkpoints=checkpoints, resume=resume,
                        undo=False, original=float_model)
    quant_model.bitsmith_source = source
    if not is_main():  # data parallel (--nproc): every process trained the same model; rank 0 measures and saves
        return {"rank": world()[0], "model": quant_model, "stages": report.as_list()}
    metrics = {
        "recipe": recipe.name,
        "original_bytes": state_bytes(float_model),
        "bytes": state_bytes(quant_model),
        "machine": machine_summary(),
    }
    metrics["size_ratio"] = round(metrics["bytes"] / metrics["original_bytes"], 4)
    metrics.update(pruning_figures(quant_model, report))
    if calibration is not None:
        metrics["calibration"] = {"source": str(calib) if calib else "default", "batches": len(calibration)}
    metrics.update(_measure(task, float_model, quant_model, repeats))
    kernels = _kernels_ran(quant_model)
    result = {
        "metrics": metrics, "quantized_layers": len(report.quantized), "quantized": report.quantized,
        "skipped": report.skipped, "notes": report.notes, "prepared": report.prepared, "stages": report.as_list(),
        "kernels": kernels,
    }
    if out is not None:
        # the kernel decisions too: bitsmith eval on this machine then runs the same kernels (the same numbers)
        extra = {"kernels": kernels, "kernel_decisions": dispatch.export_decisions()}
        meta = save(quant_model, out, tokenizer=tokenizer, metrics=metrics, extra=extra)
        result["out"] = str(out)
        result["file_bytes"] = sum(entry["bytes"] for entry in meta["files"].values())
    result["model"] = quant_model
    return result


_COMPARISONS = ("float_", "original_")


def evaluate(
    name_or_path: str | Path, text: str | Path | None = None, repeats: int = 5, baseline: str | Path | None = None
) -> dict:
    """Evaluate a float model (its own figures and latency) or a compressed directory against its float source.

    A compressed-tensors directory (e.g. from llm-compressor) does not name its float original: give it
    as ``baseline`` (a zoo name or directory) to compare; without one only the model's own figures are
    reported."""
    check_counts(repeats)
    if text is not None:
        read_text(text)
    loaded = load_model(name_or_path)
    float_model = float_tokenizer = None
    if baseline is not None:
        reference = load_model(baseline)
        if reference.compressed:
            raise BitsmithError(f"baseline {baseline} is a compressed model; give the float original")
        float_model, float_tokenizer = reference.model, reference.tokenizer
    elif loaded.compressed and loaded.source.get("kind") not in ("compressed-tensors", "gguf"):  # no float source
        float_model, float_tokenizer = load_float_source(loaded.source)
    task = task_for(loaded.source, loaded.tokenizer or float_tokenizer, text,
                    model=float_model if float_model is not None else loaded.model)
    if float_model is not None:
        metrics = _measure(task, float_model, loaded.model, repeats)
        metrics["original_bytes"] = state_bytes(float_model)
    else:  # a float model, or a compressed one with nothing to compare with: its own figures only
        metrics = _own_measure(task, loaded.model, repeats)
        if loaded.compressed:
            metrics["baseline"] = None
    metrics["bytes"] = state_bytes(loaded.model)
    metrics["model"] = str(name_or_path)
    metrics["compressed"] = loaded.compressed
    metrics["machine"] = machine_summary()
    return metrics


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def compress_offloaded(
    model_dir: str | Path,
    recipe: str | Recipe,
    out: str | Path,
    *,
    calib: str | Path | None = None,
    calib_samples: int = 128,
    progress=None,
) -> dict:
    """``compress`` for a causal LM larger than memory: quantized block by block from its safetensors
    files (api/offload.py) into ``out``. Not evaluated here: run ``bitsmith eval`` where it fits."""
    from bitsmith.api.offload import quantize_offloaded

    check_counts(calib_samples=calib_samples)
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    source_info = None
    if str(model_dir) in ZOO:  # a zoo model with a transformers directory (docs-lm, smollm2)
        name = str(model_dir)
        model_dir = zoo_model_dir(name)
        if model_dir is None:
            raise BitsmithError(f"--offload quantizes a causal LM directory; zoo model {name} has none")
        source_info = {"kind": "zoo", "name": name}
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BitsmithError(f"--offload quantizes a transformers model directory; {model_dir} is not one")
    prepare_output_dir(out)
    tokenizer = load_tokenizer(model_dir)
    calibrated = calib is not None or recipe.needs_calibration
    if calibrated and tokenizer is None:
        raise BitsmithError(f"{model_dir}: no tokenizer files to make calibration data from")
    calibration = LanguageModelTask(tokenizer, text=None).calibration(calib, calib_samples) if calibrated else None
    start = time.perf_counter()
    result = quantize_offloaded(model_dir, recipe, out, calibration, source_info=source_info, progress=progress)
    return {
        "recipe": recipe.name, "out": str(out), "blocks": result["blocks"], "quantized_layers": len(result["quantized"]),
        "quantized": result["quantized"], "skipped": result["skipped"], "notes": result["notes"],
        "stages": result["stages"], "files": result["files"], "quantize_seconds": round(time.perf_counter() - start, 2),
        "peak_rss_bytes": _peak_rss_bytes(), "machine": machine_summary(),
    }
