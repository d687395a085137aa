"""The distill stage: a student cut to fewer blocks or pruned follows the float model; pruned zeros stay zero."""

import copy

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith import BitsmithError, Recipe
from bitsmith.stages.distill import kept_blocks


class Stack(nn.Module):
    def __init__(self, width=32, depth=6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def _stack():
    torch.manual_seed(0)
    return Stack().eval()


def _batches(count=20):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(16, 32, generator=generator) for _ in range(count)]


def _recipe(*stages) -> Recipe:
    return Recipe.model_validate({"version": 2, "name": "d", "stages": list(stages)})


def test_kept_blocks_are_evenly_spaced():
    assert kept_blocks(30, 15) == list(range(0, 30, 2))  # DistilBERT's every other layer
    assert kept_blocks(6, 4) == [0, 1, 3, 4]


def test_a_student_of_fewer_blocks_learns_from_the_full_model():
    model, batches = _stack(), _batches()
    report = bitsmith.run_stages(model, _recipe({"distill": {"keep_blocks": 3, "steps": 150, "lr": 1e-3,
                                                             "loss": "mse"}}), batches)
    summary = report.stages[0].summary
    assert len(model.layers) == 3 and summary["kept_blocks"] == {"blocks": "layers", "indices": [0, 2, 4]}
    assert summary["held_out_loss_after"] < 0.5 * summary["held_out_loss_before"]  # 0.0123 -> 0.0009


def test_distill_after_pruning_keeps_the_zeros_and_recovers():
    model, batches = _stack(), _batches()
    prune = {"prune": {"method": "magnitude", "rules": [{"targets": ["re:layers.*"], "sparsity": 0.6}]}}
    pruned = copy.deepcopy(model)
    bitsmith.run_stages(pruned, _recipe(prune), batches)
    report = bitsmith.run_stages(model, _recipe(prune, {"distill": {"steps": 100, "lr": 1e-3, "loss": "mse"}}), batches)
    summary = report.stages[1].summary
    assert summary["kept_zeros_of"] == 6
    for a, b in zip(model.layers, pruned.layers):
        assert torch.equal(a[0].weight == 0, b[0].weight == 0)  # the same zeros, other values
    assert summary["held_out_loss_after"] < 0.5 * summary["held_out_loss_before"]


def test_matching_an_intermediate_layer_adds_its_error():
    model, batches = _stack(), _batches()
    report = bitsmith.run_stages(model, _recipe({"distill": {"keep_blocks": 3, "steps": 0, "loss": "mse",
                                                             "match": ["head"]}}), batches)
    plain = bitsmith.run_stages(_stack(), _recipe({"distill": {"keep_blocks": 3, "steps": 0, "loss": "mse"}}),
                                batches)
    # the head's output is the model's output: matching it doubles the loss
    assert report.stages[0].summary["held_out_loss_before"] == pytest.approx(
        2 * plain.stages[0].summary["held_out_loss_before"], rel=1e-5)


@pytest.mark.parametrize("options,message", [
    ({"keep_blocks": 6}, "keep_blocks 6 is not fewer than the model's 6 blocks"),
    ({"match": ["layers.9"]}, "match layer 'layers.9' is not a module of the model"),
    ({"keep_blocks": 3, "match": ["layers.1.0"], "steps": 1}, None),
    ({"gradient_checkpointing": True, "steps": 1}, None),
])
def test_bad_options_fail_before_the_model_changes(options, message):
    model = _stack()
    before = copy.deepcopy(model.state_dict())
    if message is None:  # layers.1.0 exists in both: a student of 3 blocks holds layers.1 (the teacher's layers.2)
        bitsmith.run_stages(model, _recipe({"distill": options}), _batches(4))
        return
    with pytest.raises(BitsmithError, match=message):
        bitsmith.run_stages(model, _recipe({"distill": options}), _batches(4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradient_checkpointing_needs_blocks_and_says_so_before_the_model_changes():
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BitsmithError, match="distill: gradient_checkpointing needs a model made of repeated blocks"):
        bitsmith.run_stages(model, _recipe({"distill": {"steps": 1, "gradient_checkpointing": True}}), _batches(4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("training", [False, True])
def test_the_callers_unchanged_original_is_the_teacher_when_given_in_eval_mode(training):
    """compress keeps the float model anyway: the training stages learn from it instead of a copy of their own
    (one model's memory less); one in training mode is left alone and copied, its mode the caller's."""
    model, original = _stack(), _stack().train(training)
    calls = []
    original.register_forward_hook(lambda *_: calls.append(1))
    report = bitsmith.run_stages(model, _recipe({"distill": {"steps": 3, "lr": 1e-3, "loss": "mse"}}), _batches(6),
                                 original=original)
    assert report.stages[0].summary["steps"] == 3
    assert bool(calls) is not training and original.training is training
