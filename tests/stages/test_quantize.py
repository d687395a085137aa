"""quantize_ on the real MiniLM (16 real sentences) and on small modules."""

import copy

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith import BitsmithError, QuantizeConfig
from bitsmith.nn import Int8DynamicLinear, IntxWeightOnlyLinear, QuantizedEmbedding
from bitsmith.zoo.minilm import sentence_embeddings


def _cosines(model, batch, reference):
    return torch.nn.functional.cosine_similarity(sentence_embeddings(model, batch), reference, dim=-1)


@pytest.mark.parametrize(
    "recipe,mean_min",
    [
        ("w8a8-dynamic", 0.995),  # 0.9973
        ("w8a16", 0.999),  # 0.99943
        ("w4a16", 0.95),  # 0.9546
        ("bf16", 0.9999),  # 0.99998
    ],
)
def test_recipes_on_minilm(minilm, recipe, mean_min):
    model, _, batch, reference = minilm
    quantized = copy.deepcopy(model)
    report = bitsmith.quantize_(quantized, bitsmith.load_recipe(recipe))
    assert len(report.quantized) == 40  # 3 embeddings + 6 x 6 linears + pooler
    assert _cosines(quantized, batch, reference).mean() >= mean_min


def test_rules_are_ordered_and_regex_targets_names():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64), nn.Embedding(10, 128))
    config = QuantizeConfig.model_validate(
        {"rules": [
            {"targets": ["re:2"], "scheme": {"weights": {"dtype": "int4", "granularity": 64, "symmetric": False}}},
            {"targets": ["Linear"], "scheme": {"weights": {"dtype": "int8"}, "activations": {}}},
        ], "ignore": ["Embedding"]}
    )
    bitsmith.quantize_(model, config)
    assert isinstance(model[0], Int8DynamicLinear)
    assert isinstance(model[2], IntxWeightOnlyLinear) and model[2].group_size == 64
    assert isinstance(model[3], nn.Embedding)  # ignored


def test_partial_last_group_is_quantized_as_compressed_tensors_stores_it():
    model = nn.Sequential(nn.Linear(128, 32), nn.Linear(96, 8))
    config = QuantizeConfig.model_validate(
        {"rules": [{"targets": ["Linear"], "scheme": {"weights": {"dtype": "int4", "granularity": 64}}}]}
    )
    bitsmith.quantize_(model, config)
    assert model[1].weight_scale.shape == (8, 2)  # groups of 64 and 32


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _unchanged(model, before):
    state, types = before
    now = model.state_dict()
    return [type(m) for m in model.modules()] == types and now.keys() == state.keys() and all(
        torch.allclose(state[k], now[k], rtol=0, atol=0, equal_nan=True) if state[k].is_floating_point()
        else torch.equal(state[k], now[k]) for k in state)


def test_a_failure_found_up_front_changes_nothing():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        model[1].weight[3, 4] = float("nan")  # the second layer: the first would have been replaced already
    before = _state(model)
    with pytest.raises(BitsmithError, match="layer '1' has NaN or infinite weights"):
        bitsmith.quantize_(model, bitsmith.load_recipe("w8a16"))
    assert _unchanged(model, before)


