"""Static W8A8 on the real zoo models and its failure modes."""

import copy

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith import BitsmithError, QuantizeConfig
from bitsmith.evaluation.tasks import ImageClassificationTask
from bitsmith.nn import StaticInt8Conv2d, StaticInt8Linear
from bitsmith.zoo.minilm import encode_batch, sentence_embeddings
from bitsmith.zoo.text import doc_sentences


@pytest.fixture(scope="module")
def digits():
    from bitsmith.io.models import load_model

    return load_model("digits-cnn").model, ImageClassificationTask()


def test_digits_cnn_w8a8_static_keeps_accuracy(digits, tmp_path):
    model, task = digits
    quantized = copy.deepcopy(model)
    report = bitsmith.quantize_(quantized, bitsmith.load_recipe("w8a8-static"), calibration=task.calibration(None))
    assert report.prepared["folded_batchnorm"] == ["features.0", "features.3", "features.7", "features.10", "features.14"]
    assert sum(isinstance(m, StaticInt8Conv2d) and m.fused_relu for m in quantized.modules()) == 5
    result = task.fidelity(model, quantized)
    assert result["accuracy_drop_points"] <= 0.5  # 0.0: 99.33% -> 99.33%
    bitsmith.save(quantized, tmp_path / "d")
    loaded = bitsmith.load(tmp_path / "d")  # the zoo class is rebuilt, BN and ReLU slots as Identity
    assert torch.equal(loaded(task.batch), quantized(task.batch))


def test_digits_cnn_int4_weights_with_static_int8_activations(digits):
    """int4 codes held as int8 on the same W8A8 kernels: the scheme QAT recovers (tests/stages/test_qat_stage.py)."""
    model, task = digits
    data = bitsmith.load_recipe("w8a8-static").to_dict()
    for rule in data["stages"][1]["quantize"]["rules"]:
        if "Conv2d" in rule["targets"]:
            rule["scheme"]["weights"]["dtype"] = "int4"
    quantized = copy.deepcopy(model)
    report = bitsmith.quantize_(quantized, bitsmith.Recipe.model_validate(data), calibration=task.calibration(None))
    assert report.quantized["features.0"] == "w4 per-channel sym a8 static (minmax)"
    convs = [m for m in quantized.modules() if isinstance(m, StaticInt8Conv2d)]
    assert len(convs) == 5 and all(-8 <= int(m.weight_codes.min()) and int(m.weight_codes.max()) <= 7 for m in convs)
    assert task.fidelity(model, quantized)["accuracy"] >= 0.96  # 0.97556 (float 0.99333)


def test_minilm_w8a8_static(minilm):
    model, tokenizer, batch, reference = minilm
    calibration = [encode_batch(tokenizer, doc_sentences(64, split="calib")[i : i + 16]) for i in range(0, 64, 16)]
    quantized = copy.deepcopy(model)
    bitsmith.quantize_(quantized, bitsmith.load_recipe("w8a8-static"), calibration=calibration)
    assert sum(isinstance(m, StaticInt8Linear) for m in quantized.modules()) == 37
    cosine = nn.functional.cosine_similarity(sentence_embeddings(quantized, batch), reference, dim=-1)
    assert cosine.mean() >= 0.99  # 0.9928


def test_static_recipe_without_calibration():
    with pytest.raises(BitsmithError, match="give calibration data"):
        bitsmith.quantize_(nn.Sequential(nn.Linear(4, 4)), bitsmith.load_recipe("w8a8-static"))


def test_empty_calibration_leaves_model_in_float():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(BitsmithError, match="calibration set is empty"):
        bitsmith.quantize_(model, bitsmith.load_recipe("w8a8-static"), calibration=[])
    assert isinstance(model[0], nn.Linear)


def test_conv_under_a_dynamic_scheme_is_reported():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    report = bitsmith.quantize_(model, QuantizeConfig.model_validate(
        {"rules": [{"targets": ["Conv2d", "Linear"], "scheme": {"weights": {"dtype": "int8"}}}]}
    ))
    assert "quantized only by static schemes" in report.skipped["0"] and isinstance(model[0], nn.Conv2d)
