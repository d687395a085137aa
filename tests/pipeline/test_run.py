"""The pipeline: stages run in order through one registry, all or nothing, each reporting per layer; the one
block runner is what calibrated stages share, in memory or from disk."""

import copy
import json
from typing import ClassVar

import pytest
import torch
from torch import nn

import bitsmith
import bitsmith.stages  # noqa: F401  (the built-in stage handlers, registered on import)
from bitsmith import BitsmithError
from bitsmith.pipeline import STAGES, BlockSource, register_stage, run_stages
from bitsmith.recipe import STAGE_CONFIGS, Recipe, StageConfig, config_from_dict
from bitsmith.recipe.stages import register_stage_config


def _convnet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model


STATIC = {"weights": {"dtype": "int8", "granularity": "channel", "symmetric": True},
          "activations": {"dtype": "int8", "granularity": "tensor", "dynamic": False}}


def _recipe(*stages):
    return config_from_dict({"name": "t", "stages": list(stages)}, Recipe)


def test_stages_run_in_order_and_report_per_stage(tmp_path):
    model = _convnet()
    x = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        reference = model(x)
    recipe = _recipe("fold_batchnorm", "equalize", {"quantize": {"rules": [{"targets": ["Conv2d", "Linear"],
                                                                            "scheme": STATIC}]}})
    report = run_stages(model, recipe, [torch.randn(4, 1, 8, 8) for _ in range(4)])
    assert [s.stage for s in report.stages] == ["fold_batchnorm", "equalize", "quantize"]
    assert report.stages[0].layers == {"0": {"done": "BatchNorm folded in"}, "3": {"done": "BatchNorm folded in"}}
    assert report.stages[1].layers["0"] == {"done": "equalized with 3"}
    assert report.quantized == {"0": "w8 per-channel sym a8 static (minmax)", "3": "w8 per-channel sym a8 static (minmax)",
                                "7": "w8 per-channel sym a8 static (minmax)"}  # rewrites are not what layers got
    assert report.prepared["folded_batchnorm"] == ["0", "3"] and report.prepared["equalized"] == [["0", "3"]]
    with torch.inference_mode():
        error = ((model(x) - reference).norm() / reference.norm()).item()
    assert error < 0.05, error  # measured 0.020
    bitsmith.save(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "bitsmith.json").read_text())
    assert [s["stage"] for s in meta["stages"]] == ["fold_batchnorm", "equalize", "quantize"]
    assert meta["recipe"]["stages"][0] == {"fold_batchnorm": {}}


class _Counting(BlockSource):
    def __init__(self):
        self.calls = []

    def start(self, model):
        self.calls.append("start")

    def load(self, index, block):
        self.calls.append(f"load {index}")

    def release(self, index, block):
        self.calls.append(f"release {index}")

    def finish(self, model):
        self.calls.append("finish")


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)) for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_gptq_goes_through_the_one_block_runner():
    torch.manual_seed(0)
    model = _Blocks().eval()
    source = _Counting()
    config = config_from_dict({"rules": [{"targets": ["Linear"], "scheme": {"weights": {
        "dtype": "int4", "granularity": 16, "symmetric": False, "algorithm": "gptq"}}}]})
    report = run_stages(model, Recipe(name="t", stages=[config]), [torch.randn(8, 32) for _ in range(2)], blocks=source)
    assert source.calls == ["start", "load 0", "release 0", "load 1", "release 1", "load 2", "release 2", "finish"]
    assert set(report.quantized.values()) == {"w4 g16 asym a16 gptq"} and len(report.quantized) == 6


class _ScaleConfig(StageConfig):
    """A stage written for this test: multiplies every Linear weight by ``factor`` (or fails, to test undo)."""

    stage: ClassVar[str] = "test_scale"
    factor: float = 2.0
    fail: bool = False


def _scale(model, config, context, report):
    from bitsmith.algorithms._modules import assign_

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assign_(module, "weight", module.weight * config.factor)
            report.done(name, f"scaled by {config.factor:g}")
    if config.fail:
        raise BitsmithError("failed on purpose")


@pytest.fixture
def scale_stage():
    yield
    STAGE_CONFIGS.pop("test_scale", None), STAGES.pop(_ScaleConfig, None)


def test_a_new_stage_is_one_config_and_one_handler(scale_stage):
    """Registered here, not in bitsmith: a recipe file names it, the pipeline runs it and undoes it on failure."""
    register_stage_config(_ScaleConfig)
    register_stage(_ScaleConfig)(_scale)
    model = _Blocks().eval()
    weight = model.layers[0][0].weight.detach().clone()
    recipe = _recipe({"test_scale": {"factor": 3.0}}, {"quantize": {"rules": [{"targets": ["Linear"],
                                                                              "scheme": {"weights": {"dtype": "int8"}}}]}})
    report = run_stages(model, recipe)
    assert report.stages[0].layers["layers.0.0"] == {"done": "scaled by 3"}
    assert torch.allclose(model.layers[0][0].dequantize(), 3 * weight, atol=3 * weight.abs().max() / 127)

    fresh = _Blocks().eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    failing = _recipe({"test_scale": {}}, {"test_scale": {"fail": True}})
    with pytest.raises(BitsmithError, match="failed on purpose"):
        run_stages(fresh, failing)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # the first stage undone too
    assert not hasattr(fresh, "bitsmith_stages")


def test_offload_refuses_stages_that_cannot_run_from_disk():
    model = _Blocks().eval()
    disk = BlockSource()
    disk.offloaded = True
    recipe = _recipe("fold_batchnorm", {"quantize": {"rules": [{"targets": ["Linear"], "scheme": {"weights": {"dtype": "int8"}}}]}})
    with pytest.raises(BitsmithError, match=r"\(--offload\) cannot run stage 'fold_batchnorm'"):
        run_stages(copy.deepcopy(model), recipe, blocks=disk)
