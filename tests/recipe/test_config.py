import pytest
import yaml

from bitsmith import BitsmithError, QuantizeConfig, Recipe, load_recipe
from bitsmith.recipe import config_from_dict, config_from_yaml
from bitsmith.recipe import builtin_recipes


@pytest.mark.parametrize(
    "name", ["fp16", "bf16", "w8a16", "w4a16", "w8a8-dynamic", "w8a8-static", "gptq-w4a16", "gptq-w3a16",
             "awq-w4a16", "smoothquant-w8a8"]
)
def test_builtin_recipes_round_trip_yaml_and_json(name, tmp_path):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.version == 2
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert config_from_yaml(path) == recipe
    assert Recipe.model_validate_json(recipe.model_dump_json()) == recipe


def test_builtin_recipe_set():
    assert {"fp16", "bf16", "w8a16", "w4a16", "w8a8-dynamic"} <= set(builtin_recipes())


def test_unknown_key_is_named():
    data = {"rules": [{"targets": ["Linear"], "scheme": {"weights": {"dtype": "int8", "grnularity": "channel"}}}]}
    with pytest.raises(BitsmithError, match="unknown key 'rules.0.scheme.weights.grnularity'"):
        config_from_dict(data)


def test_unknown_top_level_key_in_recipe_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nname: x\nquantise: {rules: []}\n")
    with pytest.raises(BitsmithError, match="unknown key 'quantise'"):
        config_from_yaml(path)


def test_activations_need_symmetric_integer_weights():
    data = {"rules": [{"targets": ["Linear"], "scheme": {"weights": {"dtype": "int4", "symmetric": False},
                                                          "activations": {}}}]}
    with pytest.raises(BitsmithError, match="int8 activations need symmetric integer weights"):
        config_from_dict(data)
    data["rules"][0]["scheme"]["weights"]["symmetric"] = True  # int4 codes held as int8 on the W8A8 kernels
    assert config_from_dict(data).rules[0].scheme.describe() == "w4 per-channel sym a8 per-token dynamic"


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(BitsmithError, match="unknown recipe 'w5a5'.*w8a8-dynamic"):
        load_recipe("w5a5")


def test_missing_recipe_file():
    with pytest.raises(BitsmithError, match="recipe file not found"):
        load_recipe("nope/recipe.yaml")


def test_bad_regex_is_rejected():
    with pytest.raises(BitsmithError, match="bad regex"):
        config_from_dict({"rules": [{"targets": ["re:(("], "scheme": None}]})


def test_config_json_round_trip():
    config = QuantizeConfig.model_validate(
        {"rules": [{"targets": ["re:.*query"], "scheme": {"weights": {"dtype": "int4", "granularity": 64}}}],
         "ignore": ["pooler.dense"]}
    )
    assert QuantizeConfig.model_validate_json(config.to_json()) == config
    assert config_from_dict(yaml.safe_load(config.to_yaml())) == config
