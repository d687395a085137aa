"""The prune_structured stage: FFN channels and heads of BERT- and Llama-like blocks, convolution channels with
their BatchNorm, the saved smaller model loaded by bitsmith and by plain transformers, and what it refuses."""

import copy

import pytest
import torch
import transformers
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import bitsmith
from bitsmith import BitsmithError
from bitsmith.recipe import Recipe, StructuredPruneConfig, config_from_dict


def _llama(kv_heads=2, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    return BertModel(config).eval()


def _batches(n=4, seed=1, length=32):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (4, length), generator=g)} for _ in range(n)]


def _config(targets, fraction, **extra):
    return config_from_dict({"rules": [{"targets": targets, "fraction": fraction}], **extra}, StructuredPruneConfig)


def _error(model, reference, batch, field="logits"):
    with torch.inference_mode():
        out = getattr(model(**batch), field)
    return ((out - reference).norm() / reference.norm()).item()


def test_llama_ffn_shrinks_uniformly_and_loads_in_plain_transformers(tmp_path):
    model, batches, held_out = _llama(), _batches(), _batches(1, seed=9)[0]
    with torch.inference_mode():
        reference = model(**held_out).logits
    pruned = copy.deepcopy(model)
    report = bitsmith.prune_(pruned, _config(["ffn"], 0.25), calibration=batches)
    mlp = pruned.model.layers[1].mlp
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (192, 192, 192)
    assert pruned.config.intermediate_size == 192 and model.config.intermediate_size == 256
    summary = report.stages[0].summary
    assert summary["structured"]["model.layers.0.ffn"] == {"kept": 192, "of": 256}
    assert summary["transformers_loadable"] and summary["parameters_after"] < summary["parameters_before"]
    assert _error(pruned, reference, held_out) < 0.3  # measured 0.16 (a random model: every channel matters)
    bitsmith.save(pruned, tmp_path / "out")
    with torch.inference_mode():
        expected = pruned(**held_out).logits
        loaded = bitsmith.load(tmp_path / "out")
        assert torch.equal(loaded(**held_out).logits, expected)
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert torch.allclose(plain(**held_out).logits, expected, atol=1e-5)
    meta = bitsmith.read_metadata(tmp_path / "out")
    assert meta["shapes"]["model.layers.0.mlp.down_proj"]["tensors"]["weight"] == [128, 192]


def test_llama_heads_go_by_key_value_group():
    model, batches = _llama(kv_heads=2), _batches()
    pruned = copy.deepcopy(model)
    report = bitsmith.prune_(pruned, _config(["heads"], 0.5), calibration=batches)
    attention = pruned.model.layers[0].self_attn
    # 2 key/value groups of 2 query heads each: one group goes, with its two query heads
    assert attention.k_proj.out_features == attention.v_proj.out_features == 32
    assert attention.q_proj.out_features == attention.o_proj.in_features == 64
    assert attention.num_key_value_groups == 2
    assert pruned.config.num_attention_heads == 2 and pruned.config.num_key_value_heads == 1
    assert "1 of 2 key/value groups kept" in report.stages[0].layers["model.layers.0.self_attn.q_proj"]["done"]
    with torch.inference_mode():
        out = pruned(**batches[0]).logits
    assert torch.isfinite(out).all() and out.shape == (4, 32, 256)


def test_bert_heads_and_ffn_are_restored_by_bitsmith_load_only_when_config_cannot_say(tmp_path):
    model, batches = _bert(), _batches()
    with torch.inference_mode():
        reference = model(**batches[0]).last_hidden_state
    pruned = copy.deepcopy(model)
    recipe = Recipe.model_validate({"name": "heads-and-ffn", "stages": [
        {"prune_structured": {"rules": [{"targets": ["heads"], "fraction": 0.25}, {"targets": ["ffn"], "fraction": 0.5}]}}]})
    report = bitsmith.prune_(pruned, recipe, calibration=batches)
    attention = pruned.encoder.layer[0].attention.self
    assert attention.num_attention_heads == 3 and attention.all_head_size == 48 and attention.query.out_features == 48
    assert pruned.encoder.layer[0].intermediate.dense.out_features == 128
    assert pruned.config.intermediate_size == 128 and pruned.config.num_attention_heads == 4  # heads: not expressible
    assert not report.stages[0].summary["transformers_loadable"]
    assert any("bitsmith.load only" in note for note in report.notes.values())
    assert _error(pruned, reference, batches[0], "last_hidden_state") < 0.5
    bitsmith.save(pruned, tmp_path / "out")
    with torch.inference_mode():
        loaded = bitsmith.load(tmp_path / "out")
        assert loaded.encoder.layer[1].attention.self.num_attention_heads == 3
        assert torch.equal(loaded(**batches[0]).last_hidden_state, pruned(**batches[0]).last_hidden_state)