class _Blocks(nn.Module):
    """A tiny model of repeated blocks (what GPTQ, AWQ and SmoothQuant need), each Linear-ReLU-Linear."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.parametrize("recipe", ["gptq-w4a16", "w8a8-static", "awq-w4a16"])
def test_a_batch_the_model_rejects_mid_way_leaves_it_as_it_was(recipe):
    """The third calibration batch has the wrong width: the model fails there, after GPTQ has replaced
    layers of the first blocks (or BatchNorm was folded...), and must come back exactly as it was."""
    torch.manual_seed(0)
    model = _Blocks()
    config = bitsmith.load_recipe(recipe).model_copy(deep=True)
    if recipe == "awq-w4a16":
        quantize = config.stages_of(bitsmith.QuantizeConfig)[0]
        config = quantize.model_copy(update={"mappings": [bitsmith.recipe.MappingSpec(prev="0", layers=["2"])]})
    good = [torch.randn(4, 32) for _ in range(2)]
    before = _state(model)
    with pytest.raises(BitsmithError, match="a calibration batch does not fit the model"):
        bitsmith.quantize_(model, config, calibration=[*good, torch.randn(4, 31)])
    assert _unchanged(model, before)
    report = bitsmith.quantize_(model, config, calibration=good)  # and the same model then quantizes fine
    assert len(report.quantized) == 6


def test_smoothquant_failure_restores_folded_norms(monkeypatch):
    """A failure after SmoothQuant folded its scales (into LayerNorms and weights) and hooked the layers it
    could not fold into: every norm, weight and hook is back as it was."""
    import bitsmith.stages.quantize as quantize_module
    from bitsmith.zoo.minilm import load_minilm

    model, tokenizer = load_minilm()
    before = _state(model)
    batch = dict(tokenizer(["a sentence", "another one"], padding=True, return_tensors="pt"))

    def fail(*args, **kwargs):
        raise BitsmithError("injected failure after smoothing")

    monkeypatch.setattr(quantize_module, "collect_activation_stats", fail)
    with pytest.raises(BitsmithError, match="injected failure after smoothing"):
        bitsmith.quantize_(model, bitsmith.load_recipe("smoothquant-w8a8"), calibration=[batch])
    assert _unchanged(model, before)
    assert not any(m._forward_pre_hooks for m in model.modules())  # no smoothing hook left behind
    assert not any("input_smooth" in m._buffers for m in model.modules())


def test_rule_naming_a_layer_it_cannot_quantize_is_an_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    config = QuantizeConfig.model_validate(
        {"rules": [{"targets": ["0"], "scheme": {"weights": {"dtype": "int4", "granularity": 8}}}]}
    )
    with pytest.raises(BitsmithError, match=r"layer '0' \(Conv2d\), named by rule 1: Conv2d is quantized only by"
                                            " static schemes"):
        bitsmith.quantize_(model, config)
    assert isinstance(model[0], nn.Conv2d)


@pytest.mark.parametrize("scheme,message", [
    ({"weights": {"dtype": "int8", "granularity": 64}, "activations": {}}, "not groups"),
    ({"weights": {"dtype": "int4", "symmetric": False}, "activations": {}}, "need symmetric integer weights"),
    ({"weights": {"dtype": "fp16", "granularity": 64}}, "fp16 weights take no granularity"),
    ({"weights": {"dtype": "bf16", "symmetric": False, "clip": "mse"}}, "bf16 weights take no clip, symmetric"),
    ({"weights": {"dtype": "int4", "granularity": 64, "algorithm": "awq", "clip": "mse"}}, "awq searches its own"),
    ({"weights": {"dtype": "int8"}, "activations": {"observer": "entropy"}}, "an observer chooses a static range"),
])
def test_schemes_that_cannot_run_as_written_are_refused(scheme, message):
    with pytest.raises(BitsmithError, match=message):
        bitsmith.recipe.config_from_dict({"rules": [{"targets": ["Linear"], "scheme": scheme}]})


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_int5_to_int7_run_save_and_load(bits, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(7, 64)
    reference = model(x)
    config = QuantizeConfig.model_validate({"rules": [
        {"targets": ["Linear"], "scheme": {"weights": {"dtype": f"int{bits}", "granularity": 16, "symmetric": False}}}]})
    float_copy = copy.deepcopy(model)
    report = bitsmith.quantize_(model, config)
    assert report.quantized == {"0": f"w{bits} g16 asym a16", "2": f"w{bits} g16 asym a16"}
    error = (model(x) - reference).pow(2).mean() / reference.pow(2).mean()
    assert error < {5: 3e-3, 6: 8e-4, 7: 2e-4}[bits]  # measured 1.1e-3 / 2.8e-4 / 6.6e-5
    bitsmith.save(model, tmp_path / "m")
    assert torch.equal(bitsmith.load(tmp_path / "m", model=float_copy)(x), model(x))


def test_nan_weights_are_refused():
    model = nn.Sequential(nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight[3, 4] = float("nan")
    with pytest.raises(BitsmithError, match="layer '0' has NaN or infinite weights"):
        bitsmith.quantize_(model, bitsmith.load_recipe("w8a16"))
    assert isinstance(model[0], nn.Linear)


def test_unsupported_layer_matched_by_a_pattern_is_reported_not_dropped():
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Linear(8, 8))
    config = QuantizeConfig.model_validate(
        {"rules": [{"targets": ["re:0", "Linear"], "scheme": {"weights": {"dtype": "int8"}}}]}
    )
    report = bitsmith.quantize_(model, config)
    assert "Conv1d is not a layer type bitsmith quantizes" in report.skipped["0"]
    assert isinstance(model[0], nn.Conv1d) and "1" in report.quantized


def test_embedding_table_is_int8_per_row(minilm):
    model = copy.deepcopy(minilm[0])
    bitsmith.quantize_(model, bitsmith.load_recipe("w8a8-dynamic"))
    table = model.embeddings.word_embeddings
    assert isinstance(table, QuantizedEmbedding) and table.weight_codes.shape == (30522, 384)
    assert table.weight_scale.shape == (30522, 1)


def test_a_table_tied_to_a_float_head_is_quantized_as_asked_and_the_report_says_it_untied():
    """LLM recipes keep lm_head in float; a rule for the tied table is followed, and the untying reported."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    report = bitsmith.quantize_(model, bitsmith.QuantizeConfig.model_validate({"rules": [
        {"targets": ["Embedding"], "scheme": {"weights": {"dtype": "int8"}}},
        {"targets": ["Linear"], "scheme": {"weights": {"dtype": "int4", "granularity": 32, "symmetric": False}}}],
        "ignore": ["lm_head"]}))
    assert "was tied to lm_head, which stays in float: now untied" in report.notes["model.embed_tokens"]
    assert "model.embed_tokens" not in report.skipped
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32
    ids = torch.randint(0, 256, (1, 8))
    assert torch.isfinite(model(ids).logits).all()
