"""quantize_ on the real MiniLM (16 real sentences) and on small modules."""

import copy

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith import BitsmithError, QuantizeConfig
from bitsmith.nn import Int8DynamicLinear, IntxWeightOnlyLinear, QuantizedEmbedding
from bitsmith.zoo.minilm import sentence_embeddings


def _cosines(model, batch, reference):
    return torch.nn.functional.cosine_similarity(sentence_embeddings(model, batch), reference, dim=-1)


@pytest.mark.parametrize(
    "recipe,mean_min",
    [
        ("w8a8-dynamic", 0.995),  # 0.9973
        ("w8a16", 0.999),  # 0.99943
        ("w4a16", 0.95),  # 0.9546
        ("bf16", 0.9999),  # 0.99998
    ],
)
def test_recipes_on_minilm(minilm, recipe, mean_min):
    model, _, batch, reference = minilm
    quantized = copy.deepcopy(model)
    report = bitsmith.quantize_(quantized, bitsmith.load_recipe(recipe))
    assert len(report.quantized) == 40  # 3 embeddings + 6 x 6 linears + pooler
    assert _cosines(quantized, batch, reference).mean() >= mean_min


def test_rules_are_ordered_and_regex_targets_names():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64), nn.Embedding(10, 128))
    config = QuantizeConfig.model_validate(
        {"rules": [
            {"targets": ["re:2"], "scheme": {"weights": {"dtype": "int4", "granularity": 64, "symmetric": False}}},
            {"targets": ["Linear"], "scheme": {"weights": {"dtype": "int8"}, "activations": {}}},
        ], "ignore": ["Embedding"]}
    )
    bitsmith.quantize_(model, config)
    assert isinstance(model[0], Int8DynamicLinear)
    assert isinstance(model[2], IntxWeightOnlyLinear) and model[2].group_size == 64
    assert isinstance(model[3], nn.Embedding)  # ignored


def test_group_size_that_does_not_divide_leaves_model_untouched():
    model = nn.Sequential(nn.Linear(128, 32), nn.Linear(96, 8))
    before = copy.deepcopy(model.state_dict())
    config = QuantizeConfig.model_validate(
        {"rules": [{"targets": ["Linear"], "scheme": {"weights": {"dtype": "int4", "granularity": 64}}}]}
    )
    with pytest.raises(BitsmithError, match=r"group size 64 does not divide layer '1' \(in_features=96\)"):
        bitsmith.quantize_(model, config)
    assert all(isinstance(m, nn.Linear) for m in model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nan_weights_are_refused():
    model = nn.Sequential(nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight[3, 4] = float("nan")
    with pytest.raises(BitsmithError, match="layer '0' has NaN or infinite weights"):
        bitsmith.quantize_(model, bitsmith.load_recipe("w8a16"))
    assert isinstance(model[0], nn.Linear)


def test_unsupported_layer_named_by_rule_is_reported_not_dropped():
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Linear(8, 8))
    config = QuantizeConfig.model_validate(
        {"rules": [{"targets": ["re:0", "Linear"], "scheme": {"weights": {"dtype": "int8"}}}]}
    )
    report = bitsmith.quantize_(model, config)
    assert "Conv1d is not a layer type bitsmith quantizes" in report.skipped["0"]
    assert isinstance(model[0], nn.Conv1d) and "1" in report.quantized


def test_embedding_table_is_int8_per_row(minilm):
    model = copy.deepcopy(minilm[0])
    bitsmith.quantize_(model, bitsmith.load_recipe("w8a8-dynamic"))
    table = model.embeddings.word_embeddings
    assert isinstance(table, QuantizedEmbedding) and table.weight_codes.shape == (30522, 384)
    assert table.weight_scale.shape == (30522, 1)
