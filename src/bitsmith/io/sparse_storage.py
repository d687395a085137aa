"""Sparse layers in ``bitsmith.save``: a bitmask and only the kept values, where that is really smaller.

    module                     | tensor stored sparse  | values on disk                  | a dropped element is
    nn.Linear, HalfLinear      | weight (N, K)         | the weight's dtype              | 0
    Int8WeightOnlyLinear,      | weight_codes (N, K)   | int8                            | code 0 (w = 0)
      Int8DynamicLinear,       |                       |                                 |
      StaticInt8Linear         |                       |                                 |
    IntxWeightOnlyLinear       | weight_packed (its    | the kept codes, packed to the   | its group's zero point
                               |   (N, K) codes)       |   layer's bits (pack_codes)     |   (w = 0)

On disk ``<layer>.<tensor>`` becomes ``<layer>.<tensor>.bitmask`` (uint8 (N, ceil(K / 8)), the layout of
``formats/sparse.py``) and ``<layer>.<tensor>.values``; bitsmith.json's "sparse_storage" maps each such layer
to {"tensor", "format": "bitmask", "shape": [N, K], "kept", "sparsity", "bytes", "dense_bytes"}. A layer is
stored so only when that takes at most ``MAX_RATIO`` of its dense bytes: the bitmask costs one bit a weight,
so float32 gains from 13% zeros, 16-bit from 16%, int8 codes from 23%, 4-bit codes from 35% (a dense model's
4-bit codes hit their zero point ~10% of the time: its files stay as they were). The rebuilt tensor is the
one that was saved, bit for bit: the module computes exactly what it computed before saving.

Loading checks each record against the model (a layer of a kind listed above, the tensor it names, its
shape) and gives the safetensors headers' check the on-disk layout (bitmask shape and dtype, the values'
count from "kept"); after reading, the bitmask's popcount must equal "kept" and its padding bits be 0.
"""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.formats.packing import pack_codes, packed_bytes, unpack_codes
from bitsmith.formats.sparse import bitmask_shape, densify, popcount, sparsify
from bitsmith.nn import HalfLinear, Int8DynamicLinear, Int8WeightOnlyLinear, IntxWeightOnlyLinear
from bitsmith.nn.static import StaticInt8Linear

__all__ = ["MAX_RATIO", "STORAGE_KEY", "compact", "disk_layout", "expand", "stored_tensor", "zero_mask"]

STORAGE_KEY = "sparse_storage"
MAX_RATIO = 0.9  # sparse storage only where it takes at most 90% of the dense bytes
_PLAIN = (HalfLinear, Int8WeightOnlyLinear, Int8DynamicLinear, StaticInt8Linear)
_RECORD_KEYS = {"tensor", "format", "shape", "kept", "sparsity", "bytes", "dense_bytes"}


def stored_tensor(module: nn.Module) -> str | None:
    """The name of the module's tensor that can be stored sparse, or None for other kinds."""
    if type(module) is nn.Linear or isinstance(module, HalfLinear):
        return "weight"
    if isinstance(module, _PLAIN):
        return "weight_codes" if module.weight_codes.dim() == 2 else None
    if isinstance(module, IntxWeightOnlyLinear):
        return "weight_packed"
    return None


