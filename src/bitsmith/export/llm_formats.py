"""Write bitsmith-quantized language models as checkpoints that transformers and vLLM load, and read them back.

Two formats for weight-only schemes with one scale (and zero point) per group or per row (compressed-tensors:
2 to 8 bits; GPTQ: 4 and 8 bits):

    format                      | per quantized Linear (N = out_features, K = in_features, G = groups)
    compressed-tensors          | weight_packed int32 (N, ceil(K * bits / 32)), codes along K
      "pack-quantized"          | weight_scale (N, G) in the model's float dtype; weight_shape int64 [N, K]
                                | weight_zero_point int32, only when asymmetric: packed along N, its
                                |   ceil(N * bits / 32) words in the first rows of an (N, G) tensor (see below)
    GPTQ, checkpoint_format     | qweight int32 (K * bits / 32, N), codes along K; scales fp16 (G, N)
      "gptq" (v1)               | qzeros int32 (G, N * bits / 32) holding zero - 1; g_idx int32 (K,) = k // group

Both pack codes along K as one bit stream, element j of a run at bits ``[j * bits, (j + 1) * bits)``, least
significant first (``bitsmith.formats.packing.pack_int32_dense``; for 4 and 8 bits, ``32 // bits`` whole codes per
word; compressed-tensors lets a 3-bit code straddle two words). compressed-tensors thinks of codes and zero
points as signed, ``q_signed = q - 2**(bits - 1)``, and packs ``q_signed + 2**(bits - 1)``: exactly bitsmith's
unsigned code, so bitsmith's codes and zero points are packed as they are and ``(q - zero) * scale`` is unchanged.

G = ceil(K / group): a last group shorter than the others is stored like the rest (its scale and zero point
cover the remaining columns), as compressed-tensors quantizes it.

Why the zero points are padded to (N, G): transformers 5.24 with compressed-tensors 0.20.1 registers each
module's ``weight_zero_point`` at the unpacked shape (N, G) before loading and refuses a tightly packed
(ceil(N * bits / 32), G) tensor; compressed-tensors' own unpacking (at the first forward) reads only the words
it needs from the start of the tensor. So a padded tensor loads in plain ``AutoModelForCausalLM.from_pretrained``
and decompresses to the same weights; bitsmith reads both forms.

Pruned float Linears can be written as compressed-tensors ``sparse-bitmask`` (``sparse="bitmask"``; see
``bitsmith.export.ct_sparse`` for its layout and why it is not the default); pruned quantized ones stay
pack-quantized.

Everything else (norms, float Linears such as ``lm_head``, embeddings, which bitsmith dequantizes to float
here) is written as plain float tensors under the transformers names, with config.json, generation_config.json
and the tokenizer files, so the directory is a complete model. ``bitsmith.io.compressed_tensors.load_compressed_tensors`` reads a
pack-quantized directory (ours or llm-compressor's) back into a transformers model whose quantized Linears are
bitsmith runtime modules.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from bitsmith.export.ct_sparse import (
    check_choice,
    float_sparse_note,
    quantized_sparse_note,
    sparse_float_layers,
    write_sparse,
)
from bitsmith.io.compressed_tensors import CT_BITS, prefixes
from bitsmith.io.outputs import SAFETENSORS_METADATA, prepare_output_dir, publish, staging_dir
from bitsmith.errors import BitsmithError
from bitsmith.formats.packing import pack_int32, pack_int32_dense
from bitsmith.nn import (
    QUANTIZED_MODULES,
    HalfEmbedding,
    HalfLinear,
    Int8WeightOnlyLinear,
    IntxWeightOnlyLinear,
    QuantizedEmbedding,
)

__all__ = ["export_compressed_tensors", "export_gptq"]

WEIGHTS_FILE = "model.safetensors"
_BITS = (4, 8)  # GPTQ: widths that pack 32 // bits to a word without straddling
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _Scheme:
    bits: int
    group_size: int | None  # None: one group spanning each row (compressed-tensors "channel")
    symmetric: bool
    observer: str = "minmax"  # how the ranges were chosen: "minmax", or "mse" (searched)
    actorder: str | None = None  # "weight": GPTQ in activation order with static groups (no g_idx needed)


@dataclass
class _IntLinear:
    """A quantized Linear seen in unsigned form: ``w = (codes - zero) * scale``, groups along K."""

    codes: torch.Tensor  # (N, K) uint8 in [0, 2**bits - 1]
    scale: torch.Tensor  # (N, G) float32
    zero: torch.Tensor  # (N, G) uint8 in [0, 2**bits - 1]; 2**(bits - 1) everywhere when symmetric
    bias: torch.Tensor | None
    bits: int
    group_size: int | None


# ----------------------------------------------------------------------------------------------- reading the model


def _as_int_linear(name: str, module: nn.Module, allowed_bits=_BITS) -> _IntLinear | None:
    """The integer view of a bitsmith Linear; None for float ones (nn.Linear, HalfLinear)."""
    if isinstance(module, (nn.Linear, HalfLinear)):
        return None
    if isinstance(module, Int8WeightOnlyLinear):
        codes = (module.weight_codes.to(torch.int16) + 128).to(torch.uint8)  # signed symmetric -> unsigned
        zero = torch.full_like(module.weight_scale, 128, dtype=torch.uint8)
        return _IntLinear(codes, module.weight_scale.float(), zero, module.bias, 8, None)
    if isinstance(module, IntxWeightOnlyLinear):
        if module.bits not in allowed_bits:
            raise BitsmithError(
                f"layer '{name}' holds {module.bits}-bit weights: this format is written for"
                f" {' or '.join(str(b) for b in allowed_bits)} bits; use --format compressed-tensors or int4/int8 weights"
            )
        group = None if module.group_size == module.in_features else module.group_size
        return _IntLinear(
            module.codes(), module.weight_scale.float(), module.weight_zero_point, module.bias, module.bits, group
        )
    raise BitsmithError(
        f"layer '{name}' is {type(module).__name__} ({getattr(module, 'scheme', '?')}): LLM checkpoints hold"
        " weight-only int4/int8 Linears; use a w4a16 or w8a16 recipe, or export to ONNX"
    )


def _collect(model: nn.Module, allowed_bits=_BITS, require_quantized: bool = True
             ) -> tuple[dict[str, _IntLinear], list[str], set[str]]:
    """(quantized Linears by name, names of float Linears, names of every bitsmith module)."""
    quantized, float_linears, special = {}, [], set()
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_MODULES):
            special.add(name)
        if isinstance(module, QUANTIZED_MODULES) and not isinstance(module, (QuantizedEmbedding, HalfEmbedding)):
            view = _as_int_linear(name, module, allowed_bits)
            if view is None:
                float_linears.append(name)
            else:
                quantized[name] = view
        elif type(module) is nn.Linear:
            float_linears.append(name)
    if not quantized and require_quantized:
        raise BitsmithError("the model has no integer weight-only Linear layers: quantize it first (e.g. w4a16)")
    return quantized, float_linears, special


def _provenance(model: nn.Module, name: str) -> tuple[str, str | None]:
    """(observer, actorder) of a layer, from what quantize_ recorded it did and the recipe's GPTQ options."""
    label = (getattr(model, "bitsmith_quantized", None) or {}).get(name, "")
    observer = "mse" if " mse" in label else "minmax"
    gptq = _recipe_gptq_options(model)
    actorder = "weight" if label.endswith(" gptq") and gptq.get("act_order", True) else None
    return observer, actorder


