"""Structured pruning's math: unit scores, shrinking layers, and the least-squares refit of consumers."""

import pytest
import torch
from torch import nn

from bitsmith.algorithms.structured import (
    channel_energy, kept_units, mean_shift, refit_columns, shrink_batchnorm, shrink_conv, shrink_linear, unit_channels,
    unit_scores,
)


def test_kept_units_keeps_the_highest_in_order_and_refuses_nonsense():
    scores = torch.tensor([0.5, 3.0, 0.1, 2.0, 2.0])
    assert kept_units(scores, 3).tolist() == [1, 3, 4]
    assert kept_units(scores, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        kept_units(scores, 0)
    assert unit_channels(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    assert unit_scores(torch.arange(6.0), 2).tolist() == [1.0, 5.0, 9.0]
    with pytest.raises(ValueError):
        unit_scores(torch.arange(5.0), 2)


def test_channel_energy_from_activations_and_from_weights():
    producer = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # 3 channels
    consumer = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 2.0]])  # columns: energies 1, 2, 4
    assert channel_energy([producer], [(consumer, 1)]).tolist() == [1.0, 8.0, 36.0]
    assert channel_energy([], [(consumer, 1)], torch.tensor([4.0, 1.0, 0.0])).tolist() == [4.0, 2.0, 0.0]


def test_shrunk_layers_compute_the_kept_part_exactly():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    rows, columns = torch.tensor([0, 3, 4]), torch.tensor([1, 2, 5])
    assert torch.allclose(shrink_linear(linear, rows=rows)(x), linear(x)[:, rows], atol=1e-6)
    narrow = shrink_linear(linear, columns=columns)
    assert torch.allclose(narrow(x[:, columns]), x[:, columns] @ linear.weight[:, columns].T + linear.bias)
    assert linear.weight.shape == (5, 6)  # the original is not touched
    conv, norm = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    norm.eval()
    image = torch.randn(2, 4, 8, 8)
    keep = torch.tensor([0, 2, 5])
    out = norm(conv(image))[:, keep]
    assert torch.allclose(shrink_batchnorm(norm, keep).eval()(shrink_conv(conv, out_channels=keep)(image)), out, atol=1e-6)
    inputs = torch.tensor([1, 3])
    assert torch.allclose(shrink_conv(conv, in_channels=inputs)(image[:, inputs]),
                          nn.functional.conv2d(image[:, inputs], conv.weight[:, inputs], conv.bias, padding=1), atol=1e-6)


def test_refit_recovers_columns_that_the_kept_ones_explain():
    """Inputs where removed channels are combinations of kept ones (plus a constant): the refit consumer gives
    the original outputs exactly; without a refit (plain column removal) it does not."""
    torch.manual_seed(1)
    base = torch.randn(500, 4)
    x = torch.cat([base, base[:, :2] @ torch.tensor([[0.5, -1.0], [2.0, 0.3]]) + 0.7], dim=1)  # 6 columns
    consumer = nn.Linear(6, 3)
    rows = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    gram = rows.T.double() @ rows.double()
    kept = torch.tensor([0, 1, 2, 3])
    weight, bias = refit_columns(consumer.weight, consumer.bias, gram, kept, damp=0.0)
    expected = consumer(x)
    assert torch.allclose(x[:, kept] @ weight.T + bias, expected, atol=1e-4)
    plain = x[:, kept] @ consumer.weight[:, kept].T + consumer.bias
    assert (plain - expected).abs().max() > 0.1
    weight, none = refit_columns(consumer.weight, None, gram, kept)  # no bias to fit: weights only
    assert none is None and weight.shape == (3, 4)


def test_mean_shift_is_what_the_removed_channels_add_on_average():
    weight = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    mean = torch.tensor([0.5, 2.0, -1.0])
    assert mean_shift(weight, torch.tensor([1, 2]), mean).tolist() == [1.0, -3.0]
