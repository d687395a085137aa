"""Reading a llama.cpp GGUF file of a Llama into a transformers ``LlamaForCausalLM`` whose matrices are bitsmith
runtime modules holding the file's codes, scales and mins exactly (no float round trip):

    GGUF type | block (32 weights)         | bitsmith module                          | weight
    Q4_0      | d fp16, 32 codes q in 0..15 | IntxWeightOnlyLinear bits 4, group 32   | (q - 8) * d, zero point 8
    Q8_0      | d fp16, 32 int8 codes q     | IntxWeightOnlyLinear bits 8, group 32   | (q + 128 - 128) * d
    Q4_1      | d, m fp16, 32 codes in 0..15| IntxMinWeightOnlyLinear bits 4, group 32| q * d + m
    F32, F16  | -                           | float nn.Linear / norm weights          |

The token embedding (token_embd) becomes a ``QuantizedEmbedding`` with its codes for Q4_0 and Q8_0, a float
``nn.Embedding`` for Q4_1 (dequantized, said in the notes). A file without ``output.weight`` ties the head to
the embedding: lm_head is then built from token_embd's blocks too. The rows of attn_q / attn_k are put back
from llama.cpp's rotary order (adjacent pairs) to transformers' (i with i + head_dim / 2). The tokenizer is
read by transformers' own GGUF reader.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bitsmith.algorithms._modules import replace_module
from bitsmith.errors import BitsmithError
from bitsmith.formats.gguf_blocks import dequantize, rotary_row_order, unpack_blocks
from bitsmith.formats.packing import pack_codes
from bitsmith.io.skeleton import first_line, float_skeleton
from bitsmith.nn import IntxMinWeightOnlyLinear, IntxWeightOnlyLinear, QuantizedEmbedding

__all__ = ["GGUF_IMPORT_TYPES", "read_gguf"]

GGUF_IMPORT_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {  # under blk.N -> under model.layers.N (the inverse of bitsmith's GGUF export)
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _module_name(tensor_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj'."""
    parts = tensor_name.split(".")
    if len(parts) == 2 and parts[0] in _TOP_NAMES and parts[1] == "weight":
        return _TOP_NAMES[parts[0]]
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    raise BitsmithError(f"tensor '{tensor_name}' has no place in a transformers Llama; bitsmith imports llama.cpp's"
                        " plain Llama layout")


def _open(path: Path):
    """The ``gguf`` package's reader over the file; a truncated or corrupt file is one error line."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        for tensor in reader.tensors:  # every tensor's bytes must be inside the file
            if tensor.data.nbytes != tensor.n_bytes:
                raise ValueError(f"tensor '{tensor.name}' ends past the end of the file")
    except (ValueError, IndexError, KeyError, OSError, OverflowError, UnicodeDecodeError) as err:
        raise BitsmithError(f"{path} is not a readable GGUF file (truncated or corrupt: {first_line(err)})") from None
    return reader


def _fields(reader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("tokenizer.ggml.")}  # the vocabulary is the tokenizer's to read


def _check(path: Path, fields: dict, tensors: dict) -> None:
    """Refuse what bitsmith cannot run: another architecture, rope scaling, another block type."""
    architecture = fields.get("general.architecture")
    if architecture != "llama":
        raise BitsmithError(f"{path} holds a '{architecture}' model; bitsmith imports GGUF files of the 'llama'"
                            " architecture only")
    scaling = fields.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise BitsmithError(f"{path} uses '{scaling}' rope scaling, which bitsmith's GGUF import does not read")
    for name, tensor in tensors.items():
        kind = tensor.tensor_type.name
        if kind not in GGUF_IMPORT_TYPES:
            raise BitsmithError(f"tensor '{name}' in {path} is {kind}; bitsmith imports Q8_0, Q4_0 and Q4_1 matrices"
                                " (F16 / F32 as floats): re-quantize the model to one of those")


def _config(fields: dict, tensors: dict):
    """The LlamaConfig the metadata describes; lm_head is untied (a tied file's head is built from token_embd)."""
    from transformers import LlamaConfig

    def get(key, default=None):
        value = fields.get(f"llama.{key}", default)
        if value is None:
            raise BitsmithError(f"the GGUF metadata has no 'llama.{key}'")
        return value

    heads, hidden = get("attention.head_count"), get("embedding_length")
    vocab = fields.get("llama.vocab_size") or int(tensors["token_embd.weight"].shape[-1])
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"), num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads), head_dim=get("attention.key_length", hidden // heads),
        max_position_embeddings=get("context_length"), rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))},
        tie_word_embeddings=False, bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"), pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
    )


# ----------------------------------------------------------------------------------------------- blocks


def _unpack(data: np.ndarray, kind: str) -> dict[str, torch.Tensor]:
    """(N, bytes) blocks as unsigned codes (N, K) uint8 and per-group (N, K / 32) fp16 scale (and min)."""
    codes, scale, minimum = unpack_blocks(data, kind.lower())
    found = {"codes": torch.from_numpy(codes), "scale": torch.from_numpy(scale.copy())}
    if minimum is not None:
        found["min"] = torch.from_numpy(minimum.copy())
    return found


