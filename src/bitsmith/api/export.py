"""``bitsmith export DIR --format ...``: turn a saved bitsmith checkpoint into a runtime's format.

Formats are a registry (``EXPORT_FORMATS``): each names whether it writes a file or a directory and the
function that writes it from the loaded checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bitsmith.errors import BitsmithError
from bitsmith.evaluation.tasks import task_for
from bitsmith.export.ct_sparse import check_choice
from bitsmith.export.gguf import check_gguf_type
from bitsmith.io.models import LoadedModel, load_model
from bitsmith.io.outputs import prepare_output_dir, prepare_output_file
from bitsmith.nn import cpu

__all__ = ["ExportFormat", "EXPORT_FORMATS", "FORMATS", "register_export_format", "export_checkpoint"]


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str | None  # a file with this suffix; None: a new directory
    write: Callable[[LoadedModel, Path, dict], dict]  # (checkpoint, out, options) -> what was written
    options: tuple[str, ...] = ()  # the export options it takes (the others do not apply to it)


EXPORT_FORMATS: dict[str, ExportFormat] = {}


def register_export_format(fmt: ExportFormat) -> None:
    EXPORT_FORMATS[fmt.name] = fmt


_INT8_ACTIVATIONS = ("StaticInt8Linear", "StaticInt8Conv2d", "Int8DynamicLinear")  # QDQ / dynamic int8 inputs


def _onnx(loaded: LoadedModel, out: Path, options: dict) -> dict:
    from bitsmith.export.onnx import export_onnx

    example, output_names = task_for(loaded.source, loaded.tokenizer, model=loaded.model).export_example()
    config = getattr(loaded.model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # logits only: a KV cache object is no ONNX output
    result = export_onnx(loaded.model, example, out, output_names=output_names, **options)
    if cpu.int8_dot_product().startswith("AVX2 without VNNI") and set(result["layers"]) & set(_INT8_ACTIVATIONS):
        # measured on an AVX2-only EPYC: digits-cnn w8a8-static 84.9% in ORT (U8S8 and S8S8 alike) vs 99.3% float
        result.setdefault("notes", []).append(
            "this CPU has no VNNI: ONNX Runtime's int8 kernels here sum u8 x s8 pairs in saturating int16, so the"
            " int8-activation layers of this file can be much less exact in ONNX Runtime on it than in bitsmith"
            " (run it on a VNNI or AMX CPU, or export a weight-only recipe)")
    return result


def _transformers_dir(writer_name: str):
    def write(loaded: LoadedModel, out: Path, options: dict) -> dict:
        from bitsmith.export import llm_formats

        if loaded.tokenizer is None:
            raise BitsmithError(f"the checkpoint has no tokenizer files; a {writer_name} export is a complete"
                                " transformers directory")
        if writer_name == "compressed-tensors":
            return llm_formats.export_compressed_tensors(loaded.model, loaded.tokenizer, out, **options)
        return llm_formats.export_gptq(loaded.model, loaded.tokenizer, out)

    return write


def _gguf(loaded: LoadedModel, out: Path, options: dict) -> dict:
    from bitsmith.export.gguf import export_gguf

    path = loaded.source.get("path")
    name = loaded.source.get("name") or (Path(path).name if isinstance(path, str) else None)  # never a local path
    return export_gguf(loaded.model, loaded.tokenizer, out, name=name, **options)


register_export_format(ExportFormat("onnx", ".onnx", _onnx, ("dynamic_activations", "activation_type")))
register_export_format(ExportFormat("compressed-tensors", None, _transformers_dir("compressed-tensors"), ("sparse",)))
register_export_format(ExportFormat("gptq", None, _transformers_dir("gptq")))
register_export_format(ExportFormat("gguf", ".gguf", _gguf, ("gguf_type",)))
FORMATS = tuple(EXPORT_FORMATS)


def export_checkpoint(
    path: str | Path, fmt: str, out: str | Path, dynamic_activations: str = "token", activation_type: str = "u8",
    sparse: str = "dense", gguf_type: str = "q8_0",
) -> dict:
    if fmt not in EXPORT_FORMATS:
        raise BitsmithError(f"unknown export format '{fmt}'; available: {', '.join(EXPORT_FORMATS)}")
    export_format = EXPORT_FORMATS[fmt]
    if "sparse" in export_format.options:
        check_choice(sparse)
    if "gguf_type" in export_format.options:
        check_gguf_type(gguf_type)
    out = prepare_output_file(out, export_format.suffix) if export_format.suffix else prepare_output_dir(out)
    loaded = load_model(path)
    if not loaded.compressed:
        raise BitsmithError(f"{path} is not a bitsmith checkpoint; compress the model first")
    given = {"dynamic_activations": dynamic_activations, "activation_type": activation_type, "sparse": sparse,
             "gguf_type": gguf_type}
    options = {name: given[name] for name in export_format.options}
    result = export_format.write(loaded, out, options)
    result["source"] = loaded.source
    return result
