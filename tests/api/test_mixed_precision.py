"""Mixed precision under a budget on the real MiniLM: the mix fits, is a plain recipe, and is measured."""

import copy

import pytest

import bitsmith
from bitsmith import BitsmithError
from bitsmith.api.mixed import model_bytes, mixed_precision, parse_budget
from bitsmith.evaluation.tasks import task_for
from bitsmith.io.models import load_model
from conftest import run_cli

LAYER0 = r"encoder\.layer\.0\."


def test_budgets_parse():
    assert parse_budget("60MB") == ("bytes", 60e6) and parse_budget("4.5bits") == ("bits", 4.5)
    assert parse_budget("0.6x") == ("latency", 0.6) and parse_budget("900000B") == ("bytes", 900000)
    for bad in ("60", "4.5 bit", "-1MB", "0bits", "fast"):
        with pytest.raises(BitsmithError, match="budget"):
            parse_budget(bad)


def test_a_bits_budget_gives_a_mix_that_fits_and_is_measured(tmp_path, minilm_rows):
    out = tmp_path / "mix.yaml"
    result = mixed_precision("minilm", "6bits", ["w8a16", "w4a16"], out, layers=LAYER0, cache=minilm_rows)
    assert result["average_bits"] <= 6 and result["spent"] == result["average_bits"]
    assert result["counts"]["w8a16"] >= 1 and result["counts"]["w4a16"] >= 1  # 6 bits: neither alone is best
    assert sum(result["counts"].values()) == 6
    # the file is a plain recipe: applying it again gives the same model and the same measured harm
    loaded = load_model("minilm")
    task = task_for(loaded.source, loaded.tokenizer, None, model=loaded.model)
    again = copy.deepcopy(loaded.model)
    bitsmith.run_stages(again, bitsmith.load_recipe(str(out)), task.calibration(None, 32))
    assert task.judge(loaded.model)(again) == pytest.approx(result["measured_harm"], abs=1e-6)
    assert model_bytes(again) == result["model_bytes"] < model_bytes(loaded.model)
    # the integer program never does worse than a uniform choice that fits: all w8a16 is 8.3 bits here, and
    # at a budget it fits in its predicted harm bounds the mix's
    uniform = mixed_precision("minilm", "9bits", ["w8a16", "w4a16"], None, layers=LAYER0, cache=minilm_rows)
    assert uniform["counts"]["w4a16"] == 0 and uniform["predicted_harm"] <= result["predicted_harm"]


def test_a_size_budget_counts_the_rest_of_the_model(tmp_path, minilm_rows):
    loaded = load_model("minilm")
    whole = model_bytes(loaded.model)
    with pytest.raises(BitsmithError, match="below what the layers outside the analysis take"):
        mixed_precision("minilm", "10MB", ["w4a16"], None, layers=LAYER0, cache=minilm_rows)
    with pytest.raises(BitsmithError, match="below the smallest possible model"):
        mixed_precision("minilm", f"{whole - 6_000_000}B", ["w8a16"], None, layers=LAYER0, cache=minilm_rows)
    result = mixed_precision("minilm", f"{whole - 2_000_000}B", ["w8a16"], None, layers=LAYER0, cache=minilm_rows)
    assert result["model_bytes"] <= whole - 2_000_000
    # the word embedding table is a layer of the mix too: 30 MB can only come off it (layer 0's Linears hold 7 MB)
    out = tmp_path / "mix.yaml"
    result = mixed_precision("minilm", f"{whole - 30_000_000}B", ["w8a16"], out,
                             layers=LAYER0 + r"|embeddings\.word_embeddings", cache=minilm_rows)
    assert result["choice"]["embeddings.word_embeddings"] == "w8a16" and result["model_bytes"] <= whole - 30_000_000
    rule = bitsmith.load_recipe(str(out)).stages[0].rules[0]
    assert "embeddings.word_embeddings" in rule.targets and rule.scheme.weights.bits == 8


@pytest.mark.parametrize("args,fragment", [
    (["--budget", "6bits"], "--budget and --write-recipe go together"),
    (["--budget", "fast", "--write-recipe", "RECIPE"], "is not a size"),
    (["--budget", "0.5bits", "--write-recipe", "RECIPE"], "below the smallest possible model"),
])
def test_bad_budgets_are_one_clear_line(capsys, tmp_path, args, fragment):
    args = [str(tmp_path / "mix.yaml") if a == "RECIPE" else a for a in args]
    code, _, err = run_cli(capsys, "analyze", "minilm", "--sensitivity", "--schemes", "w4a16", "--layers",
                           LAYER0 + "attention.self.query", "--cache",
                           tmp_path / "cache", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "mix.yaml").exists()


def test_a_block_mix_with_a_base_recipe_leaves_float_what_it_chose_float():
    from torch import nn

    from bitsmith.api.mixed import mix_recipe

    loaded = load_model("minilm")
    linears = [name for name, m in loaded.model.named_modules() if type(m) is nn.Linear]
    members = {f"encoder.layer.{i}": [n for n in linears if n.startswith(f"encoder.layer.{i}.")] for i in (0, 1)}
    recipe = mix_recipe("mix", {"encoder.layer.0": "w8a16", "encoder.layer.1": "float"}, "test", members,
                        bitsmith.load_recipe("w4a16"))
    mixed = copy.deepcopy(loaded.model)
    bitsmith.run_stages(mixed, recipe, None)
    modules = dict(mixed.named_modules())
    assert all(modules[n].scheme == "w8a16" for n in members["encoder.layer.0"])  # the block's candidate
    assert all(type(modules[n]) is nn.Linear for n in members["encoder.layer.1"])  # chosen float: stays float
    others = [n for n in linears if not n.startswith(("encoder.layer.0.", "encoder.layer.1."))]
    assert others and all(getattr(modules[n], "scheme", "") == "w4a16 g128" for n in others)  # the base's rule
    assert type(modules["embeddings.word_embeddings"]) is not nn.Embedding  # the base's Embedding rule
    with pytest.raises(BitsmithError, match="give a recipe of quantize stages only"):
        mix_recipe("mix", {"encoder.layer.0": "w8a16"}, "test", members, bitsmith.load_recipe("sparsegpt-50-w4a16"))
