"""``compress``: quantize a model by a recipe, measure it against its float original, save it."""

from __future__ import annotations

import copy
import platform
from pathlib import Path

import torch
from torch import nn

from bitsmith.api.config import Recipe
from bitsmith.api.evaluate import eval_sentences, interleaved_latency
from bitsmith.api.models import load_float_source, load_model, state_bytes
from bitsmith.api.quantize import quantize_
from bitsmith.api.recipes import load_recipe
from bitsmith.api.serialization import prepare_output_dir, save
from bitsmith.api.tasks import task_for
from bitsmith.errors import BitsmithError

__all__ = ["compress", "evaluate", "machine_summary"]


def machine_summary() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


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
) -> dict:
    """Quantize ``model`` (a zoo name, a directory, or a module with its ``tokenizer``) by ``recipe``,
    measure size, latency and fidelity against the float original on the same input, and save to
    ``out`` (if given). Returns the metrics, also written to ``out/bitsmith.json``."""
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if out is not None:
        prepare_output_dir(out)
    if text is not None:
        eval_sentences(text)  # a bad text file fails before the slow work
    if isinstance(model, (str, Path)):
        loaded = load_model(model)
        if loaded.compressed:
            raise BitsmithError(f"{model} is already compressed; compress its float original instead")
        float_model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source
    else:
        float_model, source = model, getattr(model, "bitsmith_source", {"kind": "module"})
    task = task_for(source, tokenizer, text, model=float_model)
    calibration = None
    if recipe.quantize.needs_calibration or calib is not None:
        calibration = task.calibration(calib, calib_samples)
    quant_model = copy.deepcopy(float_model)
    report = quantize_(quant_model, recipe, calibration=calibration, progress=progress)
    quant_model.bitsmith_source = source
    metrics = {
        "recipe": recipe.name,
        "original_bytes": state_bytes(float_model),
        "bytes": state_bytes(quant_model),
        "machine": machine_summary(),
    }
    metrics["size_ratio"] = round(metrics["bytes"] / metrics["original_bytes"], 4)
    if calibration is not None:
        metrics["calibration"] = {"source": str(calib) if calib else "default", "batches": len(calibration)}
    metrics.update(_measure(task, float_model, quant_model, repeats))
    result = {
        "metrics": metrics, "quantized_layers": len(report.quantized), "skipped": report.skipped,
        "prepared": report.prepared,
    }
    if out is not None:
        meta = save(quant_model, out, tokenizer=tokenizer, metrics=metrics)
        result["out"] = str(out)
        result["file_bytes"] = meta["files"]["model.safetensors"]["bytes"]
    result["model"] = quant_model
    return result


_COMPARISONS = ("float_", "original_")


def evaluate(
    name_or_path: str | Path, text: str | Path | None = None, repeats: int = 5, baseline: str | Path | None = None
) -> dict:
    """Evaluate a zoo model (its float original) or a compressed directory against its float source.

    A compressed-tensors directory (e.g. from llm-compressor) does not name its float original: give it
    as ``baseline`` (a zoo name or directory) to compare; without one only the model's own figures are
    reported."""
    loaded = load_model(name_or_path)
    float_model = float_tokenizer = None
    if baseline is not None:
        reference = load_model(baseline)
        if reference.compressed:
            raise BitsmithError(f"baseline {baseline} is a compressed model; give the float original")
        float_model, float_tokenizer = reference.model, reference.tokenizer
    elif loaded.compressed and loaded.source.get("kind") != "compressed-tensors":
        float_model, float_tokenizer = load_float_source(loaded.source)
    if float_model is not None:
        task = task_for(loaded.source, loaded.tokenizer or float_tokenizer, text, model=float_model)
        metrics = _measure(task, float_model, loaded.model, repeats)
        metrics["original_bytes"] = state_bytes(float_model)
    else:
        task = task_for(loaded.source, loaded.tokenizer, text, model=loaded.model)
        metrics = _measure(task, loaded.model, loaded.model, repeats)
        metrics["original_bytes"] = state_bytes(loaded.model)
        if loaded.compressed:  # no float original to compare with: keep only the model's own figures
            metrics = {k: v for k, v in metrics.items() if not k.startswith(_COMPARISONS) and not k.endswith(
                ("_ratio", "_increase_pct", "_cosine"))}
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
    import time

    from transformers import AutoTokenizer

    from bitsmith.api.offload import quantize_offloaded
    from bitsmith.api.tasks import LanguageModelTask

    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    source_info = None
    if str(model_dir) == "docs-lm":  # the zoo's language model is an ordinary transformers directory
        from bitsmith.zoo.docs_lm import model_dir as docs_lm_dir

        model_dir, source_info = docs_lm_dir(), {"kind": "zoo", "name": "docs-lm"}
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BitsmithError(f"--offload quantizes a transformers model directory; {model_dir} is not one")
    prepare_output_dir(out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise BitsmithError(f"{model_dir}: no tokenizer files to make calibration data from ({err})") from None
    calibration = LanguageModelTask(tokenizer, text=None).calibration(calib, calib_samples) if calib or \
        recipe.quantize.needs_calibration else []
    start = time.perf_counter()
    result = quantize_offloaded(model_dir, recipe, out, calibration, source_info=source_info, progress=progress)
    return {
        "recipe": recipe.name, "out": str(out), "blocks": result["blocks"], "quantized_layers": len(result["quantized"]),
        "skipped": result["skipped"], "files": result["files"], "quantize_seconds": round(time.perf_counter() - start, 2),
        "peak_rss_bytes": _peak_rss_bytes(), "machine": machine_summary(),
    }
