"""Recipes as ordered stages: version 2 parsing, version-1 files mapped onto the same stages, and the
order and key checks that make a bad recipe one clear line."""

import pytest

import bitsmith
from bitsmith import BitsmithError
from bitsmith.recipe import (
    STAGE_CONFIGS,
    FoldBatchNormConfig,
    QuantizeConfig,
    Recipe,
    SmoothConfig,
    config_from_dict,
    config_from_yaml,
)

W8A8_STATIC = """
      rules:
        - targets: [Embedding]
          scheme: {weights: {dtype: int8, granularity: channel, symmetric: true}}
        - targets: [Linear, Conv2d]
          scheme:
            weights: {dtype: int8, granularity: channel, symmetric: true}
            activations: {dtype: int8, granularity: tensor, dynamic: false, observer: minmax}
"""


def _v1(tmp_path, name, extra=""):
    """A version-1 recipe file: one quantize section that also prepares the model."""
    body = "\n".join(line[4:] for line in W8A8_STATIC.splitlines())
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"version: 1\nname: {name}\nquantize:{body}\n{extra}")
    return path


def test_version_1_files_map_onto_the_builtin_stages(tmp_path):
    """The built-in recipes were version 1 files; their version-1 text gives the same stages as their v2 form."""
    static = config_from_yaml(_v1(tmp_path, "w8a8-static", "  fold_batchnorm: true\n  cross_layer_equalization: false\n"))
    assert static.stages == bitsmith.load_recipe("w8a8-static").stages
    assert [s.stage for s in static.stages] == ["fold_batchnorm", "quantize"]
    smooth = config_from_yaml(_v1(tmp_path, "smoothquant-w8a8", "  smoothquant: {alpha: 0.8}\n"))
    assert smooth.stages == bitsmith.load_recipe("smoothquant-w8a8").stages
    assert [s.stage for s in smooth.stages] == ["smooth", "fold_batchnorm", "quantize"]
    assert smooth.stages[0] == SmoothConfig(alpha=0.8)


def test_version_1_preparation_follows_version_1_rules(tmp_path):
    # version 1 folded BatchNorm only for static schemes, and equalized only when asked
    equalized = config_from_yaml(_v1(tmp_path, "a", "  cross_layer_equalization: true\n"))
    assert [s.stage for s in equalized.stages] == ["fold_batchnorm", "equalize", "quantize"]
    unfolded = config_from_yaml(_v1(tmp_path, "b", "  fold_batchnorm: false\n"))
    assert [s.stage for s in unfolded.stages] == ["quantize"]
    dynamic = bitsmith.load_recipe("w8a8-dynamic").to_dict()["stages"][0]["quantize"]
    recipe = config_from_dict({"version": 1, "name": "d", "quantize": dynamic}, Recipe)
    assert [s.stage for s in recipe.stages] == ["quantize"]
    with pytest.raises(BitsmithError, match="quantize.fold_batchnorm: Input should be a valid boolean"):
        config_from_yaml(_v1(tmp_path, "c", "  fold_batchnorm: 3\n"))


def test_version_2_round_trips_and_bare_stage_names(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 2\nname: r\nstages:\n  - fold_batchnorm\n  - equalize: {}\n  - quantize:" + W8A8_STATIC)
    recipe = config_from_yaml(path)
    assert [s.stage for s in recipe.stages] == ["fold_batchnorm", "equalize", "quantize"]
    assert recipe.needs_calibration
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    assert config_from_yaml(again) == recipe
    assert Recipe.model_validate_json(recipe.to_json()) == recipe
    assert recipe.stages_of(FoldBatchNormConfig) == [FoldBatchNormConfig()]


@pytest.mark.parametrize("stages, message", [
    ("  - distil: {teacher: x}\n", r"stages\[0\]: unknown stage 'distil'; stages: quantize, smooth, fold_batchnorm, equalize, prune"),
    ("  - distill: {teacher: x}\n", r"unknown key 'stages\[0\]\.distill\.teacher'"),
    ("  - smooth: {alfa: 0.5}\n  - quantize: {rules: []}\n", r"unknown key 'stages\[0\].smooth.alfa'"),
    ("  - quantize: {rulez: []}\n", r"unknown key 'stages\[0\].quantize.rulez'"),
    ("  - quantize: {rules: []}\n  - smooth: {alpha: 0.5}\n",
     r"stages\[1\] \(smooth\) comes after quantize: smooth changes float layers, which quantize has already"),
    ("  - smooth: {alpha: 0.5}\n", r"stages\[0\] \(smooth\) needs a quantize stage after it"),
    ("  - {smooth: {}, quantize: {rules: []}}\n", r"stages\[0\]: a stage is a mapping with one key"),
    ("  - quantize: {rules: [], smoothquant: {alpha: 0.5}}\n", r"'smoothquant' is the stage 'smooth' since recipe"),
    ("  - smooth: {alpha: 2.0}\n  - quantize: {rules: []}\n", r"stages\[0\].smooth.alpha: Value error, alpha must be in"),
])
def test_bad_stages_are_one_line_naming_the_problem(tmp_path, stages, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"version: 2\nname: bad\nstages:\n{stages}")
    with pytest.raises(BitsmithError, match=message) as err:
        config_from_yaml(path)
    assert str(err.value).startswith(f"recipe {path}: ") and "\n" not in str(err.value)


def test_every_stage_config_has_a_handler():
    from bitsmith.pipeline import STAGES

    assert set(STAGE_CONFIGS.values()) == set(STAGES)
    assert STAGES[QuantizeConfig].offload and not STAGES[SmoothConfig].offload
