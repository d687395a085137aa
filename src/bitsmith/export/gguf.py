"""Write a bitsmith-compressed Llama as one GGUF file, the format llama.cpp (and transformers) load.

Tensors get llama.cpp's names (N = block):

    transformers module                      | GGUF tensor                     | written as
    model.embed_tokens                       | token_embd.weight               | matrix (quantized, as llama.cpp does)
    model.layers.N.input_layernorm           | blk.N.attn_norm.weight          | F32
    model.layers.N.self_attn.{q,k,v,o}_proj  | blk.N.attn_{q,k,v,output}.weight| matrix; q and k rows permuted
    model.layers.N.post_attention_layernorm  | blk.N.ffn_norm.weight           | F32
    model.layers.N.mlp.{gate,up,down}_proj   | blk.N.ffn_{gate,up,down}.weight | matrix
    model.norm                               | output_norm.weight              | F32
    lm_head                                  | output.weight                   | matrix; left out when tied

A matrix whose bitsmith codes already are GGUF blocks (integer codes in groups of 32 with fp16 scales) is
written from its codes, never re-quantized:

    every group's q - zero in [-8, 7]      -> Q4_0, d = scale: exact (int4 symmetric; also any int3, int2)
    otherwise, codes of 4 bits or fewer    -> Q4_1, d = scale, m = -scale * zero rounded to fp16: the codes are
                                              kept but m is not always exact (measured, said in the notes)
    every group's q - zero in [-128, 127]  -> Q8_0, d = scale: exact (int8 symmetric)
    a float min a group (IntxMinWeightOnlyLinear: an imported Q4_1 file) -> Q4_1, d and m as held: exact

Every other matrix (float, other group sizes, per-row int8, fp8, lookup tables) is dequantized and quantized
again to ``gguf_type``; each is named in the notes. A row length that ``gguf_type``'s block does not divide
falls back to the next type that fits (Q4_K to Q4_1, the others to Q8_0, then F16).

llama.cpp's rotary layout rotates pairs of adjacent dimensions within a head, transformers' pairs dimension i
with i + head_dim / 2; so the rows of q_proj (and of k_proj, with the key/value heads) are reordered, per head,
from (2, head_dim / 2) to (head_dim / 2, 2), as llama.cpp's own converter does.

The tokenizer goes in as llama.cpp's "gpt2" (byte-level BPE) vocabulary: tokens, token types, merges, special
token ids, whether BOS / EOS are added, and the chat template when there is one.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.formats.gguf_blocks import (GGUF_BLOCKS, block_fits, dequantize, pack_q4_0, pack_q4_1, pack_q8_0,
                                          quantize, rotary_row_order)
from bitsmith.io.outputs import publish, staging_file
from bitsmith.nn import (Int8DynamicLinear, IntxMinWeightOnlyLinear, IntxWeightOnlyLinear, LoRALinear,
                         QuantizedEmbedding, StaticInt8Linear)

__all__ = ["GGUF_TYPES", "check_gguf_type", "export_gguf"]

GGUF_TYPES = tuple(GGUF_BLOCKS)  # what --gguf-type offers for the matrices bitsmith re-quantizes
# when a type's block does not divide a row (SmolLM2's 576): the next of these that does; llama.cpp's quantizer also
# falls back per tensor (Q4_K to Q5_0, Q6_K to Q8_0); bitsmith keeps Q4_K's asymmetric 4 bits in Q4_1
_FALLBACKS = {"q4_k": ("q4_1", "q8_0", "f16"), "q4_0": ("q8_0", "f16"), "q4_1": ("q8_0", "f16"),
              "q6_k": ("q8_0", "f16"), "q8_0": ("f16",)}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK_NAMES = {  # under model.layers.N -> under blk.N
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_NORMS = ("output_norm", "attn_norm", "ffn_norm")
_UNWRITABLE = {  # bitsmith modules whose computation a GGUF matrix cannot describe -> what to do instead
    Int8DynamicLinear: "its activations are quantized at run time; export a weight-only recipe (e.g. w8a16)",
    StaticInt8Linear: "its activations are quantized with calibrated scales; export a weight-only recipe",
    LoRALinear: "it carries LoRA adapters; merge them into the weights first",
}
_FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1",
               "q4_k": "MOSTLY_Q4_K_S", "q6_k": "MOSTLY_Q6_K"}  # every matrix of one type: llama.cpp's "S" mix
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # llama.cpp token types


def check_gguf_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise BitsmithError(f"unknown GGUF type '{gguf_type}'; available: {', '.join(GGUF_TYPES)}")


@dataclass
class _Written:
    """What a matrix became: its GGUF type, and how (bitsmith's codes, or re-quantized from what)."""

    types: dict[str, str] = field(default_factory=dict)  # bitsmith module name -> GGUF type
    exact: list[str] = field(default_factory=list)
    requantized: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (from scheme, to) -> names
    q4_1_groups: int = 0
    q4_1_rounded: int = 0  # Q4_1 groups whose m = -scale * zero fp16 cannot hold
    q4_1_moved: list[float] = field(default_factory=list)  # per Q4_1 layer: largest |GGUF weight - bitsmith's|


# ----------------------------------------------------------------------------------------------- the model


def _llama_config(model: nn.Module):
    """The model's LlamaConfig, after checking that llama.cpp's "llama" architecture describes it."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind != "llama" or not hasattr(model, "lm_head"):
        name = type(model).__name__
        what = f"a '{kind}' model ({name})" if kind else f"{name}, not a transformers model"
        raise BitsmithError(f"GGUF export writes Llama-family causal LMs (LlamaForCausalLM); this checkpoint is {what}")
    if _rope(config)["rope_type"] != "default":
        raise BitsmithError(f"the model uses '{_rope(config)['rope_type']}' rope scaling, which bitsmith's GGUF export"
                            " does not write")
    return config


def _rope(config) -> dict:
    """rope_theta and rope_type, from transformers 5's rope_parameters or the older rope_theta / rope_scaling."""
    if getattr(config, "rope_parameters", None):
        return {"rope_type": "default", **config.rope_parameters}
    return {"rope_theta": config.rope_theta, "rope_type": (config.rope_scaling or {}).get("rope_type", "default")}


def _gguf_name(module_name: str) -> str | None:
    if module_name in _TOP_NAMES:
        return _TOP_NAMES[module_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module_name)
    if match and match[2] in _BLOCK_NAMES:
        return f"blk.{match[1]}.{_BLOCK_NAMES[match[2]]}"
    return None


def _mapped_modules(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """GGUF name -> (module name, module) for every tensor the file holds; refuses anything left over."""
    modules = dict(model.named_modules())
    mapped = {_gguf_name(name): (name, module) for name, module in modules.items() if _gguf_name(name)}
    for name, module in mapped.values():
        if type(module) in _UNWRITABLE:
            raise BitsmithError(f"layer '{name}' is {type(module).__name__} ({module.scheme}): GGUF cannot hold it"
                                f" because {_UNWRITABLE[type(module)]}")
        if getattr(module, "bias", None) is not None:
            raise BitsmithError(f"layer '{name}' has a bias, which llama.cpp's Llama layout does not hold")
    covered = {name for name, _ in mapped.values()}
    for key in model.state_dict():
        if not any(key.startswith(name + ".") for name in covered):
            raise BitsmithError(f"the model's tensor '{key}' has no place in llama.cpp's Llama layout")
    return mapped


def _tied(model: nn.Module) -> bool:
    """Whether lm_head reads the embedding's own weight (then llama.cpp's output.weight is left out)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return isinstance(head, nn.Linear) and isinstance(embedding, nn.Embedding) and head.weight is embedding.weight


# ----------------------------------------------------------------------------------------------- matrices


def _float_weight(name: str, module: nn.Module) -> np.ndarray:
    """The weight as bitsmith computes with it, float32 (N, K)."""
    weight = module.dequantize() if hasattr(module, "dequantize") else getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise BitsmithError(f"layer '{name}' is {type(module).__name__}: the GGUF export cannot read it as a matrix")
    return weight.detach().float().cpu().numpy()


def _integer_groups(module: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """(codes (N, K), fp16 scales and zero points (N, K / 32), bits) of a layer stored as integer groups of 32;
    None for any other storage."""
    if not isinstance(module, (IntxWeightOnlyLinear, QuantizedEmbedding)) or module.group_size != 32:
        return None
    codes = module.codes().numpy().astype(np.int16)
    if codes.shape[1] % 32 or module.weight_scale.dtype != torch.float16:
        return None
    return codes, module.weight_scale.numpy(), module.weight_zero_point.numpy().astype(np.int16), module.bits


def _from_codes(name: str, module: nn.Module, written: _Written) -> tuple[str, np.ndarray] | None:
    """The matrix as GGUF blocks made from bitsmith's codes, or None when they fit no block type."""
    if isinstance(module, IntxMinWeightOnlyLinear) and module.bits <= 4 and module.group_size == 32:
        # a float min a group (an imported Q4_1 file): its scales and mins are fp16 already, written as they are
        return "q4_1", pack_q4_1(module.codes().numpy(), module.weight_scale.numpy(), module.weight_min.numpy())
    groups = _integer_groups(module)
    if groups is None:
        return None
    codes, scale, zero, bits = groups
    centred = codes - np.repeat(zero, 32, axis=1)  # (N, K): q - zero, each weight in steps of its scale
    if centred.min() >= -8 and centred.max() <= 7:
        return "q4_0", pack_q4_0(centred + 8, scale)
    if bits <= 4:
        minimum = -(scale.astype(np.float32) * zero)  # d * q + m = (q - zero) * scale, with m rounded to fp16
        data = pack_q4_1(codes, scale, minimum)
        moved = np.abs(dequantize(data, "q4_1") - _float_weight(name, module)).max()
        written.q4_1_moved.append(float(moved))
        written.q4_1_rounded += int(np.sum(minimum.astype(np.float16).astype(np.float32) != minimum))
        written.q4_1_groups += minimum.size
        return "q4_1", data
    if centred.min() >= -128 and centred.max() <= 127:
        return "q8_0", pack_q8_0(centred, scale)
    return None


def _requantized(weight: np.ndarray, gguf_type: str) -> tuple[str, np.ndarray]:
    """``weight`` quantized to ``gguf_type``, or to its first fallback whose block divides the rows."""
    for candidate in (gguf_type, *_FALLBACKS[gguf_type]):
        if candidate == "f16":
            return "f16", weight.astype(np.float16)
        if block_fits(candidate, weight.shape[1]):
            return candidate, quantize(weight, candidate)
    raise AssertionError("unreachable: f16 takes every row")


def _matrix(name: str, module: nn.Module, gguf_type: str, written: _Written) -> np.ndarray:
    """(N, bytes per row) blocks, or (N, K) fp16, of one matrix, in the module's row order."""
    exact = _from_codes(name, module, written)
    if exact is not None:
        kind, data = exact
        written.exact.append(name)
    else:
        kind, data = _requantized(_float_weight(name, module), gguf_type)
        written.requantized.setdefault((getattr(module, "scheme", "float"), kind), []).append(name)
    written.types[name] = kind
    return data


# ----------------------------------------------------------------------------------------------- tokenizer


def _tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """llama.cpp's "gpt2" tokenizer metadata of a byte-level BPE transformers tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        kind = f"{model.get('type', type(tokenizer).__name__)} with pre-tokenizer {pre.get('type')}"
        raise BitsmithError(f"the tokenizer is {kind}; GGUF export writes byte-level BPE tokenizers (GPT-2 style) only")
    tokens: list[str | None] = [None] * vocab_size
    types = [_NORMAL] * vocab_size
    roles = {getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "unk", "pad")}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    # a special token added beyond the embeddings that no role uses has no row to embed and is never produced:
    # left out (transformers' GGUF reader adds "<|endoftext|>" so to a file that has no such token)
    left_out = {i for i, e in added.items() if i >= vocab_size and e.get("special") and i not in roles}
    for token, index in list(model["vocab"].items()) + [(e["content"], i) for i, e in added.items()]:
        if index in left_out:
            continue
        if index >= vocab_size:
            raise BitsmithError(f"token '{token}' has id {index}, beyond the model's {vocab_size} embeddings")
        tokens[index] = token
        if index in added:
            types[index] = _CONTROL if added[index]["special"] else _USER_DEFINED
    for index in (i for i, token in enumerate(tokens) if token is None):  # embeddings no token uses
        tokens[index], types[index] = f"[PAD{index}]", _UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    return {
        "tokens": tokens, "types": types, "merges": merges,
        "ids": {kind: getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "unk", "pad")},
        "add_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "add_eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def _add_tokenizer(writer, fields: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the ByteLevel pre-tokenizer's own split (GPT-2's regular expression)
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for kind, index in fields["ids"].items():
        if index is not None:
            adders[kind](index)
    writer.add_add_bos_token(fields["add_bos"])
    writer.add_add_eos_token(fields["add_eos"])
    if fields["chat_template"]:
        writer.add_chat_template(fields["chat_template"])


# ----------------------------------------------------------------------------------------------- writing


def _add_hyperparameters(writer, config, name: str, file_type: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if name:
        writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[file_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensors(model: nn.Module, config, gguf_type: str) -> tuple[dict[str, tuple[np.ndarray, str]], _Written]:
    """GGUF name -> (data, GGUF type) for every tensor, and what each matrix became."""
    written, tensors = _Written(), {}
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    tied = _tied(model)
    for gguf_name, (name, module) in _mapped_modules(model).items():
        short = gguf_name.rsplit(".", 1)[-1]
        if short in _NORMS:
            tensors[f"{gguf_name}.weight"] = (module.weight.detach().float().cpu().numpy(), "f32")
        elif not (short == "output" and tied):
            data = _matrix(name, module, gguf_type, written)
            if short in heads:  # rows are independent in every block type: reorder the packed rows
                data = data[rotary_row_order(data.shape[0], heads[short])]
            tensors[f"{gguf_name}.weight"] = (data, written.types[name])
    return tensors, written


def _main_type(tensors: dict[str, tuple[np.ndarray, str]]) -> str:
    """The type that holds most of the matrices' weights: what llama.cpp's general.file_type names."""
    weights = Counter()
    for data, kind in tensors.values():
        if kind == "f16":
            weights[kind] += data.size
        elif kind != "f32":
            block, size = GGUF_BLOCKS[kind]
            weights[kind] += data.size // size * block
    return weights.most_common(1)[0][0]


def _notes(written: _Written, gguf_type: str) -> list[str]:
    notes = []
    if written.exact:
        kinds = Counter(written.types[name] for name in written.exact)
        which = ", ".join(f"{count} {kind.upper()}" for kind, count in sorted(kinds.items()))
        notes.append(f"{len(written.exact)} layers written from bitsmith's codes without re-quantizing ({which})")
    if written.q4_1_moved:
        notes.append(f"Q4_1 stores m = -scale * zero in fp16: rounded in {written.q4_1_rounded} of"
                     f" {written.q4_1_groups} groups, moving weights"
                     f" by at most {max(written.q4_1_moved):.3g} from bitsmith's (the codes and scales are kept)")
    for (scheme, kind), names in written.requantized.items():
        notes.append(f"re-quantized to {kind.upper()} from {scheme} ({len(names)}): {', '.join(names)}")
    fallen = {kind for (_, kind) in written.requantized} - {gguf_type}
    if fallen:
        block = GGUF_BLOCKS[gguf_type][0]
        notes.append(f"the layers re-quantized to {' / '.join(k.upper() for k in sorted(fallen))} have rows that"
                     f" {gguf_type.upper()}'s blocks of {block} weights do not divide (llama.cpp falls back too)")
    return notes


def export_gguf(model: nn.Module, tokenizer, out: str | Path, gguf_type: str = "q8_0", name: str | None = None) -> dict:
    """Write ``model`` (a bitsmith-loaded Llama) and its tokenizer to the GGUF file ``out``."""
    import gguf

    check_gguf_type(gguf_type)
    config = _llama_config(model)
    if tokenizer is None:
        raise BitsmithError("the checkpoint has no tokenizer files (nor a float source that has them); a GGUF file"
                            " holds the tokenizer: save the model with its tokenizer")
    fields = _tokenizer_fields(tokenizer, config.vocab_size)
    with torch.no_grad():
        tensors, written = _tensors(model, config, gguf_type)
    out = Path(out)
    tmp = staging_file(out)
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        _add_hyperparameters(writer, config, name, _main_type(tensors))
        _add_tokenizer(writer, fields)
        for tensor_name, (data, kind) in tensors.items():
            raw = None if kind in ("f32", "f16") else gguf.GGMLQuantizationType[kind.upper()]
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        publish(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "gguf_type": gguf_type,
        "tensors": dict(Counter(kind.upper() for _, kind in tensors.values())),
        "matrices": written.types,
        "notes": _notes(written, gguf_type),
    }
