"""bitsmith generate: greedy and sampled text from float and compressed causal LMs, the chat template, bad input."""

import pytest
import torch
from conftest import run_cli

import bitsmith
from bitsmith import BitsmithError
from bitsmith.api.generate import _prompt_ids, generate
from bitsmith.io.models import load_tokenizer

PROMPT = "The json module"


@pytest.fixture(scope="module")
def w4_docs_lm(tmp_path_factory, docs_lm_text):
    """docs-lm compressed to int4 weights (the int4 kernels run in generation), saved."""
    out = tmp_path_factory.mktemp("generate") / "w4"
    bitsmith.compress("docs-lm", "w4a16", out=out, text=docs_lm_text, repeats=1, calib_samples=8)
    return out


def _greedy_without_cache(model, tokenizer, prompt: str, count: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        for _ in range(count):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -count:].tolist()


def test_greedy_on_a_compressed_model_is_the_argmax_of_its_own_logits_with_the_kv_cache(w4_docs_lm):
    streamed = []
    result = generate(str(w4_docs_lm), PROMPT, max_new_tokens=16, on_text=streamed.append)
    model = bitsmith.load(w4_docs_lm)
    tokenizer = load_tokenizer(w4_docs_lm)
    expected = _greedy_without_cache(model, tokenizer, PROMPT, 16)
    assert result["compressed"] and result["sampling"] == "greedy" and result["new_tokens"] == 16
    assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert "".join(streamed) == result["text"]  # what the CLI prints as it comes is the whole text
    assert result["prefill_seconds"] > 0 and result["decode_tokens_per_second"] > 0


def test_the_native_decoder_gives_the_greedy_tokens_of_the_fp32_forward(w4_docs_lm, monkeypatch):
    from bitsmith.nn import dispatch, native

    if not native.available():
        pytest.skip("no native kernels here")
    monkeypatch.setenv("BITSMITH_KERNEL_W4A16", "dequant-fp32")  # the fp32 math the native step sums differently
    dispatch.reset()
    try:
        streamed = []
        result = generate(str(w4_docs_lm), PROMPT, max_new_tokens=16, decoder="native", on_text=streamed.append)
        model, tokenizer = bitsmith.load(w4_docs_lm), load_tokenizer(w4_docs_lm)
        expected = _greedy_without_cache(model, tokenizer, PROMPT, 16)
    finally:
        dispatch.reset()
    assert result["decoder"] == "native" and result["new_tokens"] == 16
    assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert "".join(streamed) == result["text"] and result["decode_tokens_per_second"] > 0
    q8 = generate(str(w4_docs_lm), PROMPT, max_new_tokens=16, decoder="native-q8", temperature=0.8, seed=1)
    assert q8["decoder"] == "native-q8" and q8["new_tokens"] >= 1 and q8["sampling"] != "greedy"


def test_sampling_repeats_with_its_seed_and_differs_from_greedy(w4_docs_lm):
    options = {"max_new_tokens": 24, "temperature": 1.0, "top_k": 50}
    first, again = (generate(str(w4_docs_lm), PROMPT, seed=3, **options) for _ in range(2))
    other = generate(str(w4_docs_lm), PROMPT, seed=4, **options)
    greedy = generate(str(w4_docs_lm), PROMPT, max_new_tokens=24)
    assert first["text"] == again["text"]
    assert first["text"] != other["text"] and greedy["text"] not in (first["text"], other["text"])


def test_the_chat_template_wraps_the_prompt_when_the_tokenizer_has_one(docs_lm_model):
    _, tokenizer = docs_lm_model
    assert _prompt_ids(tokenizer, PROMPT, None)[1] is False  # docs-lm has no template: raw text
    with pytest.raises(BitsmithError, match="has no chat template"):
        _prompt_ids(tokenizer, PROMPT, True)
    templated = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<reply>"
    ids, used = _prompt_ids(templated, PROMPT, None)
    assert used and ids["input_ids"][0].tolist() == tokenizer(f"<user>{PROMPT}</user><reply>")["input_ids"]
    assert _prompt_ids(templated, PROMPT, False)[0]["input_ids"][0].tolist() == tokenizer(PROMPT)["input_ids"]


@pytest.mark.parametrize("args,fragment", [
    (["minilm", "--prompt", "hi"], "minilm is not a language model that generates text"),
    (["docs-lm", "--prompt", "hi", "-n", "0"], "--max-new-tokens must be at least 1"),
    (["docs-lm", "--prompt", "hi", "--temperature", "-1"], "--temperature must be 0 (greedy) or positive"),
    (["docs-lm", "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["docs-lm", "--prompt", ""], "--prompt is empty"),
    (["nowhere/model", "--prompt", "hi"], "model not found: 'nowhere/model'"),
    (["docs-lm", "--prompt", "hi", "--decoder", "fast"], "--decoder must be one of torch, native, native-q8"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, fragment):
    code, _, stderr = run_cli(capsys, "generate", *args)
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], stderr


def test_the_cli_prints_the_text_then_the_speeds(capsys, w4_docs_lm):
    code, stdout, stderr = run_cli(capsys, "generate", str(w4_docs_lm), "--prompt", PROMPT, "-n", "8")
    assert code == 0, stderr
    assert stdout.strip() == generate(str(w4_docs_lm), PROMPT, max_new_tokens=8)["text"].strip()
    assert "8 tokens after a prompt of" in stderr and "tokens/s" in stderr
