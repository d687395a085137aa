"""The importance-matrix method (llama.cpp's imatrix idea): the range search weighted by the inputs' mean squares,
through quantize_ on a small Llama whose norms give a few input channels large values, as trained LLMs have."""

import copy

import pytest
import torch

import bitsmith
from bitsmith.algorithms.imatrix import importance_from_hessian, quantize_weight_imatrix
from bitsmith.algorithms.gptq import dequantize_weight
from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.nn import IntxWeightOnlyLinear
from bitsmith.recipe import config_from_dict
from conftest import llama_batches, outlier_llama


def _llama():
    return outlier_llama(128, 256, 2, channels=4, value=20.0)


_batches = llama_batches


def _quantize(model, algorithm, batches):
    scheme = {"dtype": "int4", "granularity": 32, "symmetric": True, "clip": "mse", "algorithm": algorithm}
    config = config_from_dict({"rules": [{"targets": ["Linear"], "scheme": {"weights": scheme}}],
                               "ignore": ["lm_head"]})
    return bitsmith.quantize_(model, config, calibration=batches if algorithm != "rtn" else None)


def _error(model, reference, batches):
    with torch.inference_mode():
        logits = torch.cat([model(**b).logits for b in batches])
    return float((logits - reference).norm() / reference.norm())


def test_the_weighted_search_has_the_least_weighted_error():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    importance = torch.rand(64) ** 8 * 100  # a few inputs matter most
    plain = dequantize_weight(quantize_weight_rtn(weight, 4, 32, True, clip="mse"))
    weighted = dequantize_weight(quantize_weight_imatrix(weight, 4, 32, True, importance))

    def cost(w, imp):
        return float(((w - weight) ** 2 * imp).sum())

    assert cost(weighted, importance) < 0.95 * cost(plain, importance)
    assert cost(plain, torch.ones(64)) <= cost(weighted, torch.ones(64))  # each search wins its own measure
    with pytest.raises(ValueError, match="importance has shape"):
        quantize_weight_imatrix(weight, 4, 32, True, importance[:10])


def test_importance_is_the_inputs_mean_square_and_never_zero():
    x = torch.tensor([[1.0, 0.0, 3.0], [3.0, 0.0, 1.0]])
    hessian = 2 * x.T @ x / 2
    importance = importance_from_hessian(hessian)
    assert torch.allclose(importance[[0, 2]] / importance[0], torch.tensor([1.0, 1.0]), rtol=1e-5)
    assert importance[1] > 0 and importance[1] < 1e-4 * importance[0]


def test_imatrix_beats_the_plain_range_search_on_a_model_with_outlier_inputs():
    model, batches = _llama(), _batches()
    with torch.inference_mode():
        reference = torch.cat([model(**b).logits for b in batches])
    plain, weighted = copy.deepcopy(model), copy.deepcopy(model)
    _quantize(plain, "rtn", None)
    report = _quantize(weighted, "imatrix", batches[:2])
    layers = [m for m in weighted.modules() if isinstance(m, IntxWeightOnlyLinear)]
    assert len(layers) == 14 and all(m.group_size == 32 for m in layers)
    assert {row["done"] for row in report.stages[0].layers.values()} == {"w4 g32 sym mse a16 imatrix"}
    # held-out batches (the last two): the error the calibration did not see
    plain_error, weighted_error = _error(plain, reference[8:], batches[2:]), _error(weighted, reference[8:], batches[2:])
    assert weighted_error < 0.9 * plain_error, (weighted_error, plain_error)


def test_imatrix_asks_for_the_mse_search():
    with pytest.raises(Exception, match="give clip: mse"):
        config_from_dict({"rules": [{"targets": ["Linear"], "scheme": {"weights": {
            "dtype": "int4", "granularity": 32, "algorithm": "imatrix"}}}]})