def _schemes(quantized: dict[str, _IntLinear], model: nn.Module | None = None) -> dict[str, _Scheme]:
    """Each layer's scheme. Symmetric means every zero point sits at 2**(bits - 1); it is decided per
    (bits, group) family so that one asymmetric recipe gives one scheme even if a layer happens to be centred."""
    families: dict[tuple[int, int | None], list[str]] = {}
    for name, layer in quantized.items():
        families.setdefault((layer.bits, layer.group_size), []).append(name)
    schemes = {}
    for (bits, group), names in families.items():
        symmetric = all(bool((quantized[n].zero == 2 ** (bits - 1)).all()) for n in names)
        for n in names:
            observer, actorder = _provenance(model, n) if model is not None else ("minmax", None)
            schemes[n] = _Scheme(bits, group, symmetric, observer, actorder)
    return schemes


def _recipe_gptq_options(model: nn.Module) -> dict:
    """The GPTQ options of the recipe the model was quantized by: version 2 (the first quantize stage's),
    version 1 (its quantize section) or a bare quantize config, as bitsmith.json recorded it."""
    recipe = getattr(model, "bitsmith_recipe", None) or {}
    if not isinstance(recipe, dict):
        return {}
    quantize = recipe.get("quantize", recipe)
    for stage in recipe.get("stages") or []:
        if isinstance(stage, dict) and isinstance(stage.get("quantize"), dict):
            quantize = stage["quantize"]
            break
    return quantize.get("gptq") or {} if isinstance(quantize, dict) else {}


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float parameters (norms, lm_head): what its checkpoint is written in."""
    for parameter in model.parameters():
        if parameter.dtype in _FLOAT_DTYPES:
            return parameter.dtype
    return torch.float32


def _output_embedding_name(model: nn.Module) -> str | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    return next((name for name, module in model.named_modules() if module is head), None) if head is not None else None


def _plain_tensors(model: nn.Module, special: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor outside the quantized Linears, as transformers names it: float ones in ``dtype``,
    bitsmith embeddings and half-precision Linears as plain float ``weight`` (and ``bias``)."""
    modules = dict(model.named_modules())
    tensors = {}
    for key, tensor in model.state_dict().items():
        if not any(prefix in special for prefix in prefixes(key)):
            tensors[key] = tensor
    for name in special:
        module = modules[name]
        if isinstance(module, (QuantizedEmbedding, HalfEmbedding)):
            tensors[f"{name}.weight"] = module.dequantize() if isinstance(module, QuantizedEmbedding) else module.weight
        elif isinstance(module, HalfLinear):
            tensors[f"{name}.weight"] = module.weight
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias
    cast = {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in tensors.items()}
    return {k: v.detach().cpu().contiguous().clone() for k, v in cast.items()}  # clone: no shared storage


