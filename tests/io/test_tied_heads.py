"""A tied embedding quantized on its own (the LLM recipes' int8 table beside a float lm_head) saves and loads."""

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
