"""``compress``: quantize a model by a recipe, measure it against its float original, save it."""

from __future__ import annotations

import copy
import platform
from pathlib import Path

import torch
from torch import nn

from bitsmith.api.config import Recipe
from bitsmith.api.evaluate import cosine_fidelity, eval_sentences, interleaved_latency
from bitsmith.api.models import load_float_source, load_model, state_bytes
from bitsmith.api.quantize import quantize_
from bitsmith.api.recipes import load_recipe
from bitsmith.api.serialization import prepare_output_dir, save
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


def _embed_fn(model: nn.Module, batch: dict):
    from bitsmith.zoo.minilm import sentence_embeddings

    return lambda: sentence_embeddings(model, batch)


def _measure(float_model, quant_model, tokenizer, text, repeats: int) -> dict:
    from bitsmith.zoo.minilm import encode_batch

    if tokenizer is None:
        raise BitsmithError("this model has no tokenizer: bitsmith's text evaluation needs one")
    sentences = eval_sentences(text)
    batch = encode_batch(tokenizer, sentences)
    run_float, run_quant = _embed_fn(float_model, batch), _embed_fn(quant_model, batch)
    fidelity = cosine_fidelity(run_quant(), run_float())
    latency = interleaved_latency({"float": run_float, "compressed": run_quant}, repeats=repeats)
    return {
        "evaluation": "cosine of mean-pooled sentence embeddings to the float model",
        "sentences": len(sentences),
        "batch_shape": list(batch["input_ids"].shape),
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
    quant_model = copy.deepcopy(float_model)
    report = quantize_(quant_model, recipe, progress=progress)
    quant_model.bitsmith_source = source
    metrics = {
        "recipe": recipe.name,
        "original_bytes": state_bytes(float_model),
        "bytes": state_bytes(quant_model),
        "machine": machine_summary(),
    }
    metrics["size_ratio"] = round(metrics["bytes"] / metrics["original_bytes"], 4)
    metrics.update(_measure(float_model, quant_model, tokenizer, text, repeats))
    result = {"metrics": metrics, "quantized_layers": len(report.quantized), "skipped": report.skipped}
    if out is not None:
        meta = save(quant_model, out, tokenizer=tokenizer, metrics=metrics)
        result["out"] = str(out)
        result["file_bytes"] = meta["files"]["model.safetensors"]["bytes"]
    result["model"] = quant_model
    return result


def evaluate(name_or_path: str | Path, text: str | Path | None = None, repeats: int = 5) -> dict:
    """Evaluate a zoo model (its float original) or a compressed directory against its float source."""
    loaded = load_model(name_or_path)
    if loaded.compressed:
        float_model, float_tokenizer = load_float_source(loaded.source)
        tokenizer = loaded.tokenizer or float_tokenizer
        if tokenizer is None:
            tokenizer = load_model(loaded.source["name"]).tokenizer
        metrics = _measure(float_model, loaded.model, tokenizer, text, repeats)
        metrics["bytes"] = state_bytes(loaded.model)
        metrics["original_bytes"] = state_bytes(float_model)
    else:
        metrics = _measure(loaded.model, loaded.model, loaded.tokenizer, text, repeats)
        metrics["bytes"] = metrics["original_bytes"] = state_bytes(loaded.model)
    metrics["model"] = str(name_or_path)
    metrics["compressed"] = loaded.compressed
    metrics["machine"] = machine_summary()
    return metrics
