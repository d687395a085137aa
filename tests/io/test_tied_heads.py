"""Saved models that once failed to load: a tied embedding quantized on its own, an all-zero group."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import bitsmith
from bitsmith.recipe import QuantizeConfig, config_from_dict


def test_a_quantized_table_untied_from_its_float_head_round_trips(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)).eval()
    config = config_from_dict({"rules": [
        {"targets": ["Embedding"], "scheme": {"weights": {"dtype": "int8", "granularity": "channel"}}},
        {"targets": ["Linear"], "scheme": {"weights": {"dtype": "int4", "granularity": 32, "symmetric": False}}}],
        "ignore": ["lm_head"]}, QuantizeConfig)
    bitsmith.quantize_(model, config)
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens).__name__ == "QuantizedEmbedding"
    bitsmith.save(model, tmp_path / "m")
    loaded = bitsmith.load(tmp_path / "m")  # once: AttributeError from transformers' tie_weights
    ids = torch.randint(0, 256, (2, 16))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_group_pruning_left_all_zero_saves_and_loads(tmp_path):
    """An all-zero group's range is 0: its scale must survive the 16-bit storage as a positive number (it
    underflowed to 0 and load refused the checkpoint: smollm2 after sparsegpt-50-w4a16)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 8))
    with torch.no_grad():
        model[0].weight[:3, :32] = 0.0  # three rows' first group: every weight pruned
    config = config_from_dict({"rules": [{"targets": ["Linear"], "scheme": {"weights": {
        "dtype": "int4", "granularity": 32, "symmetric": False}}}]}, QuantizeConfig)
    bitsmith.quantize_(model, config)
    assert (model[0].weight_scale > 0).all()
    bitsmith.save(model, tmp_path / "m")
    fresh = torch.nn.Sequential(torch.nn.Linear(128, 8))
    loaded = bitsmith.load(tmp_path / "m", model=fresh)
    x = torch.randn(4, 128)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    assert (loaded[0].dequantize()[:3, :32] == 0).all()
