"""GGUF export of docs-lm checkpoints: the file read back by the ``gguf`` package's reader (llama.cpp's names,
shapes, types, metadata, tokenizer), loaded by transformers' GGUF loader (its own dequantizers and Q/K un-permutation)
with logits checked against bitsmith's; bitsmith's int4 / int8 group-32 codes written without re-quantizing (bit for
bit); the errors each one line, exit 2, no file."""

import copy

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import bitsmith
from bitsmith.api.export import export_checkpoint
from bitsmith.export.gguf import export_gguf
from bitsmith.formats.gguf_blocks import dequantize
from bitsmith.io.models import load_model
from bitsmith.nn import Int8WeightOnlyLinear, IntxWeightOnlyLinear, QuantizedEmbedding
from conftest import run_cli

transformers = pytest.importorskip("transformers")

TYPES = ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k")
HEADS, KV_HEADS, BLOCKS = 4, 2, 4  # docs-lm
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _rule(targets, dtype, granularity, symmetric, **more):
    return {"targets": targets, "scheme": {"weights": {"dtype": dtype, "granularity": granularity,
                                                       "symmetric": symmetric, **more}}}


CHECKPOINTS = {  # every matrix (embedding and lm_head too) in the scheme named, unless said otherwise
    "int4-g32-sym": [_rule(["Embedding"], "int4", 32, True), _rule(["Linear"], "int4", 32, True)],
    "int4-g32-asym": [_rule(["Embedding"], "int4", 32, False), _rule(["Linear"], "int4", 32, False)],
    "int8-g32-sym": [_rule(["Embedding"], "int8", 32, True), _rule(["Linear"], "int8", 32, True)],
    "int3-g32-asym": [_rule(["Embedding"], "int3", 32, False), _rule(["Linear"], "int3", 32, False)],
    # as the built-in w4a16 recipe: no layer fits a GGUF block, so each is re-quantized
    "w4a16": [_rule(["Embedding"], "int8", "channel", True), _rule(["Linear"], "int4", 128, False, clip="mse")],
}


def _gguf_to_module() -> dict[str, str]:
    names = {f"{gguf_name}.weight": module for gguf_name, module in TOP_TENSORS.items()}
    for n in range(BLOCKS):
        names.update({f"blk.{n}.{g}.weight": f"model.layers.{n}.{m}" for g, m in BLOCK_TENSORS.items()})
    return names


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order: per head, (head_dim / 2, 2) rows back to (2, head_dim / 2)."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _heads(gguf_name: str) -> int | None:
    return {"attn_q": HEADS, "attn_k": KV_HEADS}.get(gguf_name.split(".")[-2])


@pytest.fixture(scope="module")
def checkpoints(docs_lm_model, tmp_path_factory):
    """{name: directory} of docs-lm quantized by each CHECKPOINTS entry and saved with its tokenizer."""
    model, tokenizer = docs_lm_model
    root, out = tmp_path_factory.mktemp("gguf-checkpoints"), {}
    for name, rules in CHECKPOINTS.items():
        quantized = copy.deepcopy(model)
        bitsmith.quantize_(quantized, bitsmith.QuantizeConfig.model_validate({"rules": rules}))
        bitsmith.save(quantized, root / name, tokenizer=tokenizer)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """(checkpoint, gguf type) -> (file, what export returned), each exported once."""
    root, done = tmp_path_factory.mktemp("gguf-files"), {}

    def export(checkpoint: str, gguf_type: str):
        if (checkpoint, gguf_type) not in done:
            path = root / f"{checkpoint}-{gguf_type}.gguf"
            result = export_checkpoint(checkpoints[checkpoint], "gguf", path, gguf_type=gguf_type)
            done[checkpoint, gguf_type] = path, result
        return done[checkpoint, gguf_type]

    return export


@pytest.fixture(scope="module")
def ids(docs_lm_model):
    from bitsmith.zoo.docs_lm import heldout_text

    return docs_lm_model[1](heldout_text()[:2000], return_tensors="pt")["input_ids"][:, :128]  # (1, 128)


