"""Reading compressed-tensors ``pack-quantized`` directories (bitsmith's own exports or llm-compressor's) into
a transformers model whose quantized Linears are bitsmith runtime modules. The layout is described in
``bitsmith.export.llm_formats``, which writes it. Float layers stored ``sparse-bitmask`` or ``sparse-24-bitmask``
(``bitsmith.export.ct_sparse``) are decompressed to dense float weights."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from bitsmith.algorithms._modules import replace_module
from bitsmith.algorithms.rtn import QuantizedWeight
from bitsmith.errors import BitsmithError
from bitsmith.formats.affine import IntFormat
from bitsmith.formats.packing import unpack_int32_dense
from bitsmith.formats.sparse import densify, row_offsets
from bitsmith.io.checkpoint_files import shard_names
from bitsmith.io.skeleton import float_skeleton, is_causal_lm_dir, read_model_config
from bitsmith.nn import Int8WeightOnlyLinear, IntxWeightOnlyLinear

__all__ = ["load_compressed_tensors", "is_compressed_tensors_dir", "read_config", "prefixes", "CT_BITS"]

CT_BITS = (2, 3, 4, 5, 6, 7, 8)  # compressed-tensors packs any width densely
SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")


def prefixes(key: str) -> list[str]:
    """Module names that own ``key``: 'a.b.weight' -> ['a.b', 'a']."""
    parts = key.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]



def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BitsmithError(f"{path} is not a transformers model directory (no config.json)")
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BitsmithError(f"corrupt checkpoint: {config_path} is not valid JSON") from None


def is_compressed_tensors_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a model whose config.json says ``quant_method: compressed-tensors``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    with contextlib.suppress(BitsmithError):
        qc = read_config(path).get("quantization_config") or {}
        return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"
    return False


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors``, or of the shards listed in ``model.safetensors.index.json``."""
    tensors = {}
    for file in shard_names(path):
        try:
            loaded = load_file(path / file)
        except (SafetensorError, OSError) as err:
            raise BitsmithError(f"corrupt or missing checkpoint file {path / file} ({err})") from None
        tensors.update({k: v.clone() for k, v in loaded.items()})  # own, aligned memory (not the mapped file)
    return tensors


def _check_ct_config(qc: dict, path: Path) -> list[dict]:
    """The config groups, each checked to be a weight-only int pack-quantized scheme bitsmith runs."""
    top_format = qc.get("format")
    sparsity = (qc.get("sparsity_config") or {}).get("format", "dense")
    if sparsity not in ("dense", *SPARSE_FORMATS):
        raise BitsmithError(f"{path}: sparse compressed-tensors checkpoints in {sparsity!r} are not supported;"
                            f" bitsmith reads {' and '.join(SPARSE_FORMATS)}")
    if qc.get("quantization_status", "compressed") != "compressed":
        status = qc["quantization_status"]
        raise BitsmithError(f"{path}: quantization_status is {status!r}; bitsmith reads 'compressed' checkpoints")
    groups = []
    for group_name, group in (qc.get("config_groups") or {}).items():
        weights, fmt = group.get("weights") or {}, group.get("format") or top_format
        what = f"{path}: config group '{group_name}'"
        if fmt != "pack-quantized":
            raise BitsmithError(f"{what} has format {fmt!r}; bitsmith reads 'pack-quantized' checkpoints")
        if group.get("input_activations") or group.get("output_activations"):
            raise BitsmithError(f"{what} quantizes activations; bitsmith reads weight-only checkpoints")
        if weights.get("type") != "int" or weights.get("num_bits") not in CT_BITS or weights.get("dynamic"):
            raise BitsmithError(f"{what} is not a static 2- to 8-bit integer weight scheme")
        if weights.get("strategy") not in ("group", "channel", "tensor"):
            raise BitsmithError(f"{what} has strategy {weights.get('strategy')!r}; use group, channel or tensor")
        groups.append({"targets": list(group.get("targets") or []), "weights": weights})
    if not groups and sparsity == "dense":
        raise BitsmithError(f"{path}: the quantization_config has no config_groups")
    return groups


