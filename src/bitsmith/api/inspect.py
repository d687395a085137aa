"""What a saved checkpoint holds: per layer, its scheme, bits, bytes, sparsity, and the kernels it runs on here.

Sparsity is read from the weights themselves: every layer's fraction of weights that are exactly 0 (for
quantized layers: codes at their zero point, ~10% of a dense int4 layer's). A layer counts as sparse when a
recorded stage pruned it, ``bitsmith.save`` stored it as a bitmask, or it is a float Linear with at least 1%
zeros (float weights are not 0 by chance); for those the row also gives the strongest N:M pattern that holds
(2:4, 4:8), how the layer is stored, and whether a kernel computes on the sparse form. None does: pruned
layers run on the same dense kernels as the rest, so sparsity saves storage, not time (bench/bench_sparse.py
measures torch's sparse CPU kernels against dense). Float Linears get a row of their own when sparse.
"""

from __future__ import annotations

import re

from pathlib import Path

import torch
from torch import nn

from bitsmith.export.ct_sparse import pruned_layers
from bitsmith.formats.sparse import nm_pattern
from bitsmith.io.compressed_tensors import is_compressed_tensors_dir, load_compressed_tensors
from bitsmith.io.models import load_model
from bitsmith.io.serialization import load, read_metadata
from bitsmith.io.sparse_storage import STORAGE_KEY, zero_mask
from bitsmith.nn import QUANTIZED_MODULES, cpu, native

__all__ = ["inspect_checkpoint", "machine_kernels", "SPARSE_MIN", "SPARSE_KERNEL"]

SPARSE_MIN = 0.01  # a float Linear with at least 1% of its weights exactly 0 is sparse (and gets a row)
SPARSE_KERNEL = "none: computed by the dense kernels (sparsity saves storage, not time)"


def _bits(module, label: str) -> dict:
    """{"bits"} of a layer's codes, and {"held_as"} where they are narrower than its storage: int4 codes on the
    int8 kernels (QAT's and PTQ's w4a8) are held as int8, and only the recorded label (``w4 ...``) says 4."""
    if hasattr(module, "bits"):
        return {"bits": module.bits}
    if hasattr(module, "weight_codes"):
        recorded = re.match(r"w(\d) ", label)
        bits = int(recorded.group(1)) if recorded else 8
        return {"bits": bits, **({"held_as": "int8"} if bits < 8 else {})}
    return {"bits": 16}  # fp16 / bf16


def _sparsity(module: nn.Module, stored: dict | None, pruned: bool) -> dict:
    """{"sparsity", and for a sparse layer "pattern", "storage", "sparse_kernel"} of a layer with a weight
    matrix, else {}."""
    zeros = zero_mask(module)
    if zeros is None or not zeros.numel():
        return {}
    fraction = zeros.float().mean().item()
    row = {"sparsity": round(fraction, 4)}
    if pruned or stored or (type(module) is nn.Linear and fraction >= SPARSE_MIN):
        nm = nm_pattern((~zeros).to(torch.uint8))
        row["pattern"] = f"{nm[0]}:{nm[1]}" if nm else "unstructured"
        row["storage"] = f"bitmask ({stored['bytes']:,} of {stored['dense_bytes']:,} bytes)" if stored else "dense"
        row["sparse_kernel"] = SPARSE_KERNEL
    return row


def _float_row(name: str, module: nn.Linear, sparsity: dict) -> dict:
    weight = module.weight
    nbytes = sum(t.numel() * t.element_size() for t in (weight, module.bias) if t is not None)
    dtype = str(weight.dtype).removeprefix("torch.").replace("float32", "fp32")
    return {"name": name, "module": "Linear", "scheme": dtype, "bits": weight.element_size() * 8, "bytes": nbytes,
            "kernel": "torch dense matmul (float Linear)", "why": "", **sparsity}


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
    elif path.is_file() and path.suffix.lower() == ".gguf":  # a llama.cpp model, read onto bitsmith's modules
        loaded = load_model(path)
        model = loaded.model
        meta = {"source": loaded.source, "recipe": None, "notes": loaded.meta["notes"],
                "files": {path.name: {"bytes": path.stat().st_size}}}
    else:
        meta = read_metadata(path)
        model = load(path)
    ran = meta.get("kernels", {})  # what ran at compress time, on the machine that compressed it
    notes = meta.get("notes", {})
    storage, pruned = meta.get(STORAGE_KEY, {}), pruned_layers(model)
    rows, quantized_bytes = [], 0
    quantized_names = set()
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            sparsity = _sparsity(module, storage.get(name), name in pruned)
            if "sparse_kernel" in sparsity:
                rows.append({**_float_row(name, module, sparsity), **({"note": notes[name]} if name in notes else {})})
            continue
        if not isinstance(module, QUANTIZED_MODULES):
            continue
        own = [*module.named_buffers(recurse=False), *module.named_parameters(recurse=False)]  # LoRA: its adapters
        nbytes = sum(t.numel() * t.element_size() for _, t in own if t is not None)
        quantized_bytes += nbytes
        quantized_names.update(f"{name}.{key}" for key, _ in own)
        row = {"name": name, "module": type(module).__name__, "scheme": module.scheme,
               **_bits(module, meta.get("quantized", {}).get(name, "")), "bytes": nbytes, "kernel": module.kernel(), "why": module.kernel_why()}
        if hasattr(module, "kernel_names"):
            row["kernels_here"] = module.kernel_names()
        row.update(_sparsity(module, storage.get(name), name in pruned))
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
        # modules structured pruning resized: their tensors' saved shapes
        "resized": {name: record["tensors"] for name, record in meta.get("shapes", {}).items()},
        "metrics": meta.get("metrics", {}),
        "versions": meta.get("versions", {}),
    }