def _untie_if_needed(model: nn.Module, tensors: dict[str, torch.Tensor], quantized: dict) -> bool:
    """Whether the checkpoint must say ``tie_word_embeddings: false``. Quantizing the embedding or the head
    breaks the tie (bitsmith quantizes them separately); if both stayed equal, the head's copy is dropped."""
    config = getattr(model, "config", None)
    head = _output_embedding_name(model)
    if config is None or not getattr(config, "tie_word_embeddings", False) or head is None:
        return False
    embedding = next((n for n, m in model.named_modules() if m is model.get_input_embeddings()), None)
    head_key, embedding_key = f"{head}.weight", f"{embedding}.weight"
    if head not in quantized and head_key in tensors and torch.equal(tensors[head_key], tensors[embedding_key]):
        del tensors[head_key]
        return False
    return True


# ------------------------------------------------------------------------------------------------------ writing


@contextlib.contextmanager
def _staging_dir(out_dir: str | Path):
    """A temporary directory beside ``out_dir``, published to it when the block ends without error."""
    out = prepare_output_dir(out_dir)
    tmp = staging_dir(out)
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_model_dir(
    tmp: Path, model: nn.Module, tokenizer, tensors: dict, quantization_config: dict, dtype: torch.dtype, untie: bool
) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise BitsmithError("LLM checkpoints are written for transformers models (the model has no .config)")
    save_file(tensors, tmp / WEIGHTS_FILE, metadata=SAFETENSORS_METADATA)
    config.save_pretrained(tmp)
    config_path = tmp / "config.json"
    written = json.loads(config_path.read_text())
    written["quantization_config"] = quantization_config
    written["architectures"] = [type(model).__name__]  # what loaders build (a model made in code has none set)
    written["torch_dtype" if "torch_dtype" in written else "dtype"] = str(dtype).removeprefix("torch.")
    if untie:
        written["tie_word_embeddings"] = False
    config_path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def _ct_group(scheme: _Scheme, targets: list[str]) -> dict:
    weights = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": "channel" if scheme.group_size is None else "group",
        "group_size": scheme.group_size,
        "dynamic": False,
        "actorder": scheme.actorder,
        "observer": scheme.observer,
    }
    return {
        "targets": targets,
        "weights": weights,
        "input_activations": None,
        "output_activations": None,
        "format": "pack-quantized",
    }


def _ct_quantization_config(schemes: dict[str, _Scheme], float_linears: list[str]) -> dict:
    """One config group targeting every "Linear" when all layers share a scheme; otherwise one group per
    scheme, targeting its layers by name."""
    distinct = sorted(set(schemes.values()), key=lambda s: (s.bits, s.group_size or 0, s.symmetric, s.observer,
                                                            s.actorder or ""))
    if len(distinct) == 1:
        groups = {"group_0": _ct_group(distinct[0], ["Linear"])}
    else:
        groups = {
            f"group_{i}": _ct_group(s, sorted(n for n, t in schemes.items() if t == s)) for i, s in enumerate(distinct)
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(float_linears),
    }