def _reference(docs_lm_model, checkpoint) -> torch.nn.Module:
    """The float docs-lm with each of the checkpoint's layers' dequantized weights: bitsmith's math in fp32 (its
    runtime kernels may run in bf16 on some CPUs)."""
    loaded = bitsmith.load(checkpoint)
    reference = copy.deepcopy(docs_lm_model[0])
    modules = dict(reference.named_modules())
    for name, module in loaded.named_modules():
        if isinstance(module, (IntxWeightOnlyLinear, Int8WeightOnlyLinear, QuantizedEmbedding)):
            modules[name].weight.data.copy_(module.dequantize())
    return reference.eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _transformers(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def _read(path) -> tuple[dict, dict]:
    """({key: value} of the metadata, {tensor name: ReaderTensor})."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


# ------------------------------------------------------------------------------------------- the file read back


def test_file_has_llama_cpp_names_shapes_types_and_metadata(exported, docs_lm_model):
    path, result = exported("w4a16", "q4_k")
    fields, tensors = _read(path)
    model, tokenizer = docs_lm_model
    config = model.config
    assert fields["general.architecture"] == "llama"
    expected = {
        "llama.context_length": 512, "llama.embedding_length": 256, "llama.block_count": 4,
        "llama.feed_forward_length": 768, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 64, "llama.vocab_size": 4096,
        "general.file_type": gguf.LlamaFileType.MOSTLY_Q4_K_S,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.add_bos_token": False,
    }
    assert {key: fields[key] for key in expected} == expected
    assert fields["llama.rope.freq_base"] == config.rope_parameters["rope_theta"]
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert "tokenizer.chat_template" not in fields  # docs-lm's tokenizer has none
    assert fields["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(4096)))
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # <s>, </s>, <pad> are control tokens
    assert len(fields["tokenizer.ggml.merges"]) == 4096 - 3 - 256  # every non-byte, non-special token is a merge

    names = _gguf_to_module()
    assert set(tensors) == set(names)
    state = model.state_dict()
    for name, tensor in tensors.items():
        shape = tuple(state[f"{names[name]}.weight"].shape)
        assert tuple(int(n) for n in reversed(tensor.shape)) == shape, name  # GGUF lists dimensions innermost first
        assert tensor.tensor_type.name == ("F32" if len(shape) == 1 else "Q4_K"), name
    assert result["tensors"] == {"Q4_K": 30, "F32": 9}


@pytest.mark.parametrize("gguf_type", TYPES)
def test_transformers_loads_each_type_and_agrees_with_bitsmith(exported, checkpoints, docs_lm_model, ids, gguf_type):
    """transformers' weights (its own dequantizer, its own Q/K un-permutation) are bitsmith's dequantization of the
    file's blocks exactly; its logits agree with bitsmith's fp32 ones within the stated mean |difference| (docs-lm
    logits have std 1.9; float docs-lm against this w4a16 checkpoint differs by 0.076 on these tokens)."""
    path, _ = exported("w4a16", gguf_type)
    _, tensors = _read(path)
    loaded = _transformers(path)
    state, names = loaded.state_dict(), _gguf_to_module()
    for name, tensor in tensors.items():
        ours = dequantize(np.asarray(tensor.data), gguf_type) if len(tensor.shape) == 2 else np.asarray(tensor.data)
        ours = _unpermute(ours, _heads(name)) if _heads(name) else ours
        assert np.array_equal(state[f"{names[name]}.weight"].numpy(), ours), name

    difference = (_logits(loaded, ids) - _logits(_reference(docs_lm_model, checkpoints["w4a16"]), ids)).abs().mean()
    tolerance = {"q8_0": 0.01, "q6_k": 0.03}.get(gguf_type, 0.12)  # measured q8_0 0.0050, q6_k 0.0145,
    assert difference < tolerance  # q4_k 0.047, q4_0 0.063, q4_1 0.071

    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    from bitsmith.zoo.docs_lm import heldout_text

    text = heldout_text()[:3000]
    assert tokenizer(text)["input_ids"] == docs_lm_model[1](text)["input_ids"]


def test_requantized_layers_are_the_reference_quantizer_and_listed(exported, checkpoints):
    """A layer whose codes are no GGUF block is dequantized and quantized again as llama.cpp's reference quantizer
    does (byte for byte), and every such layer is named in the notes."""
    path, result = exported("w4a16", "q4_0")
    _, tensors = _read(path)
    loaded = bitsmith.load(checkpoints["w4a16"])
    modules, names = dict(loaded.named_modules()), _gguf_to_module()
    for name in ("blk.1.attn_k.weight", "blk.2.ffn_down.weight", "token_embd.weight"):
        weight = modules[names[name]].dequantize().numpy()
        if _heads(name):  # llama.cpp's order, as the converter writes it
            weight = weight.reshape(KV_HEADS, 2, -1, weight.shape[1]).swapaxes(1, 2).reshape(weight.shape)
        assert np.array_equal(np.asarray(tensors[name].data), gguf_quantize(weight, gguf.GGMLQuantizationType.Q4_0))
    listed = {n for note in result["notes"] if note.startswith("re-quantized") for n in note.split(": ")[1].split(", ")}
    assert listed == set(names.values()) - {f"model.layers.{n}.{m}" for n in range(BLOCKS)
                                            for m in ("input_layernorm", "post_attention_layernorm")} - {"model.norm"}
    assert "re-quantized to Q4_0 from int8 per-row (1): model.embed_tokens" in result["notes"]


def test_tied_narrow_model_falls_back_per_tensor_and_keeps_its_chat_template(docs_lm_model, tmp_path):
    """A float Llama 96 wide with tied embeddings and a chat template: rows of 96 fit no 256-weight Q4_K block and go
    to Q4_1 (said in the notes), ffn_down's rows of 256 stay Q4_K; output.weight is left out, as llama.cpp's
    converter does, and transformers ties lm_head back; the chat template comes back with the tokenizer."""
    config = transformers.LlamaConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    tokenizer = copy.deepcopy(docs_lm_model[1])
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    result = export_gguf(model, tokenizer, tmp_path / "tiny.gguf", gguf_type="q4_k")
    fields, tensors = _read(tmp_path / "tiny.gguf")
    types = {name: tensor.tensor_type.name for name, tensor in tensors.items() if len(tensor.shape) == 2}
    assert "output.weight" not in types and types.pop("blk.0.ffn_down.weight") == "Q4_K"
    assert set(types.values()) == {"Q4_1"} and len(types) == 7  # token_embd, q, k, v, attn_output, gate, up
    assert any("blocks of 256 weights do not divide" in note for note in result["notes"])
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template

    loaded = _transformers(tmp_path / "tiny.gguf")
    assert loaded.config.tie_word_embeddings and torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    back = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    messages = [{"role": "user", "content": "print(len(x))"}]
    assert back.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)


# ------------------------------------------------------------------------------------------- bitsmith's own codes


@pytest.mark.parametrize("checkpoint, block", [("int4-g32-sym", "Q4_0"), ("int8-g32-sym", "Q8_0"),
                                               ("int3-g32-asym", "Q4_0")])
def test_group_32_codes_are_written_exactly(exported, checkpoints, docs_lm_model, ids, checkpoint, block):
    """Symmetric int4 / int8 in groups of 32 become Q4_0 / Q8_0 whatever --gguf-type asks for the other layers, and
    so does int3 of any zero point (q - zero within Q4_0's [-8, 7]): the reference dequantizer gives bitsmith's
    dequantized weights bit for bit, and transformers the same logits."""
    path, result = exported(checkpoint, "q6_k")
    _, tensors = _read(path)
    modules, names = dict(bitsmith.load(checkpoints[checkpoint]).named_modules()), _gguf_to_module()
    for name, tensor in tensors.items():
        if len(tensor.shape) == 2:
            assert tensor.tensor_type.name == block, name
            theirs = gguf_dequantize(np.asarray(tensor.data), tensor.tensor_type)
            theirs = _unpermute(theirs, _heads(name)) if _heads(name) else theirs
            assert np.array_equal(theirs, modules[names[name]].dequantize().numpy()), name
    assert result["notes"] == [f"30 layers written from bitsmith's codes without re-quantizing (30 {block})"]
    difference = (_logits(_transformers(path), ids) - _logits(_reference(docs_lm_model, checkpoints[checkpoint]), ids))
    assert difference.abs().max() <= 1e-5  # measured 0.0: the same weights through the same float32 model


def test_asymmetric_int4_keeps_codes_and_scales_in_q4_1(exported, checkpoints):
    """Q4_1 holds d * q + m: bitsmith's codes and fp16 scales go in unchanged, but m = -scale * zero must round to
    fp16 (an 11-bit significand times a zero point of up to 4 bits), so those weights move by up to half an fp16
    step of m; the notes say how many groups and by how much."""
    path, result = exported("int4-g32-asym", "q8_0")
    _, tensors = _read(path)
    modules, names = dict(bitsmith.load(checkpoints["int4-g32-asym"]).named_modules()), _gguf_to_module()
    largest = 0.0
    for name in ("blk.0.attn_q.weight", "blk.3.ffn_up.weight", "output.weight"):
        module, data = modules[names[name]], np.asarray(tensors[name].data)
        rows = data.shape[0]
        blocks = data.reshape(-1, 20)  # (blocks, d | m | 16 bytes of nibbles)
        codes = np.concatenate([blocks[:, 4:] & 15, blocks[:, 4:] >> 4], axis=1).reshape(rows, -1)
        scale = blocks[:, :2].copy().view(np.float16).reshape(rows, -1)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(rows, -1)
        exact_m = -module.weight_scale.float().numpy() * module.weight_zero_point.numpy()
        if _heads(name):
            codes, scale, m = (_unpermute(a, _heads(name)) for a in (codes, scale, m))
        assert np.array_equal(codes, module.codes().numpy()), name
        assert np.array_equal(scale, module.weight_scale.numpy()), name
        assert np.all(np.abs(m - exact_m) <= np.spacing(np.abs(exact_m).astype(np.float16)).astype(np.float32) / 2)
        weights = gguf_dequantize(data, gguf.GGMLQuantizationType.Q4_1)
        weights = _unpermute(weights, _heads(name)) if _heads(name) else weights
        largest = max(largest, float(np.abs(weights - module.dequantize().numpy()).max()))
    assert 0 < largest < 2.5e-4  # measured 1.22e-4 (layer's weights up to ~0.4)
    note = next(n for n in result["notes"] if n.startswith("Q4_1 stores m"))
    assert "rounded in " in note and "of 163840 groups" in note  # 92973 of 163840 measured


# ------------------------------------------------------------------------------------------- the CLI and errors


def test_cli_writes_the_file_and_prints_what_it_did(checkpoints, tmp_path, capsys):
    out = tmp_path / "docs-lm.gguf"
    code, stdout, err = run_cli(capsys, "export", checkpoints["int4-g32-sym"], "--format", "gguf",
                                "--gguf-type", "q4_k", "--out", out)
    assert code == 0, err
    assert f"wrote {out}" in stdout and "a GGUF file for llama.cpp: 30 Q4_0, 9 F32" in stdout
    assert "note: 30 layers written from bitsmith's codes without re-quantizing (30 Q4_0)" in stdout
    assert len(gguf.GGUFReader(out).tensors) == 39


@pytest.fixture(scope="module")
def unwritable(docs_lm_model, tmp_path_factory):
    """{case: (checkpoint, gguf type)} that export must refuse."""
    root = tmp_path_factory.mktemp("gguf-refused")
    bitsmith.save(load_model("digits-cnn").model, root / "digits")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=300)
    bitsmith.save(transformers.LlamaForCausalLM(config).eval(), root / "no-tokenizer")
    dynamic = copy.deepcopy(docs_lm_model[0])
    scheme = {"weights": {"dtype": "int8", "granularity": "channel", "symmetric": True},
              "activations": {"dtype": "int8", "dynamic": True}}
    config = bitsmith.QuantizeConfig.model_validate({"rules": [{"targets": ["Linear"], "scheme": scheme}]})
    bitsmith.quantize_(dynamic, config)
    bitsmith.save(dynamic, root / "w8a8-dynamic", tokenizer=docs_lm_model[1])
    return root


@pytest.mark.parametrize("case, gguf_type, message", [
    ("digits", "q8_0", "GGUF export writes Llama-family causal LMs (LlamaForCausalLM); this checkpoint is DigitsCNN,"
                       " not a transformers model"),
    ("no-tokenizer", "q8_0", "the checkpoint has no tokenizer files"),
    ("w8a8-dynamic", "q8_0", "layer 'model.layers.0.self_attn.q_proj' is Int8DynamicLinear (w8a8-dynamic): GGUF cannot"
                             " hold it because its activations are quantized at run time"),
    ("no-tokenizer", "q5_0", "unknown GGUF type 'q5_0'; available: q8_0, q4_0, q4_1, q4_k, q6_k"),
])
def test_refusals_are_one_line_exit_2_and_leave_no_file(unwritable, tmp_path, capsys, case, gguf_type, message):
    out = tmp_path / "model.gguf"
    code, _, err = run_cli(capsys, "export", unwritable / case, "--format", "gguf", "--gguf-type", gguf_type,
                           "--out", out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert list(tmp_path.iterdir()) == []  # neither the file nor a staging file


def test_a_non_llama_transformers_model_is_named(tmp_path):
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=300, bos_token_id=0, eos_token_id=0)
    bitsmith.save(transformers.GPT2LMHeadModel(config).eval(), tmp_path / "gpt2")
    with pytest.raises(bitsmith.BitsmithError, match=r"this checkpoint is a 'gpt2' model \(GPT2LMHeadModel\)$"):
        export_checkpoint(tmp_path / "gpt2", "gguf", tmp_path / "gpt2.gguf")
    assert not (tmp_path / "gpt2.gguf").exists()