def _zero_points(module: IntxWeightOnlyLinear, zero: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8: each weight's group zero point (the code whose weight is exactly 0)."""
    return zero.repeat_interleave(module.group_size, dim=1)[:, : module.in_features]


def _matrix_and_fill(module: nn.Module, tensor: torch.Tensor, zero: torch.Tensor | None):
    """(the (N, K) matrix behind the stored tensor, what its dropped elements are)."""
    if isinstance(module, IntxWeightOnlyLinear):
        codes = unpack_codes(tensor, module.bits, (module.out_features, module.in_features))
        return codes, _zero_points(module, zero)
    return tensor, 0


def zero_mask(module: nn.Module) -> torch.Tensor | None:
    """Boolean (N, K): where the module's weight is exactly 0 (for quantized codes: at their zero point), or
    None for a module kind with no sparse form."""
    part = stored_tensor(module)
    if part is None:
        return None
    matrix, fill = _matrix_and_fill(module, getattr(module, part), getattr(module, "weight_zero_point", None))
    return matrix.detach() == fill


def _values_on_disk(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    return pack_codes(values, module.bits) if isinstance(module, IntxWeightOnlyLinear) else values


def compact(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``tensors`` (what save writes) with each layer that is smaller sparse replaced by its bitmask and kept
    values; and the records for bitsmith.json."""
    out, records = dict(tensors), {}
    for name, module in model.named_modules():
        part = stored_tensor(module)
        key = f"{name}.{part}"
        if part is None or key not in tensors:  # a tied weight stored under another name stays as it is
            continue
        dense = tensors[key]
        matrix, fill = _matrix_and_fill(module, dense, tensors.get(f"{name}.weight_zero_point"))
        keep = matrix != fill
        bitmask, values = sparsify(matrix, keep)
        values = _values_on_disk(module, values)
        nbytes = bitmask.numel() + values.numel() * values.element_size()
        dense_bytes = dense.numel() * dense.element_size()
        if nbytes > MAX_RATIO * dense_bytes:
            continue
        del out[key]
        out[f"{key}.bitmask"], out[f"{key}.values"] = bitmask, values.contiguous()
        kept = int(keep.sum())
        records[name] = {"tensor": part, "format": "bitmask", "shape": list(matrix.shape), "kept": kept,
                         "sparsity": round(1 - kept / matrix.numel(), 4), "bytes": nbytes, "dense_bytes": dense_bytes}
    return out, records


def _check_record(name: str, record, model: nn.Module) -> nn.Module:
    what = f"corrupt checkpoint: sparse_storage of layer '{name}'"
    if not isinstance(record, dict) or set(record) != _RECORD_KEYS or record.get("format") != "bitmask":
        raise BitsmithError(f"{what} is not a bitmask record ({', '.join(sorted(_RECORD_KEYS))})")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise BitsmithError(f"{what}: the model has no such layer") from None
    if record["tensor"] != stored_tensor(module):
        raise BitsmithError(f"{what}: a {type(module).__name__} stores no sparse '{record['tensor']}'")
    shape = [module.out_features, module.in_features]
    if record["shape"] != shape:
        raise BitsmithError(f"{what}: shape {record['shape']}, the layer is {shape}")
    kept = record["kept"]
    if type(kept) is not int or not 0 <= kept <= shape[0] * shape[1]:
        raise BitsmithError(f"{what}: 'kept' must be a count from 0 to {shape[0] * shape[1]}, got {kept!r}")
    return module


def disk_layout(model: nn.Module, records, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``expected`` (the model's state, on meta) with each sparse layer's tensor replaced by the (meta)
    bitmask and values the file must hold: what the safetensors headers are checked against."""
    if not isinstance(records, dict):
        raise BitsmithError(f"corrupt checkpoint: '{STORAGE_KEY}' must be a mapping")
    layout = dict(expected)
    for name, record in records.items():
        module = _check_record(name, record, model)
        key = f"{name}.{record['tensor']}"
        dense = layout.pop(key, None)
        if dense is None:
            raise BitsmithError(f"corrupt checkpoint: sparse_storage names '{key}', which the model does not hold")
        if isinstance(module, IntxWeightOnlyLinear):
            values = torch.empty(packed_bytes(record["kept"], module.bits), dtype=torch.uint8, device="meta")
        else:
            values = torch.empty(record["kept"], dtype=dense.dtype, device="meta")
        layout[f"{key}.bitmask"] = torch.empty(bitmask_shape(record["shape"]), dtype=torch.uint8, device="meta")
        layout[f"{key}.values"] = values
    return layout


def expand(model: nn.Module, records: dict[str, dict], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors read from disk (already checked against ``disk_layout``) with every sparse layer's
    tensor rebuilt dense, exactly as it was saved."""
    out = dict(tensors)
    for name, record in records.items():
        module, key = model.get_submodule(name), f"{name}.{record['tensor']}"
        missing = next((k for k in (f"{key}.bitmask", f"{key}.values") if k not in out), None)
        if missing is not None:
            raise BitsmithError(f"incomplete checkpoint: tensor '{missing}' is missing")
        bitmask, values = out.pop(f"{key}.bitmask"), out.pop(f"{key}.values")
        if popcount(bitmask) != record["kept"]:
            raise BitsmithError(f"corrupt checkpoint: layer '{name}': its bitmask keeps {popcount(bitmask)} weights,"
                                f" bitsmith.json says {record['kept']}")
        fill = 0
        if isinstance(module, IntxWeightOnlyLinear):
            zero = out.get(f"{name}.weight_zero_point")
            if zero is None or zero.numel() and int(zero.max()) >= 2**module.bits:
                raise BitsmithError(f"corrupt checkpoint: layer '{name}': its zero points are missing or outside"
                                    f" [0, {2**module.bits - 1}]")
            fill = _zero_points(module, zero)
            values = unpack_codes(values, module.bits, record["kept"])
        matrix = densify(bitmask, values, record["shape"], fill)
        out[key] = pack_codes(matrix, module.bits) if isinstance(module, IntxWeightOnlyLinear) else matrix
    return out
