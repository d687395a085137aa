"""What a saved checkpoint holds: per layer, its scheme, bits, bytes, and the kernels it runs on here."""

from __future__ import annotations

from pathlib import Path

from bitsmith.io.compressed_tensors import is_compressed_tensors_dir, load_compressed_tensors
from bitsmith.io.serialization import load, read_metadata
from bitsmith.nn import QUANTIZED_MODULES, cpu, native

__all__ = ["inspect_checkpoint", "machine_kernels"]


def _bits(module) -> int:
    if hasattr(module, "bits"):
        return module.bits
    if hasattr(module, "weight_codes"):
        return 8
    return 16  # fp16 / bf16


def machine_kernels() -> dict:
    """The facts of this machine that decide kernels (inspect prints them above the layer table)."""
    return {**cpu.summary(), "native": native.status()}


def inspect_checkpoint(path: str | Path) -> dict:
    """Load the checkpoint (so the kernels each layer can use are the ones available here)."""
    path = Path(path)
    if path.is_dir() and not (path / "bitsmith.json").exists() and is_compressed_tensors_dir(path):
        model = load_compressed_tensors(path)  # e.g. made by llm-compressor
        files = sorted(path.glob("*.safetensors"))
        meta = {"source": {"kind": "compressed-tensors", "path": str(path)}, "recipe": None,
                "files": {f.name: {"bytes": f.stat().st_size} for f in files}}
    else:
        meta = read_metadata(path)
        model = load(path)
    ran = meta.get("kernels", {})  # what ran at compress time, on the machine that compressed it
    notes = meta.get("notes", {})
    rows, quantized_bytes = [], 0
    quantized_names = set()
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZED_MODULES):
            continue
        nbytes = sum(b.numel() * b.element_size() for b in module.buffers(recurse=False) if b is not None)
        quantized_bytes += nbytes
        quantized_names.update(f"{name}.{b}" for b, _ in module.named_buffers(recurse=False))
        row = {"name": name, "module": type(module).__name__, "scheme": module.scheme, "bits": _bits(module),
               "bytes": nbytes, "kernel": module.kernel(), "why": module.kernel_why()}
        if hasattr(module, "kernel_names"):
            row["kernels_here"] = module.kernel_names()
        if name in ran:
            row["ran_at_compress"] = ran[name]
        if name in notes:
            row["note"] = notes[name]
        rows.append(row)
    float_bytes = sum(
        t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in quantized_names
    )
    return {
        "path": str(path),
        "source": meta["source"],
        "recipe": (meta.get("recipe") or {}).get("name"),
        "machine": machine_kernels(),
        "layers": rows,
        "quantized_bytes": quantized_bytes,
        "float_bytes": float_bytes,
        "file_bytes": sum(entry.get("bytes", 0) for entry in meta.get("files", {}).values()),
        "quantized": meta.get("quantized", {}),
        "skipped": meta.get("skipped", {}),
        "notes": notes,
        "stages": meta.get("stages", []),
        "metrics": meta.get("metrics", {}),
        "versions": meta.get("versions", {}),
    }
