"""The smollm2 zoo entry: the package's GGUF file converted into a float transformers directory (built by
``make zoo``; the suite reads the cached build)."""

import json

import pytest
import torch

import bitsmith
from bitsmith.nn import IntxWeightOnlyLinear
from bitsmith.zoo import entry, smollm2
from bitsmith.zoo.docs_lm import calibration_texts, heldout_text, perplexity


@pytest.fixture(scope="module")
def smol():
    return smollm2.load()


def test_the_build_is_a_float_llama_of_the_published_shape(smol):
    model, tokenizer = smol
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as released
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.chat_template  # the instruct model's template came across from the GGUF file
    assert "quantization_config" not in json.loads((smollm2.model_dir() / "config.json").read_text())


def test_recorded_figures_are_the_models_and_it_reads_python_docs(smol):
    model, tokenizer = smol
    recorded = smollm2.figures()
    assert recorded["float_weights"] == "the Q4_1 GGUF weights dequantized to float32"
    assert "dequantized" in entry("smollm2").description
    assert recorded["windows"] >= 100 and recorded["parameters"] == 134_515_008
    assert 5 < recorded["heldout_perplexity"] < 40  # a pretrained LLM on English technical text: 17.30 here
    few = perplexity(model, tokenizer, heldout_text(), max_windows=4)
    assert few["windows"] == 4 and few["perplexity"] < 60  # docs-lm, trained here on this text: ~130


def test_gptq_w4a16_runs_as_written_on_576_wide_layers(smol):
    """The built-in gptq-w4a16 recipe (groups of 128) on one block: 576 = 4.5 groups, a partial last group."""
    import copy

    model = copy.deepcopy(smol[0])
    config = bitsmith.load_recipe("gptq-w4a16").stages[-1].to_dict()
    config["ignore"] = [*config["ignore"], r"re:^(?!model\.layers\.0\.).*"]  # block 0 only: a fast test
    recipe = bitsmith.QuantizeConfig.model_validate(config)
    ids = smol[1](calibration_texts(2, max_chars=1200), return_tensors="pt", padding=True).input_ids[:, :64]
    report = bitsmith.quantize_(model, recipe, calibration=[{"input_ids": ids}])
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, IntxWeightOnlyLinear)
    assert q_proj.weight_scale.shape == (576, 5)  # ceil(576 / 128) groups per row
    assert report.quantized["model.layers.0.self_attn.q_proj"] == "w4 g128 asym mse a16 gptq"
    assert report.quantized["model.layers.0.mlp.down_proj"] == "w4 g128 asym mse a16 gptq"  # 1536 = 12 groups
    assert not any(name.startswith("model.layers.0.") for name in report.notes)  # no fallback
    assert isinstance(model.model.layers[1].self_attn.q_proj, torch.nn.Linear)
    assert torch.isfinite(model(ids).logits).all()