def _linear(data: np.ndarray, kind: str) -> nn.Module:
    """One matrix as a bitsmith module holding its codes, or as a float nn.Linear (F16 / F32)."""
    if kind in ("F32", "F16"):
        out_features, in_features = data.shape
        linear = nn.Linear(in_features, out_features, bias=False)
        linear.weight.data = torch.from_numpy(data.astype(np.float32))
        return linear
    blocks = _unpack(data, kind)
    out_features, in_features = blocks["codes"].shape
    bits = 8 if kind == "Q8_0" else 4
    if kind == "Q4_1":
        module = IntxMinWeightOnlyLinear(in_features, out_features, False, bits, 32)
        module.weight_min.copy_(blocks["min"])
    else:
        module = IntxWeightOnlyLinear(in_features, out_features, False, bits, 32)
        module.weight_zero_point.fill_(2 ** (bits - 1))  # Q4_0: q - 8; Q8_0: (q + 128) - 128
    module.weight_packed.copy_(pack_codes(blocks["codes"].flatten(), bits))
    module.weight_scale.copy_(blocks["scale"])
    return module.eval()


def _embedding(data: np.ndarray, kind: str, padding_idx: int | None) -> tuple[nn.Module, str | None]:
    """token_embd as a QuantizedEmbedding with its codes (Q4_0, Q8_0) or a float table, and a note when
    dequantized."""
    if kind in ("Q8_0", "Q4_0"):
        blocks = _unpack(data, kind)
        rows, dim = blocks["codes"].shape
        bits = 8 if kind == "Q8_0" else 4
        module = QuantizedEmbedding(rows, dim, bits, padding_idx, group_size=32)
        if bits == 8:
            module.weight_codes.copy_(blocks["codes"])
        else:
            module.weight_packed.copy_(pack_codes(blocks["codes"].flatten(), bits))
        module.weight_scale.copy_(blocks["scale"])
        module.weight_zero_point.fill_(2 ** (bits - 1))
        return module, None
    weight = dequantize(data, "q4_1") if kind == "Q4_1" else data.astype(np.float32)
    table = nn.Embedding(*weight.shape, padding_idx=padding_idx)
    table.weight.data = torch.from_numpy(weight)
    note = "token_embd is Q4_1, which bitsmith's embeddings do not hold: dequantized to float32" if kind == "Q4_1" else None
    return table, note


def _rotary_rows(data: np.ndarray, heads: int) -> np.ndarray:
    """Rows back from llama.cpp's rotary order to transformers' (the inverse of what the export applies)."""
    return data[np.argsort(rotary_row_order(data.shape[0], heads))]


# ----------------------------------------------------------------------------------------------- reading


def _load_tensors(model: nn.Module, tensors: dict, config) -> dict[str, str]:
    """Put every GGUF tensor into ``model``; returns notes per module name."""
    notes, heads = {}, {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    if "output.weight" not in tensors:  # tied: the head reads the embedding's blocks
        tensors = {**tensors, "output.weight": tensors["token_embd.weight"]}
        notes["lm_head"] = "tied to token_embd in the file: built from its blocks (held twice)"
    for name, tensor in tensors.items():
        module_name, kind = _module_name(name), tensor.tensor_type.name
        data = np.asarray(tensor.data)
        short = name.split(".")[-2]
        expected = tuple(model.get_submodule(module_name).weight.shape)
        if tuple(int(n) for n in reversed(tensor.shape)) != expected:  # GGUF lists dimensions innermost first
            raise BitsmithError(f"tensor '{name}' is {list(reversed(tensor.shape.tolist()))}, not the"
                                f" {list(expected)} the metadata describes")
        if short in heads:
            data = _rotary_rows(data, heads[short])
        if data.ndim == 1:  # a norm's weight
            module = model.get_submodule(module_name)
            module.weight = nn.Parameter(torch.from_numpy(data.astype(np.float32)), requires_grad=False)
            continue
        if short == "token_embd":
            module, note = _embedding(data, kind, model.get_input_embeddings().padding_idx)
            if note:
                notes[module_name] = note
        else:
            module = _linear(data, kind)
        replace_module(model, module_name, module)
    left = [key for key, value in model.state_dict().items() if value.device.type == "meta"]
    if left:
        raise BitsmithError(f"the GGUF file has no tensor for '{left[0]}'")
    return notes


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as err:
        raise BitsmithError(f"cannot read the tokenizer in {path}: {first_line(err)}") from None


def read_gguf(path: str | Path) -> tuple[nn.Module, object, dict[str, str]]:
    """(LlamaForCausalLM on bitsmith's modules in eval mode, tokenizer, notes per layer) of the GGUF file."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    reader = _open(path)
    fields, tensors = _fields(reader), {t.name: t for t in reader.tensors}
    _check(path, fields, tensors)
    if "token_embd.weight" not in tensors:
        raise BitsmithError(f"{path} has no token_embd.weight")
    config = _config(fields, tensors)
    model = float_skeleton(config, LlamaForCausalLM, on_meta=True)  # every weight comes from the file
    with torch.no_grad():
        notes = _load_tensors(model, tensors, config)
    model.bitsmith_recipe, model.bitsmith_skipped, model.bitsmith_notes = None, {}, notes
    return model.eval(), _tokenizer(path), notes
