import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from bitsmith.zoo import digits


@pytest.fixture(scope="session")
def digits_cnn():
    """The zoo model from the shared cache: trained at most once per test session (none once cached)."""
    return digits.load_digits_cnn()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_split_shapes_and_sizes():
    x_train, y_train = digits.digits_data("train")
    x_test, y_test = digits.digits_data("test")
    assert x_train.shape == (1347, 1, 32, 32) and y_train.shape == (1347,)
    assert x_test.shape == (450, 1, 32, 32) and y_test.shape == (450,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0


def test_split_is_stratified():
    y_train, y_test = digits.digits_data("train")[1], digits.digits_data("test")[1]
    train_counts = torch.bincount(y_train, minlength=10)
    test_counts = torch.bincount(y_test, minlength=10)
    assert (train_counts > 0).all() and (test_counts > 0).all()
    # stratified: each class's test share is 25% of its images, up to rounding
    assert ((test_counts - 0.25 * (train_counts + test_counts)).abs() <= 1).all()


def test_digits_data_is_deterministic():
    (x1, y1), (x2, y2) = digits.digits_data("test"), digits.digits_data("test")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="split"):
        digits.digits_data("validation")


def test_calibration_and_example_inputs():
    assert torch.equal(digits.calibration_data(16), digits.digits_data("train")[0][:16])
    assert digits.calibration_data().shape == (128, 1, 32, 32)
    assert digits.example_input(8).shape == (8, 1, 32, 32)


def test_architecture_has_conv_bn_relu_triples():
    layers = list(digits.DigitsCNN().features)
    triples = [layers[i : i + 3] for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d)]
    assert len(triples) >= 4
    for conv, bn, relu in triples:
        assert conv.bias is None and isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
        assert 32 <= conv.out_channels <= 128
    assert digits.DigitsCNN()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_trained_model_accuracy_is_the_recorded_one(digits_cnn):
    """The accuracy the (pinned) build recorded is this model's: within one test image of what this process
    measures with its own kernels."""
    assert not digits_cnn.training
    acc = digits.accuracy(digits_cnn, *digits.digits_data("test"))
    recorded = digits.figures()
    assert abs(acc - recorded["test_accuracy"]) <= 1 / 450 and recorded["test_samples"] == 450
    assert acc >= 0.97  # a trained model: 99.33% here


def test_second_load_comes_from_cache(digits_cnn, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained although the model is cached")

    monkeypatch.setattr(digits, "train_digits_cnn", no_training)
    again = digits.load_digits_cnn()
    assert again is not digits_cnn  # a fresh module each load: callers may modify it in place
    assert _same_weights(again, digits_cnn) and not again.training


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path))
    full = digits.digits_data
    # tiny training: one epoch over 64 images, one step
    monkeypatch.setattr(digits, "digits_data", lambda split: tuple(t[:64] for t in full(split)))
    recipe = digits.TrainRecipe(epochs=1)
    first = digits.load_digits_cnn(recipe)
    (path,) = (tmp_path / "zoo").glob("digits-cnn-*.safetensors")
    for corrupt in (b"not a safetensors file", path.read_bytes()[:100]):
        path.write_bytes(corrupt)
        rebuilt = digits.load_digits_cnn(recipe)
        assert _same_weights(rebuilt, first)  # training is deterministic
        assert load_file(path).keys() == first.state_dict().keys()
    # no temp files left behind: the weights and the figures measured for them
    assert sorted(p.name for p in (tmp_path / "zoo").iterdir()) == [path.with_suffix(".json").name, path.name]
    recorded = json.loads(path.with_suffix(".json").read_text())
    assert recorded["test_samples"] == 64 and recorded["numerics"] == "this machine's own kernels (not pinned)"