def _ct_tensors(name: str, layer: _IntLinear, scheme: _Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out_features, in_features = layer.codes.shape
    tensors = {
        f"{name}.weight_packed": pack_int32_dense(layer.codes, layer.bits, dim=1),  # (N, ceil(K * bits / 32))
        f"{name}.weight_scale": layer.scale.to(dtype).contiguous(),  # (N, G)
        f"{name}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not scheme.symmetric:  # packed along N into the first ceil(N * bits / 32) rows of an (N, G) tensor
        packed = pack_int32_dense(layer.zero, layer.bits, dim=0)  # (ceil(N * bits / 32), G)
        zero = torch.zeros(out_features, packed.shape[1], dtype=torch.int32)
        zero[: packed.shape[0]] = packed
        tensors[f"{name}.weight_zero_point"] = zero
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.detach().to(dtype).clone()
    return tensors


def export_compressed_tensors(
    model: nn.Module, tokenizer, out_dir: str | Path, *, dtype: torch.dtype | None = None, sparse: str = "dense"
) -> dict:
    """Write ``model`` (quantized by bitsmith with int4/int8 weight-only schemes, and/or pruned) as a
    compressed-tensors model directory in the new directory ``out_dir``: quantized Linears ``pack-quantized``;
    with ``sparse="bitmask"`` and no quantized layer, float Linears that pruning made sparse as
    ``sparse-bitmask`` (or ``sparse-24-bitmask`` when all of them are 2:4), which only older readers decompress
    (``export.ct_sparse``).

    ``dtype`` (default: the dtype of the model's float parameters) is what scales and float tensors are
    written in; bitsmith's fp16 scales are exact in fp16 and fp32. Returns a summary of what was written,
    with "notes": lines about what was not written as asked or who can read it.
    """
    check_choice(sparse)
    quantized, float_linears, special = _collect(model, CT_BITS, require_quantized=False)
    schemes = _schemes(quantized, model)
    dtype = dtype or _float_dtype(model)
    tensors = _plain_tensors(model, special, dtype)
    for name, layer in quantized.items():
        tensors.update(_ct_tensors(name, layer, schemes[name], dtype))
    untie = _untie_if_needed(model, tensors, quantized)
    sparse_layers = sparse_float_layers(tensors, float_linears)
    if not quantized and not (sparse == "bitmask" and sparse_layers):
        hint = "; or write its sparse layers as sparse-bitmask (--sparse bitmask)" if sparse_layers else ""
        raise BitsmithError("the model has no integer weight-only Linear layers: quantize it first (e.g. w4a16)" + hint)
    bitmask = sparse == "bitmask" and bool(sparse_layers) and not quantized  # see ct_sparse: 0.14 reads no mix
    written = write_sparse(model, tensors, sparse_layers) if bitmask else None
    config = _ct_quantization_config(schemes, float_linears) if quantized else {"quant_method": "compressed-tensors"}
    if written is not None:
        config["sparsity_config"] = written
    notes = [note for note in (float_sparse_note(sparse_layers, written, sparse, bool(quantized)),
                               quantized_sparse_note(model, quantized)) if note]
    with _staging_dir(out_dir) as tmp:
        _write_model_dir(tmp, model, tokenizer, tensors, config, dtype, untie)
    out = Path(out_dir)
    return {"path": str(out), "bytes": (out / WEIGHTS_FILE).stat().st_size, "quantization_config": config,
            "notes": notes}


# ----------------------------------------------------------------------------------------------------------- GPTQ


def _gptq_tensors(name: str, layer: _IntLinear, checkpoint_format: str) -> dict[str, torch.Tensor]:
    out_features, in_features = layer.codes.shape
    per_word = 32 // layer.bits
    if in_features % per_word or out_features % per_word:
        raise BitsmithError(
            f"layer '{name}' is {out_features}x{in_features}: GPTQ packs {per_word} {layer.bits}-bit codes per word"
            f" along both dimensions; both must be multiples of {per_word}"
        )
    group_size = layer.group_size or in_features
    zeros = layer.zero.to(torch.int16)  # (N, G)
    if checkpoint_format == "gptq":  # v1 stores zero - 1; its loaders add 1 back without masking
        if bool((zeros == 0).any()):
            raise BitsmithError(
                f"layer '{name}' has zero points of 0, which GPTQ v1 (zero - 1) cannot store;"
                " export with checkpoint_format='gptq_v2', quantize symmetrically, or export compressed-tensors"
            )
        zeros = zeros - 1
    tensors = {
        f"{name}.qweight": pack_int32(layer.codes.t(), layer.bits, dim=0).contiguous(),  # (K * bits / 32, N)
        f"{name}.qzeros": pack_int32(zeros.t(), layer.bits, dim=1).contiguous(),  # (G, N * bits / 32)
        f"{name}.scales": layer.scale.t().to(torch.float16).contiguous(),  # (G, N)
        f"{name}.g_idx": (torch.arange(in_features) // group_size).to(torch.int32),  # (K,)
    }
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.detach().to(torch.float16).clone()
    return tensors


def _check_gptq_layout(model: nn.Module, schemes: dict[str, _Scheme], float_linears: list[str]) -> _Scheme:
    distinct = {(s.bits, s.group_size, s.symmetric): s for s in schemes.values()}
    if len(distinct) > 1:
        raise BitsmithError(
            f"a GPTQ checkpoint has one scheme, but the model mixes {len(distinct)} (bits/group/symmetry);"
            " export compressed-tensors instead"
        )
    head = _output_embedding_name(model)
    if head in schemes:
        raise BitsmithError(f"GPTQ checkpoints keep '{head}' in float: add it to the recipe's ignore list")
    stray = [n for n in float_linears if n != head]
    if stray:  # GPTQ loaders turn every Linear inside the decoder blocks into a quantized one
        raise BitsmithError(
            f"layer '{stray[0]}' is a float Linear, but GPTQ loaders expect every Linear in the model's blocks"
            " quantized; quantize it or export compressed-tensors"
        )
    return next(iter(distinct.values()))


def export_gptq(
    model: nn.Module, tokenizer, out_dir: str | Path, *, checkpoint_format: str = "gptq", dtype=torch.float16
) -> dict:
    """Write ``model`` (int4/int8 weight-only, one scheme for every Linear but the output head) as a GPTQ
    checkpoint in the new directory ``out_dir``.

    ``checkpoint_format`` "gptq" (v1, what transformers, optimum and vLLM read) stores zero - 1 per group, so a
    zero point of 0 is refused; "gptq_v2" (gptqmodel) stores zero points as they are. Scales are fp16 (the
    format's); other float tensors are written in ``dtype``. The config's ``desc_act``, ``static_groups``,
    ``true_sequential`` and ``damp_percent`` say what the recipe ran (GPTQ's options, or round-to-nearest).
    """
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise BitsmithError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}: use 'gptq' or 'gptq_v2'")
    quantized, float_linears, special = _collect(model)
    schemes = _schemes(quantized, model)
    scheme = _check_gptq_layout(model, schemes, float_linears)
    tensors = _plain_tensors(model, special, dtype)
    for name, layer in quantized.items():
        tensors.update(_gptq_tensors(name, layer, checkpoint_format))
    options = _recipe_gptq_options(model)
    labels = getattr(model, "bitsmith_quantized", None) or {}
    gptq_done = any(labels.get(name, "").endswith(" gptq") for name in quantized)
    untie = _untie_if_needed(model, tensors, quantized)
    config = {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size or -1,  # -1: one group per output row
        # act-order with static groups: columns were processed by decreasing Hessian diagonal, but each
        # keeps its group c // group_size, which the g_idx written says
        "desc_act": scheme.actorder == "weight",
        "sym": scheme.symmetric,
        "true_sequential": bool(options.get("true_sequential", True)) if gptq_done else False,
        "damp_percent": float(options.get("damp_percent", 0.01)),
        "static_groups": scheme.actorder == "weight",
        "checkpoint_format": checkpoint_format,
    }
    with _staging_dir(out_dir) as tmp:
        _write_model_dir(tmp, model, tokenizer, tensors, config, dtype, untie)
    out = Path(out_dir)
    return {"path": str(out), "bytes": (out / WEIGHTS_FILE).stat().st_size, "quantization_config": config}


