"""Sparse layers in a compressed-tensors export: float ones as ``sparse-bitmask`` / ``sparse-24-bitmask``, and
what is said about the rest.

    format              | per float sparse Linear ``p`` (N = out_features, K = in_features)
    sparse-bitmask      | p.shape int64 [2]; p.compressed (kept,) the non-zeros row-major, in the export dtype;
                        | p.bitmask uint8 (N, ceil(K / 8)) (``formats.sparse``); p.row_offsets int64 (N,)
    sparse-24-bitmask   | p.shape int64 (2, 1); p.compressed (N, K / 2): 2 of every 4 inputs; p.bitmask as above
                        | (every layer written sparse must be 2:4, else the whole model uses sparse-bitmask)

config.json's ``quantization_config.sparsity_config`` is what compressed-tensors' ``BitmaskConfig`` /
``Sparse24BitMaskConfig`` dump: ``{registry_requires_subclass, format, targets (the layers' names), ignore,
global_sparsity (zeros among all parameters, as llm-compressor reports it), sparsity_structure}``.

Who reads these: compressed-tensors up to 0.14 (its BitmaskCompressor and Sparse24BitMaskCompressor, with
transformers 4.x) and bitsmith. compressed-tensors 0.15 removed sparse compression; transformers 5 with it
ignores ``sparsity_config`` and loads those layers with *random* weights (a warning, no error). So the export
writes them dense unless asked (``sparse="bitmask"``), and says so either way. Even 0.14 decompresses a
checkpoint from disk (``ModelCompressor.decompress``) only when no layer beside the sparse ones is
pack-quantized (its quantized pass then reads ``weight_packed`` from the half-built model, where the sparse
pass left it out): a model with quantized layers keeps its float sparse layers dense.

Quantized layers stay ``pack-quantized`` even where pruning left half their weights at 0: compressed-tensors
compresses sparsity only in a ``weight`` tensor (float or fp8), never in ``weight_packed`` (its 2:4 + int4
``marlin-24`` form was a GPU layout that it could not decompress, and is gone too).
"""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.formats.sparse import nm_holds, nm_keep_mask, row_offsets, sparsify, zero_fraction

__all__ = ["SPARSE_CHOICES", "check_choice", "sparse_float_layers", "write_sparse", "float_sparse_note",
           "quantized_sparse_note", "pruned_layers"]

SPARSE_CHOICES = ("dense", "bitmask")
_MAX_RATIO = 0.9  # as bitsmith.save: bitmask storage only where it takes at most 90% of the dense bytes
_READERS = ("compressed-tensors <= 0.14 (transformers 4.x) and bitsmith read it; transformers 5 with"
            " compressed-tensors >= 0.15 would load those layers with random weights")


def pruned_layers(model: nn.Module) -> dict[str, float]:
    """Layer -> fraction of zeros, for every layer a recorded stage made sparse (bitsmith.json "stages")."""
    found = {}
    for stage in getattr(model, "bitsmith_stages", None) or []:
        summary = stage.get("summary") if isinstance(stage, dict) else None
        for name, fraction in ((summary or {}).get("sparsity") or {}).items():
            if isinstance(fraction, (int, float)) and fraction > 0:
                found[name] = float(fraction)
    return found


def sparse_float_layers(tensors: dict[str, torch.Tensor], float_linears: list[str]) -> dict[str, torch.Tensor]:
    """name -> weight (as written) of the float Linears whose bitmask form is really smaller."""
    chosen = {}
    for name in float_linears:
        weight = tensors.get(f"{name}.weight")
        if weight is None or weight.dim() != 2:  # a tied head stored under the embedding's name stays dense
            continue
        kept = int((weight != 0).sum())
        nbytes = weight.shape[0] * -(-weight.shape[1] // 8) + kept * weight.element_size() + weight.shape[0] * 8
        if nbytes <= _MAX_RATIO * weight.numel() * weight.element_size():
            chosen[name] = weight
    return chosen


def _global_sparsity(model: nn.Module) -> float:
    zeros = total = 0
    for parameter in model.parameters():
        zeros += int((parameter == 0).sum())
        total += parameter.numel()
    return round(zeros / max(total, 1), 4)


def write_sparse(model: nn.Module, tensors: dict[str, torch.Tensor], layers: dict[str, torch.Tensor]) -> dict:
    """Replace each layer's ``weight`` in ``tensors`` by its compressed-tensors sparse form (in place);
    returns the ``sparsity_config``."""
    two_four = all(nm_holds(weight, 2, 4) for weight in layers.values())
    for name, weight in layers.items():
        del tensors[f"{name}.weight"]
        rows, cols = weight.shape
        if two_four:
            bitmask, values = sparsify(weight, nm_keep_mask(weight, 2, 4))
            tensors[f"{name}.shape"] = torch.tensor([[rows], [cols]], dtype=torch.int64)
            tensors[f"{name}.compressed"] = values.reshape(rows, cols // 2).contiguous()
        else:
            bitmask, values = sparsify(weight)
            tensors[f"{name}.shape"] = torch.tensor([rows, cols], dtype=torch.int64)
            tensors[f"{name}.compressed"] = values.contiguous()
            tensors[f"{name}.row_offsets"] = row_offsets(bitmask)
        tensors[f"{name}.bitmask"] = bitmask
    return {  # the fields and order of compressed-tensors' own SparsityCompressionConfig.model_dump()
        "registry_requires_subclass": False,
        "format": "sparse-24-bitmask" if two_four else "sparse-bitmask",
        "targets": sorted(layers),
        "ignore": [],
        "global_sparsity": _global_sparsity(model),
        "sparsity_structure": "2:4" if two_four else "unstructured",
    }


def float_sparse_note(layers: dict[str, torch.Tensor], written: dict | None, sparse: str,
                      quantized: bool) -> str | None:
    """The export's line about its float sparse layers, or None when it has none."""
    if not layers:
        return None
    share = sum(zero_fraction(w) * w.numel() for w in layers.values()) / sum(w.numel() for w in layers.values())
    what = f"{len(layers)} sparse float layers ({share:.0%} zeros)"
    if written is not None:
        return f"{what} written as {written['format']}: {_READERS}"
    if sparse == "bitmask" and quantized:
        return (f"{what} written dense: compressed-tensors (0.14, the last to read sparse-bitmask) cannot decompress"
                " it beside pack-quantized layers")
    return (f"{what} written dense: compressed-tensors >= 0.15 and transformers 5 no longer read sparse-bitmask;"
            " --sparse bitmask writes it (" + _READERS + ")")


def quantized_sparse_note(model: nn.Module, quantized: dict) -> str | None:
    """The export's line about pruned layers that are quantized, or None."""
    pruned = pruned_layers(model)
    names = [name for name in quantized if name in pruned]
    if not names:
        return None
    share = sum(pruned[n] for n in names) / len(names)
    return (f"{len(names)} pruned layers ({share:.0%} zeros) written quantized only (pack-quantized, each zero a"
            " zero-point code): compressed-tensors has no sparse form of packed integer weights")


def check_choice(sparse: str) -> None:
    if sparse not in SPARSE_CHOICES:
        raise BitsmithError(f"unknown sparse storage {sparse!r} for compressed-tensors:"
                            f" use {' or '.join(SPARSE_CHOICES)}")