def _decompress_sparse(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Replace each sparse layer's ``shape`` / ``compressed`` / ``bitmask`` (/ ``row_offsets``) tensors by its
    dense ``weight``, in place."""
    for key in [k for k in tensors if k.endswith(".bitmask")]:
        prefix = key.removesuffix(".bitmask")
        parts = {part: tensors.pop(f"{prefix}.{part}", None)
                 for part in ("shape", "compressed", "bitmask", "row_offsets")}
        if parts["shape"] is None or parts["compressed"] is None:
            raise BitsmithError(f"layer '{prefix}' in {path} has a bitmask but no shape or compressed values")
        shape = parts["shape"].flatten().tolist()
        if len(shape) != 2 or min(shape) < 1:
            raise BitsmithError(f"layer '{prefix}' in {path}: its shape {shape} is not that of a 2-D weight")
        try:
            weight = densify(parts["bitmask"], parts["compressed"].flatten(), shape)
        except BitsmithError as err:
            raise BitsmithError(f"layer '{prefix}' in {path}: {err}") from None
        offsets = parts["row_offsets"]
        if offsets is not None and not torch.equal(offsets.long().flatten(), row_offsets(parts["bitmask"])):
            raise BitsmithError(f"layer '{prefix}' in {path}: its row_offsets do not match its bitmask")
        tensors[f"{prefix}.weight"] = weight


def _matches(name: str, module: nn.Module, target: str) -> bool:
    """compressed-tensors' rule: an exact module name, ``re:<regex>`` matched from the start of the name,
    or a class name anywhere in the module's MRO."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or any(cls.__name__ == target for cls in type(module).__mro__)


def _weights_for(name: str, module: nn.Module, groups: list[dict], ignore: list[str]) -> dict | None:
    """The weight args of the group quantizing ``name``; a target naming the layer (exactly or by regex) wins
    over a class-name target, as in compressed-tensors."""
    if any(_matches(name, module, target) for target in ignore):
        return None
    by_name = [g for g in groups if any(t == name or (t.startswith("re:") and _matches(name, module, t))
                                        for t in g["targets"])]
    by_class = [g for g in groups if any(_matches(name, module, t) for t in g["targets"])]
    chosen = (by_name or by_class or [None])[0]
    return chosen["weights"] if chosen is not None else None


def _quantized_weight(name: str, tensors: dict, weights: dict, linear: nn.Linear) -> QuantizedWeight:
    """Unpack one layer's compressed-tensors tensors into bitsmith's unsigned codes and zero points."""
    bits, strategy = weights["num_bits"], weights["strategy"]
    out_features, in_features = linear.out_features, linear.in_features
    if f"{name}.weight_g_idx" in tensors:
        raise BitsmithError(f"layer '{name}' uses activation-order groups (weight_g_idx); bitsmith cannot load it")
    shape = tensors.get(f"{name}.weight_shape")
    if shape is not None and shape.tolist() != [out_features, in_features]:
        raise BitsmithError(
            f"layer '{name}' is {shape.tolist()} in the checkpoint but {[out_features, in_features]} in the model"
        )
    codes = unpack_int32_dense(tensors[f"{name}.weight_packed"], bits, in_features, dim=1)  # (N, K) = signed + 2**(b-1)
    scale = tensors[f"{name}.weight_scale"].float().reshape(out_features if strategy != "tensor" else 1, -1)
    group_size = (weights.get("group_size") or 0) if strategy == "group" else in_features
    if type(group_size) is not int or group_size <= 0 or scale.shape[-1] != -(-in_features // group_size):
        raise BitsmithError(f"layer '{name}': {scale.shape[-1]} scales per row do not fit group size {group_size}"
                            f" over in_features={in_features}")
    scale = scale.expand(out_features, -1)  # (N, G); a per-tensor scale repeats down the rows
    zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)  # symmetric: signed zero 0
    if not weights.get("symmetric", True):
        stored = tensors[f"{name}.weight_zero_point"]
        if stored.dtype == torch.int32:  # packed along N: (ceil(N * bits / 32), G), or that padded to (N, G)
            words = -(-out_features * bits // 32)
            packed = stored.reshape(-1, scale.shape[-1])[:words]
            zero = unpack_int32_dense(packed, bits, out_features, dim=0).to(torch.int32)
        else:  # unpacked signed int8 (per-tensor, or written by older compressed-tensors)
            zero = (stored.to(torch.int32) + 2 ** (bits - 1)).reshape(-1, scale.shape[-1]).expand_as(scale)
    return QuantizedWeight(codes, scale.contiguous(), zero, IntFormat(bits, signed=False), group_size)


def _runtime_linear(qweight: QuantizedWeight, bias: torch.Tensor | None) -> nn.Module:
    """8-bit symmetric per-row weights run on bitsmith's int8 kernel (as ``quantize_`` builds them);
    the rest on ``IntxWeightOnlyLinear`` (its fp16 scales round fp32/bf16 checkpoint scales)."""
    per_row = qweight.group_size == qweight.codes.shape[1]
    if qweight.fmt.bits == 8 and per_row and bool((qweight.zero_point == 128).all()):
        signed = QuantizedWeight(
            (qweight.codes.to(torch.int16) - 128).to(torch.int8), qweight.scale, torch.zeros_like(qweight.zero_point),
            IntFormat(8, signed=True), qweight.group_size,
        )
        return Int8WeightOnlyLinear.from_quantized(signed, bias)
    return IntxWeightOnlyLinear.from_quantized(qweight, bias)


def _skeleton(path: Path, causal: bool):
    config = read_model_config(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # bitsmith's modules replace the quantized layers, not compressed-tensors'
    return float_skeleton(config, causal=causal, on_meta=False, dtype=torch.float32)


def load_compressed_tensors(path: str | Path) -> nn.Module:
    """A compressed-tensors ``pack-quantized`` directory (bitsmith's or llm-compressor's) as a transformers
    causal LM on CPU in float32, its quantized Linears replaced by bitsmith runtime modules, in eval mode.

    Peak memory is one float copy of the model (the skeleton is built, then its Linears are swapped out).
    """
    path = Path(path)
    qc = read_config(path).get("quantization_config") or {}
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        raise BitsmithError(f"{path} is not a compressed-tensors checkpoint (no quant_method 'compressed-tensors')")
    groups, ignore = _check_ct_config(qc, path), list(qc.get("ignore") or [])
    tensors = _read_tensors(path)
    if (qc.get("sparsity_config") or {}).get("format") in SPARSE_FORMATS:
        _decompress_sparse(tensors, path)
    # a causal LM by its config, or (a config written without architectures) by its output head
    model = _skeleton(path, is_causal_lm_dir(path) or "lm_head.weight" in tensors)
    replaced = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.weight_packed" not in tensors:
            continue
        weights = _weights_for(name, module, groups, ignore)
        if weights is None:
            raise BitsmithError(f"layer '{name}' is packed in {path} but no config group of its config targets it")
        bias = tensors.pop(f"{name}.bias", None)
        new = _runtime_linear(_quantized_weight(name, tensors, weights, module), bias)
        replace_module(model, name, new)
        replaced.add(name)
    plain = {k: v.float() if v.dtype.is_floating_point else v for k, v in tensors.items()
             if not any(p in replaced for p in prefixes(k))}
    _load_plain(model, plain, replaced, path)
    model.bitsmith_source = {"kind": "compressed-tensors", "format": "pack-quantized"}
    model.bitsmith_recipe, model.bitsmith_skipped = None, {}
    return model.eval()


def _load_plain(model: nn.Module, plain: dict[str, torch.Tensor], replaced: set[str], path: Path) -> None:
    expected = {k: v for k, v in model.state_dict().items() if not any(p in replaced for p in prefixes(k))}
    unexpected = sorted(set(plain) - set(expected))
    if unexpected:
        raise BitsmithError(f"checkpoint {path} has tensor '{unexpected[0]}' that the model has no place for")
    for key, tensor in plain.items():
        if tensor.shape != expected[key].shape:
            raise BitsmithError(
                f"tensor '{key}' is {list(tensor.shape)} in {path} but {list(expected[key].shape)} in the model"
            )
    stored = {expected[k].data_ptr() for k in plain}
    # a tied tensor (lm_head sharing the embedding) is stored once
    missing = [k for k in expected if k not in plain and expected[k].data_ptr() not in stored]
    if missing:
        raise BitsmithError(f"incomplete checkpoint: tensor '{missing[0]}' is missing from {path}")
    model.load_state_dict(plain, strict=False)
