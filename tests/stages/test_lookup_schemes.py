"""fp8 e4m3, NF4, MXFP4 and ternary weight-only schemes: quantize_, their stored codes, save/load and inspect."""

import copy

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith import BitsmithError, QuantizeConfig
from bitsmith.formats.floats import dequantize_mxfp4, dequantize_nf4, quantize_fp8, quantize_mxfp4, quantize_nf4
from bitsmith.formats.ternary import dequantize_ternary, quantize_ternary
from bitsmith.nn import Fp8WeightOnlyLinear, IntxWeightOnlyLinear, LookupWeightOnlyLinear, module_from_info
from bitsmith.nn.kinds import InfoError
from bitsmith.zoo.minilm import sentence_embeddings


def _config(weights: dict, targets=("Linear",)) -> QuantizeConfig:
    return QuantizeConfig.model_validate({"rules": [{"targets": list(targets), "scheme": {"weights": weights}}]})


def _mean_cosine(model, batch, reference) -> float:
    return torch.nn.functional.cosine_similarity(sentence_embeddings(model, batch), reference, dim=-1).mean().item()


@pytest.mark.parametrize("weights,module,mean_min", [
    ({"dtype": "fp8_e4m3"}, Fp8WeightOnlyLinear, 0.997),  # 0.99811 (int8 per-channel: 0.99956)
    ({"dtype": "nf4", "granularity": 64}, LookupWeightOnlyLinear, 0.96),  # 0.97039 (int4 g64 sym: 0.94034)
    ({"dtype": "mxfp4", "granularity": 32}, LookupWeightOnlyLinear, 0.945),  # 0.95469 (int4 g32 sym: 0.95505)
    ({"dtype": "ternary", "granularity": 64}, IntxWeightOnlyLinear, 0.3),  # 0.38730 (int2 g64 sym: 0.06193)
])
def test_schemes_on_minilm(minilm, weights, module, mean_min):
    model, _, batch, reference = minilm
    quantized = copy.deepcopy(model)
    report = bitsmith.quantize_(quantized, _config(weights))
    assert len(report.quantized) == 37  # 6 x 6 linears + pooler
    assert isinstance(quantized.encoder.layer[0].intermediate.dense, module)
    assert _mean_cosine(quantized, batch, reference) >= mean_min


def test_nf4_beats_int4_at_the_same_group_on_real_weights(minilm):
    """NF4's levels follow the bell-shaped weights; a uniform grid with the same absmax scale does not."""
    model, _, batch, reference = minilm
    cosines = {}
    for dtype in ("nf4", "int4"):
        quantized = copy.deepcopy(model)
        bitsmith.quantize_(quantized, _config({"dtype": dtype, "granularity": 64}))
        cosines[dtype] = _mean_cosine(quantized, batch, reference)
    assert cosines["nf4"] > cosines["int4"] + 0.01  # 0.970 against 0.940


def _layer(seed=0, k=128, n=48) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n)
    layer.weight.data = torch.randn(n, k) * 0.05  # bell-shaped, as trained weights are
    return layer


def _quantized(layer: nn.Linear, weights: dict) -> nn.Module:
    model = nn.Sequential(copy.deepcopy(layer))
    bitsmith.quantize_(model, _config(weights))
    return model[0]


def test_modules_hold_exactly_the_formats_codes():
    layer = _layer()
    w = layer.weight.detach()
    fp8 = _quantized(layer, {"dtype": "fp8_e4m3", "granularity": 32})
    codes, scale = quantize_fp8(w, "e4m3", (1, 32))
    assert torch.equal(fp8.weight.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(fp8.weight_scale, scale)
    assert torch.equal(fp8.dequantize(), codes.float().reshape(48, 4, 32).mul(scale[..., None]).reshape(48, 128))

    nf4 = _quantized(layer, {"dtype": "nf4", "granularity": 64})
    assert torch.equal(nf4.dequantize(), dequantize_nf4(*quantize_nf4(w, 64), 64))
    mx = _quantized(layer, {"dtype": "mxfp4", "granularity": 32})
    assert torch.equal(mx.dequantize(), dequantize_mxfp4(*quantize_mxfp4(w, 32), 32))
    assert mx.weight_scale.dtype == torch.uint8 and nf4.weight_packed.numel() == 48 * 128 // 2

    ternary = _quantized(layer, {"dtype": "ternary", "granularity": 64})
    codes, scale = quantize_ternary(w, (1, 64))
    expected = dequantize_ternary(codes, scale, (1, 64))
    assert torch.allclose(ternary.dequantize(), expected, rtol=1e-3, atol=0)  # scales stored in fp16
    assert set(ternary.codes().unique().tolist()) == {0, 1, 2} and (ternary.weight_zero_point == 1).all()
    x = torch.randn(5, 128)
    assert torch.allclose(ternary(x), x @ expected.t() + layer.bias, atol=2e-2)  # int4pack in bf16


@pytest.mark.parametrize("weights", [
    {"dtype": "fp8_e4m3"}, {"dtype": "nf4", "granularity": 64}, {"dtype": "mxfp4", "granularity": 32},
    {"dtype": "ternary"},
])
def test_save_and_load_are_exact(weights, tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    float_copy = copy.deepcopy(model)
    bitsmith.quantize_(model, _config(weights))
    x = torch.randn(3, 128)
    bitsmith.save(model, tmp_path / "m")
    loaded = bitsmith.load(tmp_path / "m", model=float_copy)
    assert type(loaded[0]) is type(model[0])
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key].view(torch.uint8), tensor.view(torch.uint8)), key
    assert torch.equal(loaded(x), model(x))


