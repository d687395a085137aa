import torch
from torch import nn

from bitsmith.algorithms.bias_correction import bias_shift
from bitsmith.algorithms.equalize import cross_layer_equalize_, equalization_scales
from bitsmith.algorithms.fold import fold_batchnorm_


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
    ).eval()
    for bn in (model[1], model[5]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    return model


def test_fold_batchnorm_preserves_the_function():
    model, x = _cnn(), torch.randn(2, 3, 16, 16)
    reference = model(x)
    assert fold_batchnorm_(model) == ["0", "4"]
    assert isinstance(model[1], nn.Identity) and model[0].bias is not None
    assert torch.allclose(model(x), reference, atol=1e-5)


def test_cross_layer_equalization_preserves_function_and_equalizes_ranges():
    model, x = _cnn(), torch.randn(2, 3, 16, 16)
    fold_batchnorm_(model)
    reference = model(x)
    assert cross_layer_equalize_(model) == [("0", "4")]  # through ReLU and MaxPool
    assert torch.allclose(model(x), reference, atol=1e-5)
    r1 = model[0].weight.abs().flatten(1).amax(1)
    r2 = model[4].weight.abs().transpose(0, 1).flatten(1).amax(1)
    assert torch.allclose(r1, r2, rtol=1e-5)
    assert torch.allclose(equalization_scales(model[0].weight, model[4].weight), torch.ones(8), atol=1e-5)


def test_bias_shift_equals_mean_output_change():
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3)
    weight_q = weight + 0.05 * torch.randn_like(weight)
    x = torch.rand(64, 4, 10, 10) + torch.arange(4.0).reshape(1, 4, 1, 1)  # channel means differ
    measured = (nn.functional.conv2d(x, weight_q) - nn.functional.conv2d(x, weight)).mean(dim=(0, 2, 3))
    predicted = bias_shift(weight, weight_q, x.mean(dim=(0, 2, 3)))
    assert torch.allclose(predicted, measured, atol=2e-3)  # padding-free conv: equal up to sampling noise
