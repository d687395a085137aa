"""Per-layer sensitivity on the real MiniLM, digits-cnn and docs-lm: measured harm, proxies, Spearman, the cache."""

import copy
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

import bitsmith
from bitsmith.api.sensitivity import analyze_sensitivity, candidate, changed, input_hessians
from bitsmith.evaluation.tasks import task_for
from bitsmith.io.models import load_model
from conftest import run_cli

LAYER0 = r"encoder\.layer\.0\."


@pytest.fixture(scope="module")
def minilm_table(minilm_rows):
    """Layer 0's table on the session's row cache (rows another test measured are served, not measured again), its
    latencies timed afresh (3 repeats: the tests check how a cost is reported, not how fast a kernel is)."""
    return analyze_sensitivity("minilm", ["w4a16", "wanda-50"], layers=LAYER0, cache=minilm_rows, repeats=3)


def test_every_layer_and_candidate_is_measured_and_the_fisher_proxy_ranks_it(minilm_table):
    result = minilm_table
    assert result["metric"] == "1 - mean cosine" and len(result["rows"]) == 12  # 6 Linears x 2 candidates
    rows = {(r["candidate"], r["group"]): r for r in result["rows"]}
    for name in ("w4a16", "wanda-50"):
        ffn, query = rows[(name, "encoder.layer.0.intermediate.dense")], rows[(name, "encoder.layer.0.attention.self.query")]
        assert ffn["measured"] > 5 * query["measured"] > 0  # 0.0014 against 7.9e-05 (w4a16)
        assert ffn["bytes"] < ffn["float_bytes"] or name == "wanda-50"  # pruned float layers keep their bytes
    # measured 0.993 here; the layers' output SQNR ranks them poorly (0.16): harm depends on what follows a layer
    assert result["spearman"]["fisher"] >= 0.8 and result["chosen"] == "fisher"
    assert result["spearman"]["sqnr_db"] < result["spearman"]["fisher"]


def test_a_row_is_the_task_metric_with_that_layer_alone_changed(minilm_table):
    result = minilm_table
    row = next(r for r in result["rows"] if r["candidate"] == "w4a16" and r["group"].endswith("output.dense")
               and ".attention." not in r["group"])
    loaded = load_model("minilm")
    task = task_for(loaded.source, loaded.tokenizer, None, model=loaded.model)
    alone = copy.deepcopy(loaded.model)
    recipe = bitsmith.load_recipe("w4a16").to_dict()
    recipe["stages"][0]["quantize"]["rules"] = [{"targets": [row["group"]],
                                                 "scheme": recipe["stages"][0]["quantize"]["rules"][1]["scheme"]}]
    bitsmith.quantize_(alone, bitsmith.recipe.Recipe.model_validate(recipe))
    assert 1 - task.fidelity(loaded.model, alone)["mean_cosine"] == pytest.approx(row["measured"], abs=2e-6)


def _cached_part(rows):
    timing = ("latency_s", "float_latency_s", "kernel", "saves_time")  # measured afresh each time: not cached
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


def test_the_cache_serves_what_was_measured_and_measures_only_what_is_new(minilm_table, tmp_path):
    first = minilm_table
    cache_file = tmp_path / Path(first["cache"]).name
    shutil.copyfile(first["cache"], cache_file)  # the session's rows, in a cache of this test's own to damage
    again = analyze_sensitivity("minilm", ["w4a16", "wanda-50"], layers=LAYER0, cache=tmp_path, latency=False)
    assert again["from_cache"] == 12 and again["measured_now"] == 0 and again["cache"] == str(cache_file)
    assert _cached_part(again["rows"]) == _cached_part(first["rows"])
    more = analyze_sensitivity("minilm", ["w4a16", "nf4"], layers=LAYER0, cache=tmp_path, latency=False)
    assert more["from_cache"] == 6 and more["measured_now"] == 6
    cache_file.write_text("{not json")  # a damaged cache is measured again, never trusted
    # two of the six layers (the smallest and the largest shape) are enough to see every row measured again
    two = r"encoder\.layer\.0\.(attention\.self\.query|intermediate\.dense)"
    redone = analyze_sensitivity("minilm", ["w4a16", "wanda-50"], layers=two, cache=tmp_path, latency=False)
    assert redone["measured_now"] == 4  # and the same numbers: deterministic
    assert _cached_part(redone["rows"]) == _cached_part([r for r in first["rows"] if re.match(two, r["group"])])