def test_different_sizes_per_block_keep_the_config_and_say_so(tmp_path):
    model, batches = _llama(), _batches()
    config = config_from_dict({"rules": [{"targets": ["model.layers.0.ffn"], "fraction": 0.5},
                                         {"targets": ["ffn"], "fraction": 0.25}]}, StructuredPruneConfig)
    report = bitsmith.prune_(model, config, calibration=batches)
    assert model.model.layers[0].mlp.up_proj.out_features == 128 and model.model.layers[1].mlp.up_proj.out_features == 192
    assert model.config.intermediate_size == 256 and not report.stages[0].summary["transformers_loadable"]
    bitsmith.save(model, tmp_path / "out")
    with torch.inference_mode():
        assert torch.equal(bitsmith.load(tmp_path / "out")(**batches[0]).logits, model(**batches[0]).logits)
    with pytest.raises(Exception, match="size mismatch|mismatched_sizes"):  # plain transformers refuses, never guesses
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 10))

    def forward(self, x):
        return self.head(self.features(x))


def _convnet():
    torch.manual_seed(0)
    model = _ConvNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_conv_channels_with_batchnorm_and_the_flattened_linear(tmp_path):
    model = _convnet()
    images = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    held_out = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(99))
    with torch.inference_mode():
        reference = model(held_out)
    pruned = copy.deepcopy(model)
    report = bitsmith.prune_(pruned, _config(["Conv2d"], 0.25), calibration=images)
    f = pruned.features
    assert (f[0].out_channels, f[1].num_features, f[3].in_channels, f[3].out_channels, f[4].num_features) == (12, 12, 12, 24, 24)
    assert f[7].in_channels == 24 and f[7].out_channels == 24 and pruned.head[1].in_features == 24 * 16
    assert set(report.stages[0].summary["structured"]) == {"features.0", "features.3", "features.7"}
    assert "instead of a least-squares refit" in report.notes["head.1"]  # 32 images for 385 columns
    with torch.inference_mode():
        error = ((pruned(held_out) - reference).norm() / reference.norm()).item()
    plain = copy.deepcopy(model)
    bitsmith.prune_(plain, _config(["Conv2d"], 0.25, update="none"), calibration=images)
    with torch.inference_mode():
        plain_error = ((plain(held_out) - reference).norm() / reference.norm()).item()
    assert error < 0.75 * plain_error, (error, plain_error)  # the refit pays (measured 0.135 vs 0.214)
    bitsmith.save(pruned, tmp_path / "out")
    restored = bitsmith.load(tmp_path / "out", model=_convnet())  # a float instance, resized on load
    with torch.inference_mode():
        assert torch.equal(restored(held_out), pruned(held_out))


def test_structured_then_quantize_runs_as_one_recipe():
    model, batches = _llama(), _batches()
    recipe = Recipe.model_validate({"name": "shrink-then-int8", "stages": [
        {"prune_structured": {"rules": [{"targets": ["ffn"], "fraction": 0.5}]}},
        {"quantize": {"rules": [{"targets": ["Linear"], "scheme": {"weights": {"dtype": "int8", "granularity": "channel"}}}],
                      "ignore": ["lm_head"]}}]})
    report = bitsmith.prune_(model, recipe, calibration=batches)
    assert type(model.model.layers[0].mlp.down_proj).__name__ != "Linear"
    assert model.model.layers[0].mlp.down_proj.in_features == 128 and len(report.quantized) == 14


def test_refusals_leave_the_model_untouched():
    model = _llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match="fraction must be in"):
        _config(["ffn"], 1.0)
    with pytest.raises(BitsmithError, match="no layer group of this model"):
        bitsmith.prune_(model, _config(["model.layers.7.ffn"], 0.5), calibration=_batches())
    with pytest.raises(BitsmithError, match="does not fit the model"):  # fails inside the block runner
        bitsmith.prune_(model, _config(["ffn"], 0.5), calibration=[{"input_ids": torch.full((1, 8), 999)}])
    assert model.config.intermediate_size == 256 and model.model.layers[0].mlp.up_proj.out_features == 256
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    quantized = copy.deepcopy(model)
    bitsmith.quantize_(quantized, bitsmith.load_recipe("w8a16"))
    with pytest.raises(BitsmithError, match="already quantized"):
        bitsmith.prune_(quantized, _config(["ffn"], 0.5), calibration=_batches())
    with pytest.raises(Exception, match="comes after quantize"):
        Recipe.model_validate({"name": "x", "stages": ["w8a16" and {"quantize": {"rules": []}},
                                                        {"prune_structured": {"rules": [{"targets": ["ffn"], "fraction": 0.5}]}}]})


class _Blocks(nn.Module):  # repeated blocks of no known family
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_model_of_no_known_family_is_refused_with_one_line():
    with pytest.raises(BitsmithError, match="needs a known model family") as err:
        bitsmith.prune_(_Blocks(), _config(["ffn"], 0.5), calibration=[torch.randn(2, 8)])
    assert "\n" not in str(err.value)
