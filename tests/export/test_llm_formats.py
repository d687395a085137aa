"""compressed-tensors and GPTQ checkpoints of a tiny random Llama: layouts checked against an independent numpy
reading of the documented formats, logits checked through transformers (when compressed-tensors is installed) and
through ``load_compressed_tensors``."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import bitsmith
from bitsmith.errors import BitsmithError
from bitsmith.export.llm_formats import export_compressed_tensors, export_gptq
from bitsmith.io.compressed_tensors import is_compressed_tensors_dir, load_compressed_tensors
from bitsmith.nn import Int8WeightOnlyLinear, IntxWeightOnlyLinear, QuantizedEmbedding

transformers = pytest.importorskip("transformers")

VOCAB = 1000
INT8_EMBEDDING = {"targets": ["Embedding"], "scheme": {"weights": {"dtype": "int8", "granularity": "channel"}}}


def _linear_rule(dtype: str, granularity, symmetric: bool, targets=("Linear",)) -> dict:
    weights = {"dtype": dtype, "granularity": granularity, "symmetric": symmetric}
    return {"targets": list(targets), "scheme": {"weights": weights}}


CONFIGS = {  # each like w4a16 (lm_head left in float)
    "int4-g128-asym": [INT8_EMBEDDING, _linear_rule("int4", 128, False)],
    "int4-g128-sym": [_linear_rule("int4", 128, True)],
    # two schemes each: the MLPs' first, every other Linear's second
    # (int8 symmetric per-channel runs on Int8WeightOnlyLinear, the rest on IntxWeightOnlyLinear)
    "mixed-sym": [_linear_rule("int4", 128, True, ["re:.*mlp.*"]), _linear_rule("int8", "channel", True)],
    "mixed-asym": [_linear_rule("int8", 64, False, ["re:.*mlp.*"]), _linear_rule("int4", "channel", False)],
    "int3-g128-asym": [_linear_rule("int3", 128, False)],  # compressed-tensors only: codes straddle words
}


@pytest.fixture(scope="module")
def float_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.05, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))  # (batch, tokens)


_QUANTIZED: dict[str, nn.Module] = {}  # quantized once per config; tests get copies


def _quantized(float_llama, config_name: str) -> nn.Module:
    if config_name not in _QUANTIZED:
        model = copy.deepcopy(float_llama)
        config = {"rules": CONFIGS[config_name], "ignore": ["lm_head"]}
        bitsmith.quantize_(model, bitsmith.QuantizeConfig.model_validate(config))
        _QUANTIZED[config_name] = model.eval()
    return copy.deepcopy(_QUANTIZED[config_name])


def _fake_quant_reference(float_llama, quantized: nn.Module) -> nn.Module:
    """The float model with each bitsmith layer's dequantized weight: bitsmith's math, in fp32."""
    reference = copy.deepcopy(float_llama)
    modules = dict(reference.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, (IntxWeightOnlyLinear, Int8WeightOnlyLinear, QuantizedEmbedding)):
            modules[name].weight.data.copy_(module.dequantize())
    return reference


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---------------------------------------------------------- independent numpy reading of the documented layouts


def _fields(words: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    """Unsigned ``bits``-wide fields of int32 ``words``: element j of each run of 32 // bits along ``axis`` at
    bits [j * bits, (j + 1) * bits), least significant first; ``count`` elements kept along ``axis``."""
    per_word = 32 // bits
    unsigned = np.moveaxis(words.astype(np.int64) & 0xFFFFFFFF, axis, -1)  # (..., words)
    out = np.zeros(unsigned.shape[:-1] + (unsigned.shape[-1] * per_word,), dtype=np.int64)
    for j in range(per_word):
        out[..., j::per_word] = (unsigned >> (j * bits)) & (2**bits - 1)
    return np.moveaxis(out[..., :count], -1, axis)


def _dense_fields(words: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    """compressed-tensors' dense packing read bit by bit: the int32 words along ``axis`` as one little-endian
    bit stream, element i at bits [i * bits, (i + 1) * bits), least significant first."""
    moved = np.ascontiguousarray(np.moveaxis(words.astype("<i4"), axis, -1))  # (..., words)
    stream = np.unpackbits(moved.view(np.uint8), axis=-1, bitorder="little")  # (..., words * 32)
    fields = stream[..., : count * bits].reshape(*stream.shape[:-1], count, bits).astype(np.int64)
    return np.moveaxis((fields << np.arange(bits)).sum(axis=-1), -1, axis)


def _ct_dequantize(tensors: dict, name: str, weights: dict) -> np.ndarray:
    """compressed-tensors pack-quantized, read as documented: signed values stored + 2**(b-1)."""
    bits, offset = weights["num_bits"], 2 ** (weights["num_bits"] - 1)
    out_features, in_features = tensors[f"{name}.weight_shape"].tolist()
    q = _dense_fields(tensors[f"{name}.weight_packed"].numpy(), bits, in_features, axis=1) - offset  # (N, K) signed
    scale = tensors[f"{name}.weight_scale"].float().numpy()  # (N, G)
    if weights["symmetric"]:
        zero = np.zeros_like(scale)
    else:
        words = -(-out_features * bits // 32)  # the packed words, at the start of the padded (N, G) tensor
        zero = _dense_fields(tensors[f"{name}.weight_zero_point"].numpy()[:words], bits, out_features, axis=0) - offset
    group = in_features // scale.shape[1]
    # integer difference exact, then one float32 rounding, as bitsmith's dequantize
    return (q - np.repeat(zero, group, axis=1)).astype(np.float32) * np.repeat(scale, group, axis=1)


def _gptq_dequantize(tensors: dict, name: str, bits: int, checkpoint_format: str) -> np.ndarray:
    """GPTQ: qweight (K * b / 32, N), qzeros (G, N * b / 32) holding z - 1 in v1, scales (G, N), g_idx (K,)."""
    scales = tensors[f"{name}.scales"].float().numpy()  # (G, N)
    g_idx = tensors[f"{name}.g_idx"].numpy().astype(np.int64)  # (K,)
    q = _fields(tensors[f"{name}.qweight"].numpy(), bits, g_idx.size, axis=0)  # (K, N)
    zero = _fields(tensors[f"{name}.qzeros"].numpy(), bits, scales.shape[1], axis=1)  # (G, N)
    zero = zero + 1 if checkpoint_format == "gptq" else zero
    return ((q - zero[g_idx]).astype(np.float32) * scales[g_idx]).T  # (N, K)


def _bitsmith_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (IntxWeightOnlyLinear, Int8WeightOnlyLinear))}


# ------------------------------------------------------------------------------------------- compressed-tensors


EXPECTED_GROUP = {
    "targets": ["Linear"],
    "weights": {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128,
        "dynamic": False, "actorder": None, "observer": "minmax",
    },
    "input_activations": None,
    "output_activations": None,
    "format": "pack-quantized",
}


def _export_ct(float_llama, tokenizer, tmp_path, config_name: str) -> tuple[nn.Module, Path, dict]:
    """(bitsmith model, exported directory, each quantized layer's weight args from the config groups)."""
    model = _quantized(float_llama, config_name)
    out = tmp_path / "ct"
    export_compressed_tensors(model, tokenizer, out)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    # our groups target either every "Linear" or their layers by exact name
    weights = {
        name: next(g["weights"] for g in groups if g["targets"] == ["Linear"] or name in g["targets"])
        for name in _bitsmith_layers(model)
    }
    return model, out, weights


@pytest.mark.parametrize("config_name", ["int4-g128-asym", "int4-g128-sym"])
def test_compressed_tensors_config(float_llama, tokenizer, tmp_path, config_name):
    _, out, _ = _export_ct(float_llama, tokenizer, tmp_path, config_name)
    group = copy.deepcopy(EXPECTED_GROUP)
    group["weights"]["symmetric"] = config_name == "int4-g128-sym"
    assert json.loads((out / "config.json").read_text())["quantization_config"] == {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
    }
    assert is_compressed_tensors_dir(out)
    assert {"tokenizer.json", "generation_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".ct.*"))  # the staging directory was renamed into place


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_compressed_tensors_layout(float_llama, tokenizer, tmp_path, config_name):
    model, out, weights = _export_ct(float_llama, tokenizer, tmp_path, config_name)
    tensors = load_file(out / "model.safetensors")
    assert len(weights) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    for name, layer in _bitsmith_layers(model).items():
        args, n, k = weights[name], layer.out_features, layer.in_features
        bits = args["num_bits"]
        groups = 1 if args["strategy"] == "channel" else k // args["group_size"]
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        assert tensors[f"{name}.weight_packed"].shape == (n, -(-k * bits // 32))
        assert tensors[f"{name}.weight_scale"].shape == (n, groups)
        assert tensors[f"{name}.weight_scale"].dtype == torch.float32  # the model's dtype
        assert torch.equal(tensors[f"{name}.weight_shape"], torch.tensor([n, k]))
        if args["symmetric"]:
            assert f"{name}.weight_zero_point" not in tensors
        else:
            zero = tensors[f"{name}.weight_zero_point"]
            assert zero.shape == (n, groups) and zero.dtype == torch.int32  # the shape transformers registers
            assert not zero[-(-n * bits // 32):].any()  # the packed words first, zeros after them
        # scales written in fp32 are bitsmith's exactly: the documented reading gives bitsmith's weight exactly
        np.testing.assert_array_equal(_ct_dequantize(tensors, name, args), layer.dequantize().numpy())
    assert torch.equal(tensors["lm_head.weight"], float_llama.lm_head.weight)
    embedding = model.model.embed_tokens
    expected_embedding = embedding.dequantize() if isinstance(embedding, QuantizedEmbedding) else embedding.weight
    assert torch.equal(tensors["model.embed_tokens.weight"], expected_embedding)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_compressed_tensors_compressor_writes_the_same(float_llama, tokenizer, tmp_path, config_name):
    """compressed-tensors' own compressor, given bitsmith's dequantized weight, scale and signed zero point,
    packs the same words."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model, out, weights = _export_ct(float_llama, tokenizer, tmp_path, config_name)
    tensors = load_file(out / "model.safetensors")
    for name, layer in _bitsmith_layers(model).items():
        args = QuantizationArgs(**weights[name])
        state = {"weight": layer.dequantize(), "weight_scale": tensors[f"{name}.weight_scale"]}
        if not args.symmetric:  # compressed-tensors' zero points are signed: bitsmith's minus 2**(bits - 1)
            zero = layer.weight_zero_point.to(torch.int16) - 2 ** (args.num_bits - 1)
            state["weight_zero_point"] = zero.to(torch.int8).reshape(state["weight_scale"].shape)
        theirs = PackedQuantizationCompressor.compress(state, QuantizationScheme(targets=["Linear"], weights=args))
        assert set(theirs) == {k.removeprefix(f"{name}.") for k in tensors if k.startswith(f"{name}.")}
        for key, value in theirs.items():
            ours = tensors[f"{name}.{key}"]
            if key == "weight_zero_point":  # theirs tightly packed, ours the same words padded to (N, G)
                ours = ours[: value.shape[0]]
            assert torch.equal(value, ours), key


TRANSFORMERS_CASES = [  # (config, dequantize at load)
    ("int4-g128-sym", False),
    ("mixed-sym", False),
    # asymmetric ones too, in plain from_pretrained: compressed-tensors 0.20 builds the transformers skeleton with
    # (N, G) zero points, which bitsmith's padded zero points match (a tightly packed tensor is refused)
    ("int4-g128-asym", False),
    ("mixed-asym", False),
    ("int3-g128-asym", False),
    ("int4-g128-asym", True),
]


@pytest.mark.parametrize("config_name, dequantize", TRANSFORMERS_CASES)
def test_transformers_loads_compressed_tensors_export(float_llama, tokenizer, ids, tmp_path, config_name, dequantize):
    pytest.importorskip("compressed_tensors")
    model, out, _ = _export_ct(float_llama, tokenizer, tmp_path, config_name)
    options = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the passed config's loading options override the file's, as meant
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out, **options).eval()
    reference = _logits(_fake_quant_reference(float_llama, model), ids)
    scale = reference.abs().max().item()  # 3.36, 3.45, 3.36
    # transformers + compressed-tensors vs bitsmith's dequantized weights, both in fp32
    assert (_logits(loaded, ids) - reference).abs().max().item() <= 1e-6 * scale  # measured 0.0 in all three
    # vs bitsmith's runtime modules, which compute in bf16 (as far from the fp32 reference as from this)
    runtime_gap = (_logits(loaded, ids) - _logits(model, ids)).abs().max().item()
    assert runtime_gap <= 3e-2 * scale  # measured 1.06e-2, 1.13e-2, 1.01e-2 (x scale)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_load_compressed_tensors_reproduces_bitsmith(float_llama, tokenizer, ids, tmp_path, config_name):
    model, out, _ = _export_ct(float_llama, tokenizer, tmp_path, config_name)
    if config_name.startswith("mixed"):
        groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
        assert len(groups) == 2 and all(g["targets"] != ["Linear"] for g in groups.values())
    loaded = load_compressed_tensors(out)
    for name, layer in _bitsmith_layers(model).items():
        twin = loaded.get_submodule(name)
        assert type(twin) is type(layer)
        assert torch.equal(twin.dequantize(), layer.dequantize())
    # same codes, same kernels; the float embedding equals bitsmith's per-row dequantization
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))

    bitsmith.save(loaded, tmp_path / "bitsmith-dir")  # so that bitsmith inspect / eval can take it
    assert torch.equal(_logits(bitsmith.load(tmp_path / "bitsmith-dir"), ids), _logits(model, ids))


def _write_with_compressed_tensors(float_llama, out: Path, weights: dict) -> None:
    """A pack-quantized checkpoint made the way llm-compressor saves one, from compressed-tensors' own pieces
    only: its min-max qparams (signed zero points), its compressor, its config serialization; bf16 scales, as
    for a bf16 model."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights), format="pack-quantized")
    tensors = {}
    for key, tensor in float_llama.state_dict().items():
        name = key.removesuffix(".weight")
        module = float_llama.get_submodule(name) if key.endswith(".weight") else None
        if type(module) is not nn.Linear or name == "lm_head":
            tensors[key] = tensor.clone()
            continue
        grouped = tensor.unflatten(1, (-1, weights["group_size"]))  # (N, G, group)
        scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), scheme.weights)
        state = {"weight": tensor, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zero}
        for suffix, value in PackedQuantizationCompressor.compress(state, scheme).items():
            tensors[f"{name}.{suffix}"] = value.contiguous()
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", quantization_status="compressed", ignore=["lm_head"]
    )
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    float_llama.config.save_pretrained(out)
    written = json.loads((out / "config.json").read_text())
    written["quantization_config"] = config.to_dict()
    (out / "config.json").write_text(json.dumps(written))


@pytest.mark.parametrize("symmetric", [False, True])
def test_load_checkpoint_written_by_compressed_tensors(float_llama, ids, tmp_path, symmetric):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": 128}
    _write_with_compressed_tensors(float_llama, tmp_path / "ct", weights)
    loaded = load_compressed_tensors(tmp_path / "ct")
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    for name, layer in _bitsmith_layers(loaded).items():
        # compressed-tensors' own reading of its file: signed codes and zero points, fp32 arithmetic
        shape = tensors[f"{name}.weight_shape"].tolist()
        scale = tensors[f"{name}.weight_scale"].float()  # (N, G)
        q = unpack_from_int32(tensors[f"{name}.weight_packed"], 4, shape).float()  # (N, K)
        zero = torch.zeros_like(scale)
        if not symmetric:
            zero = unpack_from_int32(tensors[f"{name}.weight_zero_point"], 4, scale.shape, packed_dim=0).float()
        theirs = (q.unflatten(1, (scale.shape[1], -1)) - zero[..., None]) * scale[..., None]
        assert torch.equal(layer.dequantize(), theirs.flatten(1))  # bf16 scales are exact in bitsmith's fp16
    options = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, **options)
    expected = _logits(reference.eval(), ids)  # compressed-tensors dequantizes in the bf16 of the scales
    scale = expected.abs().max().item()
    assert (_logits(loaded, ids) - expected).abs().max().item() <= 3e-2 * scale  # measured 8.9e-3, 9.6e-3 (x scale)


@pytest.mark.parametrize("quantize_embedding", [True, False])
def test_tied_embeddings(tokenizer, ids, tmp_path, quantize_embedding):
    """bitsmith quantizes a tied embedding on its own, leaving lm_head float: the export unties them. If neither
    is quantized they stay tied and lm_head's copy is not written."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=VOCAB, initializer_range=0.05, tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    rules = [INT8_EMBEDDING] if quantize_embedding else []
    quantize = {"rules": [*rules, _linear_rule("int4", 128, True)], "ignore": ["lm_head"]}
    bitsmith.quantize_(model, bitsmith.QuantizeConfig.model_validate(quantize))
    export_compressed_tensors(model, tokenizer, tmp_path / "ct")
    written = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert written["tie_word_embeddings"] is not quantize_embedding
    assert ("lm_head.weight" in load_file(tmp_path / "ct" / "model.safetensors")) is quantize_embedding
    assert torch.equal(_logits(load_compressed_tensors(tmp_path / "ct"), ids), _logits(model, ids))


# ------------------------------------------------------------------------------------------------------------ GPTQ


@pytest.mark.parametrize("config_name", ["int4-g128-asym", "int4-g128-sym"])
def test_gptq_layout(float_llama, tokenizer, tmp_path, config_name):
    model = _quantized(float_llama, config_name)
    export_gptq(model, tokenizer, tmp_path / "gptq")
    symmetric = config_name == "int4-g128-sym"
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": symmetric,
        "true_sequential": False, "damp_percent": 0.01, "static_groups": False, "checkpoint_format": "gptq",
    }
    assert config["dtype"] == "float16"
    tensors = load_file(tmp_path / "gptq" / "model.safetensors")
    for name, layer in _bitsmith_layers(model).items():
        n, k = layer.out_features, layer.in_features
        shapes = {t: tuple(tensors[f"{name}.{t}"].shape) for t in ("qweight", "qzeros", "scales", "g_idx")}
        assert shapes == {"qweight": (k // 8, n), "qzeros": (k // 128, n // 8), "scales": (k // 128, n), "g_idx": (k,)}
        assert tensors[f"{name}.scales"].dtype == torch.float16
        assert torch.equal(tensors[f"{name}.g_idx"], torch.arange(k, dtype=torch.int32) // 128)
        if symmetric:
            assert (tensors[f"{name}.qzeros"] == 0x77777777).all()  # zero 8, stored as 7 in every nibble
        # bitsmith's scales are fp16 already: the dequantized weights are equal exactly
        np.testing.assert_array_equal(_gptq_dequantize(tensors, name, 4, "gptq"), layer.dequantize().numpy())


def test_gptq_int8_per_channel(float_llama, tokenizer, tmp_path):
    model = copy.deepcopy(float_llama)
    bitsmith.quantize_(model, bitsmith.load_recipe("w8a16"))  # also quantizes lm_head: GPTQ keeps it float
    with pytest.raises(BitsmithError, match="lm_head"):
        export_gptq(model, tokenizer, tmp_path / "refused")
    model = _quantized(float_llama, "mixed-sym")
    with pytest.raises(BitsmithError, match="one scheme"):
        export_gptq(model, tokenizer, tmp_path / "refused")

    model = copy.deepcopy(float_llama)
    config = {"rules": [_linear_rule("int8", "channel", True)], "ignore": ["lm_head"]}
    bitsmith.quantize_(model, bitsmith.QuantizeConfig.model_validate(config))
    export_gptq(model, tokenizer, tmp_path / "gptq")
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["group_size"] == -1
    tensors = load_file(tmp_path / "gptq" / "model.safetensors")
    for name, layer in _bitsmith_layers(model).items():
        assert isinstance(layer, Int8WeightOnlyLinear)
        assert (tensors[f"{name}.qzeros"] == 0x7F7F7F7F).all()  # zero 128, stored as 127 in every byte
        # up to the fp16 rounding of bitsmith's fp32 per-channel scales
        expected = layer.weight_codes.float() * layer.weight_scale.half().float()
        np.testing.assert_array_equal(_gptq_dequantize(tensors, name, 8, "gptq"), expected.numpy())


def test_gptq_zero_point_zero(float_llama, tokenizer, tmp_path):
    model = _quantized(float_llama, "int4-g128-asym")
    layer = model.model.layers[0].mlp.down_proj
    layer.weight_zero_point[3, 1] = 0  # a group whose weights are all >= 0
    with pytest.raises(BitsmithError, match="gptq_v2"):
        export_gptq(model, tokenizer, tmp_path / "v1")
    assert not (tmp_path / "v1").exists() and not list(tmp_path.iterdir())  # nothing half-written
    export_gptq(model, tokenizer, tmp_path / "v2", checkpoint_format="gptq_v2")
    tensors = load_file(tmp_path / "v2" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    np.testing.assert_array_equal(_gptq_dequantize(tensors, name, 4, "gptq_v2"), layer.dequantize().numpy())


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("export", [export_compressed_tensors, export_gptq])
def test_unsupported_schemes(float_llama, tokenizer, tmp_path, export):
    dynamic = copy.deepcopy(float_llama)
    bitsmith.quantize_(dynamic, bitsmith.load_recipe("w8a8-dynamic"))
    with pytest.raises(BitsmithError, match="weight-only") as err:
        export(dynamic, tokenizer, tmp_path / "out")
    assert "\n" not in str(err.value)

    if export is export_gptq:  # compressed-tensors packs 2-8 bits densely; GPTQ v1/v2 here only 4 and 8
        two_bit = copy.deepcopy(float_llama)
        config = {"rules": [_linear_rule("int2", 128, False)], "ignore": ["lm_head"]}
        bitsmith.quantize_(two_bit, bitsmith.QuantizeConfig.model_validate(config))
        with pytest.raises(BitsmithError, match="2-bit"):
            export(two_bit, tokenizer, tmp_path / "out")

    with pytest.raises(BitsmithError, match="quantize it first"):
        export(copy.deepcopy(float_llama), tokenizer, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_load_refuses_other_checkpoints(float_llama, tokenizer, tmp_path):
    model = _quantized(float_llama, "int4-g128-sym")
    bitsmith.save(model, tmp_path / "bitsmith-dir")
    assert not is_compressed_tensors_dir(tmp_path / "bitsmith-dir")
    with pytest.raises(BitsmithError, match="not a compressed-tensors checkpoint"):
        load_compressed_tensors(tmp_path / "bitsmith-dir")
    export_gptq(model, tokenizer, tmp_path / "gptq")
    with pytest.raises(BitsmithError, match="not a compressed-tensors checkpoint"):
        load_compressed_tensors(tmp_path / "gptq")
    with pytest.raises(BitsmithError, match="no config.json"):
        load_compressed_tensors(tmp_path / "missing")

    export_compressed_tensors(model, tokenizer, tmp_path / "ct")
    config_path = Path(tmp_path / "ct" / "config.json")
    config = json.loads(config_path.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(BitsmithError, match="weight-only"):
        load_compressed_tensors(tmp_path / "ct")
    with pytest.raises(BitsmithError, match="not an empty directory"):
        export_compressed_tensors(model, tokenizer, tmp_path / "ct")


def test_exports_write_the_options_the_recipe_ran(float_llama, tokenizer, tmp_path):
    """A GPTQ model (act-order with static groups, MSE ranges, 2% damping, true-sequential off): both export
    configs say so, where the round-to-nearest exports above say minmax and no act-order."""
    model = copy.deepcopy(float_llama)
    config = {"rules": [{"targets": ["Linear"], "scheme": {"weights": {
        "dtype": "int4", "granularity": 128, "symmetric": True, "clip": "mse", "algorithm": "gptq"}}}],
        "ignore": ["lm_head"], "gptq": {"damp_percent": 0.02, "true_sequential": False}}
    calibration = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    bitsmith.quantize_(model, bitsmith.QuantizeConfig.model_validate(config), calibration=calibration)
    export_compressed_tensors(model, tokenizer, tmp_path / "ct")
    weights = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert weights["group_0"]["weights"]["observer"] == "mse" and weights["group_0"]["weights"]["actorder"] == "weight"
    export_gptq(model, tokenizer, tmp_path / "gptq")
    gptq = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert gptq["desc_act"] is True and gptq["static_groups"] is True
    assert gptq["damp_percent"] == 0.02 and gptq["true_sequential"] is False