def test_block_groups_change_every_layer_of_a_block_together(tmp_path, minilm_rows):
    result = analyze_sensitivity("minilm", ["w4a16"], group="block", layers=r"encoder\.layer\.[01]\.", cache=tmp_path,
                                 latency=False)
    assert [r["group"] for r in result["rows"]] == ["encoder.layer.0", "encoder.layer.1"]
    assert len(result["rows"][0]["layers"]) == 6
    single = analyze_sensitivity("minilm", ["w4a16"], layers=LAYER0, cache=minilm_rows, latency=False)
    assert result["rows"][0]["output_error"] == pytest.approx(sum(r["output_error"] for r in single["rows"]))
    assert result["rows"][0]["measured"] > max(r["measured"] for r in single["rows"])
    assert result["chosen"] == "measured" and "no proxy could be ranked" in result["note"]  # two rows: no ranking


def test_gptq_candidates_use_the_layers_own_inputs():
    loaded = load_model("minilm")
    task = task_for(loaded.source, loaded.tokenizer, None, model=loaded.model)
    layer = loaded.model.encoder.layer[0].intermediate.dense
    hessian = input_hessians(loaded.model, {"ffn": layer}, task.calibration(None, 16))["ffn"][0]
    x = task.calibration(None, 16)
    inputs = []
    handle = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.inference_mode():
        for batch in x:
            loaded.model(**batch)
    handle.remove()
    rows = torch.cat(inputs)
    errors = {}
    for name in ("gptq-w4a16", "w4a16"):
        new = changed(layer, candidate(name), hessian)
        errors[name] = (new(rows) - layer(rows)).pow(2).mean().item()
    assert errors["gptq-w4a16"] < 0.8 * errors["w4a16"]  # GPTQ minimises exactly this error on these inputs


def test_digits_classifier_and_docs_lm_are_judged_by_their_own_metric(tmp_path, docs_lm_model):
    digits = analyze_sensitivity("digits-cnn", ["w4a16", "ternary"], cache=tmp_path, latency=False)
    assert digits["metric"] == "accuracy drop (points)" and len(digits["rows"]) == 2  # its one Linear
    lm = analyze_sensitivity("docs-lm", ["w4a16", "magnitude-50"], layers=r"layers\.0\.", eval_limit=4,
                             calib_samples=8, cache=tmp_path, latency=False)
    assert lm["metric"] == "perplexity increase (%)"
    assert all(r["measured"] > -1 for r in lm["rows"]) and max(r["measured"] for r in lm["rows"]) > 0.1


