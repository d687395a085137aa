"""``bitsmith export DIR --format ...``: turn a saved bitsmith checkpoint into a runtime's format."""

from __future__ import annotations

from pathlib import Path

from bitsmith.api.models import load_model
from bitsmith.errors import BitsmithError
from bitsmith.outputs import prepare_output_dir, prepare_output_file

__all__ = ["FORMATS", "export_checkpoint"]

FORMATS = ("onnx", "compressed-tensors", "gptq")


def _example_inputs(loaded):
    """A real input for tracing, and the output names, from the model's task."""
    from bitsmith.api.tasks import task_for

    return task_for(loaded.source, loaded.tokenizer, model=loaded.model).export_example()


def export_checkpoint(
    path: str | Path, fmt: str, out: str | Path, dynamic_activations: str = "token", activation_type: str = "u8"
) -> dict:
    if fmt not in FORMATS:
        raise BitsmithError(f"unknown export format '{fmt}'; available: {', '.join(FORMATS)}")
    if fmt == "onnx":
        out = prepare_output_file(out, ".onnx")
    else:
        out = prepare_output_dir(out)
    loaded = load_model(path)
    if not loaded.compressed:
        raise BitsmithError(f"{path} is not a bitsmith checkpoint; compress the model first")
    if fmt in ("compressed-tensors", "gptq"):
        from bitsmith.export.llm_formats import export_compressed_tensors, export_gptq

        if loaded.tokenizer is None:
            raise BitsmithError(f"{path} has no tokenizer files; a {fmt} export is a complete transformers directory")
        writer = export_compressed_tensors if fmt == "compressed-tensors" else export_gptq
        result = writer(loaded.model, loaded.tokenizer, out)
        result["source"] = loaded.source
        return result
    from bitsmith.export.onnx import export_onnx

    example, output_names = _example_inputs(loaded)
    config = getattr(loaded.model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # logits only: a KV cache object is no ONNX output
    result = export_onnx(
        loaded.model, example, out, output_names=output_names, dynamic_activations=dynamic_activations,
        activation_type=activation_type,
    )
    result["source"] = loaded.source
    return result
