"""bitsmith's GGUF exports in llama.cpp itself (llama-cpp-python, ``make llama-cpp``; skipped without it): each
block type loads, generates, and gives bitsmith's logits on the same tokens.

llama.cpp multiplies quantized weights by activations it quantizes to 8 bits per block of 32 (Q8_0 / Q8_1), so
its logits differ from bitsmith's fp32 ones by that rounding: the test allows a mean absolute difference of 2% of
the logits' spread and asks the same next token at 90% of positions (measured on docs-lm: 0.40% Q4_0, 0.40% Q4_1,
0.35% Q8_0, 0.56% Q4_K, 0.55% Q6_K). The K-quant files are re-quantized on export, so their reference is the file's
own weights as transformers' GGUF reader dequantizes them (an earlier version compared them with the int8 model they
came from, and took Q4_K's own rounding, 3.4% of the spread, for llama.cpp disagreeing)."""

import copy

import numpy as np
import pytest
import torch

import bitsmith
from bitsmith.export.gguf import export_gguf

llama_cpp = pytest.importorskip("llama_cpp")

SCHEMES = {  # docs-lm quantized so that each block type is written from bitsmith's codes, or re-quantized
    "q4_0": ({"weights": {"dtype": "int4", "granularity": 32, "symmetric": True}}, "q8_0"),
    "q4_1": ({"weights": {"dtype": "int4", "granularity": 32, "symmetric": False}}, "q8_0"),
    "q8_0": ({"weights": {"dtype": "int8", "granularity": 32, "symmetric": True}}, "q8_0"),
    "q4_k": ({"weights": {"dtype": "int8", "granularity": "channel", "symmetric": True}}, "q4_k"),  # re-quantized
    "q6_k": ({"weights": {"dtype": "int8", "granularity": "channel", "symmetric": True}}, "q6_k"),
}


@pytest.fixture(scope="module")
def exported(docs_lm_model, tmp_path_factory):
    """{block type: (bitsmith model, GGUF path)}, docs-lm's every matrix in that type: from bitsmith's codes, or
    (q4_k) quantized again on export from int8 per-channel codes."""
    model, tokenizer = docs_lm_model
    root, out = tmp_path_factory.mktemp("llamacpp"), {}
    for name, (scheme, gguf_type) in SCHEMES.items():
        quantized = copy.deepcopy(model)
        bitsmith.quantize_(quantized, bitsmith.QuantizeConfig.model_validate(
            {"rules": [{"targets": ["Embedding", "Linear"], "scheme": scheme}]}))
        path = root / f"{name}.gguf"
        export_gguf(quantized, tokenizer, path, gguf_type=gguf_type)
        out[name] = (quantized, path)
    return out


def _tokens(tokenizer) -> list[int]:
    from bitsmith.zoo.docs_lm import heldout_text

    return tokenizer(heldout_text()[:2000])["input_ids"][:128]


REQUANTIZED = {"q4_k", "q6_k"}  # int8 per-channel codes quantized again on export: the file's own weights differ


@pytest.mark.parametrize("name", list(SCHEMES))
def test_llama_cpp_runs_the_export_and_agrees_with_bitsmith(exported, docs_lm_model, name):
    model, path = exported[name]
    tokens = _tokens(docs_lm_model[1])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens)
    theirs = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    if name in REQUANTIZED:  # the file's own weights (transformers' GGUF reader), not the int8 ones they came from
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    with torch.inference_mode():
        ours = model(input_ids=torch.tensor([tokens])).logits[0].float().numpy()
    spread, mean_diff = ours.std(), np.abs(theirs - ours).mean()
    same_next = (theirs.argmax(-1) == ours.argmax(-1)).mean()
    assert mean_diff < 0.02 * spread, f"{name}: mean |diff| {mean_diff:.4f}, logit spread {spread:.3f}"
    assert same_next >= 0.9, f"{name}: same next token at {same_next:.1%} of positions"
    print(f"{name}: mean |diff| {mean_diff:.4f} ({mean_diff / spread:.2%} of the spread), same next {same_next:.1%}")
    llm.reset()
    text = llm.create_completion("The json module", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert text.strip(), f"{name}: llama.cpp generated nothing"