@pytest.mark.parametrize("args,fragment", [
    (["--schemes", "sparsegpt-50-w4a16"], "has 2 stages"),
    (["--schemes", "STATIC"], "static activations"),
    (["--schemes", "awq-w4a16"], "uses awq"),
    (["--schemes", "w5a5"], "unknown recipe 'w5a5'"),
    (["--schemes", ","], "names no candidate"),
    (["--layers", "nothing-like-this"], "no Linear layer of minilm matches"),
    (["--layers", "(("], "is not a regular expression"),
    (["--group", "row"], "--group must be layer or block"),
    (["--eval-windows", "0"], "--eval-windows must be at least 1"),
])
def test_bad_sensitivity_input_is_one_clear_line(capsys, tmp_path, args, fragment):
    static = tmp_path.parent / f"{tmp_path.name}-static.yaml"
    static.write_text("name: static\nstages:\n  - quantize:\n      rules:\n        - targets: [Linear]\n"
                      "          scheme: {weights: {dtype: int8}, activations: {dynamic: false, granularity: tensor}}\n")
    args = [str(static) if a == "STATIC" else a for a in args]
    code, _, err = run_cli(capsys, "analyze", "minilm", "--sensitivity", "--cache", tmp_path, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not list(tmp_path.iterdir())  # nothing cached


def test_analyze_needs_one_analysis(capsys):
    code, _, err = run_cli(capsys, "analyze", "minilm")
    assert code == 2 and "--observers or --sensitivity" in err


def test_cli_json(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "analyze", "minilm", "--sensitivity", "--schemes", "nf4", "--layers",
                           r"layer\.0\.intermediate", "--cache", tmp_path, "--no-latency", "--json")
    result = json.loads(out)
    assert code == 0 and result["rows"][0]["candidate"] == "nf4" and result["rows"][0]["measured"] > 0


def test_costs_name_the_kernel_and_never_count_a_pruned_layer_as_faster(minilm_table):
    from bitsmith.api.sensitivity import NO_SPARSE_KERNEL
    from bitsmith.nn.linear import KERNEL_NAMES

    result = minilm_table
    for row in result["rows"]:
        assert row["latency_s"] > 0 and row["float_latency_s"] > 0
        if row["candidate"] == "wanda-50":  # a float Linear with zeros: the same dense matmul as float
            assert row["kernel"] == NO_SPARSE_KERNEL and not row["saves_time"]
            assert row["latency_s"] == row["float_latency_s"] and row["bytes"] == row["float_bytes"]
        else:
            assert row["kernel"] in KERNEL_NAMES
            assert row["saves_time"] == (row["latency_s"] <= 0.95 * row["float_latency_s"])


def test_cli_table_names_the_layers_and_the_ranking(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "analyze", "minilm", "--sensitivity", "--schemes", "w4a16,nf4", "--layers",
                           r"layer\.0\.attention\.self", "--cache", tmp_path, "--no-latency")
    assert code == 0 and "encoder.layer.0.attention.self.value" in out and "Spearman against the measured harm" in out
    assert "6 measured now" in out


def test_embedding_tables_are_layers_with_the_candidates_that_apply_to_them(minilm_rows):
    """A table gets the candidate's Linear scheme where a table can take it (w4a16: int4 in groups of 128 of a row),
    measured like any layer; pruning does not apply to a lookup: no row, and the result says why."""
    layers = r"embeddings\.(word|token_type)_embeddings|layer\.0\.attention\.self\.query"
    result = analyze_sensitivity("minilm", ["w4a16", "wanda-50"], layers=layers, cache=minilm_rows, repeats=3)
    rows = {(r["candidate"], r["group"]): r for r in result["rows"]}
    assert set(rows) == {("w4a16", "embeddings.word_embeddings"), ("w4a16", "embeddings.token_type_embeddings"),
                         ("w4a16", "encoder.layer.0.attention.self.query"),
                         ("wanda-50", "encoder.layer.0.attention.self.query")}
    assert [(n["candidate"], n["group"]) for n in result["not_applicable"]] == [
        ("wanda-50", "embeddings.word_embeddings"), ("wanda-50", "embeddings.token_type_embeddings")]
    assert "prunes Linear layers, not a lookup table" in result["not_applicable"][0]["why"]
    table = rows[("w4a16", "embeddings.word_embeddings")]
    # int4 codes plus an fp16 scale and a uint8 zero point per 128 values: 4.19 bits of the float's 32
    assert table["bytes"] == pytest.approx(table["float_bytes"] * (4 + 24 / 128) / 32, rel=1e-6)
    assert math.isfinite(table["sqnr_db"]) and table["fisher"] > 0 and "row gather" in table["kernel"]
    loaded = load_model("minilm")
    task = task_for(loaded.source, loaded.tokenizer, None, model=loaded.model)
    alone = copy.deepcopy(loaded.model)
    scheme = bitsmith.load_recipe("w4a16").to_dict()["stages"][0]["quantize"]["rules"][1]["scheme"]
    bitsmith.quantize_(alone, bitsmith.QuantizeConfig.model_validate(
        {"rules": [{"targets": ["embeddings.word_embeddings"], "scheme": scheme}]}))
    assert alone.embeddings.word_embeddings.weight_scale.shape == (30522, 3)
    assert 1 - task.fidelity(loaded.model, alone)["mean_cosine"] == pytest.approx(table["measured"], abs=2e-6)


def test_a_table_and_the_head_tied_to_it_are_left_out_and_said_so(tmp_path):
    from bitsmith.api.sensitivity import _tied_layers
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    layers = {n: m for n, m in model.named_modules() if type(m) in (torch.nn.Embedding, torch.nn.Linear)}
    tied = _tied_layers(model, layers)
    assert list(tied) == ["model.embed_tokens", "lm_head"]
    assert "shares its matrix with lm_head" in tied["model.embed_tokens"]
    assert "shares its matrix with model.embed_tokens" in tied["lm_head"]
    model.config.tie_word_embeddings = False
    untied = LlamaForCausalLM(model.config)
    assert _tied_layers(untied, {"model.embed_tokens": untied.model.embed_tokens}) == {}


def test_a_killed_analysis_resumes_from_the_rows_it_finished(tmp_path, monkeypatch):
    import bitsmith.api.sensitivity as sensitivity

    real, calls = sensitivity.changed, []

    def dies_on_the_third(*args):
        calls.append(args[1].name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of the table
        return real(*args)

    monkeypatch.setattr(sensitivity, "changed", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        analyze_sensitivity("digits-cnn", ["w4a16", "ternary", "w8a16"], cache=tmp_path, latency=False)
    monkeypatch.setattr(sensitivity, "changed", real)
    again = analyze_sensitivity("digits-cnn", ["w4a16", "ternary", "w8a16"], cache=tmp_path, latency=False)
    assert again["from_cache"] == 2 and again["measured_now"] == 1