def test_inspect_names_the_kernel_and_says_there_is_no_speed_up(minilm, tmp_path):
    from bitsmith.api.inspect import inspect_checkpoint

    model, tokenizer, _, _ = minilm
    quantized = copy.deepcopy(model)
    config = QuantizeConfig.model_validate({"rules": [
        {"targets": ["re:.*intermediate.dense"], "scheme": {"weights": {"dtype": "nf4", "granularity": 64}}},
        {"targets": ["re:.*output.dense"], "scheme": {"weights": {"dtype": "ternary", "granularity": 64}}},
        {"targets": ["Linear"], "scheme": {"weights": {"dtype": "fp8_e4m3"}}},
    ]})
    bitsmith.quantize_(quantized, config)
    bitsmith.save(quantized, tmp_path / "m", tokenizer=tokenizer)
    rows = {row["name"]: row for row in inspect_checkpoint(tmp_path / "m")["layers"]}
    nf4, fp8 = rows["encoder.layer.0.intermediate.dense"], rows["encoder.layer.0.attention.self.query"]
    assert nf4["scheme"] == "nf4 g64 a16" and nf4["bits"] == 4 and "dequant" in nf4["kernel"]
    assert "no CPU kernel computes on nf4 codes" in nf4["why"] and "no speed-up" in nf4["why"]
    assert fp8["scheme"] == "fp8 e4m3 a16" and fp8["bits"] == 8 and "fp8" in fp8["why"]
    ternary = rows["encoder.layer.0.output.dense"]
    assert ternary["bits"] == 2 and "int4pack" in ternary["kernel"]  # 1536 x 384 at group 64: int4pack's layout
    # bytes: 4-bit codes plus an fp32 absmax per 64 weights; fp8 codes plus one fp32 scale per row
    assert nf4["bytes"] == 1536 * 384 // 2 + 1536 * 6 * 4 + 1536 * 4
    assert fp8["bytes"] == 384 * 384 + 384 * 4 + 384 * 4


@pytest.mark.parametrize("weights,message", [
    ({"dtype": "mxfp4", "granularity": 64}, "mxfp4 shares one power-of-two scale per 32 inputs"),
    ({"dtype": "nf4"}, "nf4 keeps one absmax per group"),
    ({"dtype": "fp8_e4m3", "granularity": "tensor"}, "not per tensor"),
    ({"dtype": "nf4", "granularity": 64, "algorithm": "gptq"}, "rounded to nearest"),
    ({"dtype": "ternary", "symmetric": False}, "rounded to nearest"),
])
def test_schemes_written_wrong_are_refused(weights, message):
    with pytest.raises(BitsmithError, match=message):
        bitsmith.recipe.config_from_dict({"rules": [{"targets": ["Linear"], "scheme": {"weights": weights}}]})


def test_activations_are_refused_with_a_weight_only_format():
    with pytest.raises(BitsmithError, match="need symmetric integer weights"):
        bitsmith.recipe.config_from_dict({"rules": [{"targets": ["Linear"], "scheme": {
            "weights": {"dtype": "fp8_e4m3"}, "activations": {}}}]})


def test_layers_the_format_cannot_take_are_named():
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 8), nn.Linear(96, 8))
    with pytest.raises(BitsmithError, match=r"layer '0' \(Embedding\), named by rule 1: nf4 weights apply to Linear"):
        bitsmith.quantize_(copy.deepcopy(model), _config({"dtype": "nf4", "granularity": 64}, ["0"]))
    with pytest.raises(BitsmithError, match="layer '2' .*groups of 64 do not divide its 96 inputs"):
        bitsmith.quantize_(copy.deepcopy(model), _config({"dtype": "nf4", "granularity": 64}, ["2"]))
    matched = copy.deepcopy(model)  # matched by type, not by name: left in float and said so
    report = bitsmith.quantize_(matched, _config({"dtype": "nf4", "granularity": 64}, ["Linear"]))
    assert isinstance(matched[1], LookupWeightOnlyLinear) and type(matched[2]) is nn.Linear
    assert "do not divide its 96 inputs" in report.skipped["2"]


def test_corrupt_descriptions_and_tensors_are_caught():
    with pytest.raises(InfoError, match="group_size 64 does not divide in_features 96"):
        module_from_info({"module": "LookupWeightOnlyLinear", "in_features": 96, "out_features": 8,
                          "has_bias": False, "format": "nf4", "group_size": 64})
    with pytest.raises(InfoError, match="'format' is 'nf3'"):
        module_from_info({"module": "LookupWeightOnlyLinear", "in_features": 64, "out_features": 8,
                          "has_bias": False, "format": "nf3", "group_size": 64})
    mx = _quantized(_layer(), {"dtype": "mxfp4", "granularity": 32})
    mx.weight_scale[0, 0] = 255
    assert "E8M0 NaN" in mx.storage_problem()
    fp8 = _quantized(_layer(), {"dtype": "fp8_e4m3"})
    fp8.weight.view(torch.uint8)[0, 0] = 0x7F  # e4m3fn's NaN
    assert "NaN" in fp8.storage_problem()
