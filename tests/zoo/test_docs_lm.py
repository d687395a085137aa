import dataclasses
import inspect
import json
import logging
import math

import pytest
import torch

from bitsmith.errors import BitsmithError
from bitsmith.zoo import docs_lm
from bitsmith.zoo.pinned import PINNED_ENV, can_pin

# a recipe that builds in seconds, for the cache and determinism tests
TINY = dataclasses.replace(
    docs_lm.RECIPE, vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, window=32, batch_size=2, steps=3, warmup_steps=1,
)


@pytest.fixture
def tiny_split(monkeypatch):
    """Six train and two held-out topic pages instead of the whole corpus."""
    texts = [text for _, text in docs_lm.documents()[:8]]
    monkeypatch.setattr(docs_lm, "_split_documents", lambda: (texts[:6], texts[6:]))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_documents_are_deterministic():
    first = docs_lm.documents()
    docs_lm.documents.cache_clear()
    again = docs_lm.documents()
    assert again == first and again is not first
    names = [name for name, _ in first]
    assert names[0].startswith("topic:") and "module:json" in names and "module:builtins" in names
    assert len(names) == len(set(names)) and len(names) > 300  # 395 on Python 3.11
    assert not any("idlelib" in n or "tkinter" in n or n.startswith("module:test.") for n in names)


def test_docstrings_are_collected_where_defined_and_once():
    docs = dict(docs_lm.documents())
    decoder = inspect.getdoc(json.JSONDecoder)  # defined in json.decoder, re-exported by json
    assert decoder in docs["module:json.decoder"] and decoder not in docs["module:json"]
    assert sum(decoder in text for text in docs.values()) == 1
    assert inspect.getdoc(json) in docs["module:json"]


def test_documents_ignore_what_other_libraries_add_to_the_stdlib():
    import transformers.utils.logging  # noqa: F401  (puts warning_once and friends on logging.Logger)

    assert hasattr(logging.Logger, "warning_once")
    docs_lm.documents.cache_clear()
    logging_doc = dict(docs_lm.documents())["module:logging"]
    assert "TRANSFORMERS_NO_ADVISORY_WARNINGS" not in logging_doc and inspect.getdoc(logging.Logger) in logging_doc


def test_split_is_fixed_and_disjoint():
    train, heldout = docs_lm.split_corpus()
    assert (train, heldout) == docs_lm.split_corpus() and heldout == docs_lm.heldout_text()
    train_docs, heldout_docs = docs_lm._split_documents()
    assert len(train_docs) + len(heldout_docs) == len(docs_lm.documents())
    assert 15 <= len(heldout_docs) <= 50  # 29 of 395
    heldout_names = [name for name, _ in docs_lm.documents() if docs_lm._is_heldout(name)]
    assert {"topic:import", "topic:with", "module:decimal", "module:ssl", "module:unittest.mock"} <= set(heldout_names)
    assert not set(train_docs) & set(heldout_docs)
    assert 0.05 <= len(heldout) / (len(train) + len(heldout)) <= 0.15  # 0.092
    assert len(docs_lm.corpus()) > 1_000_000  # 1,683,437 characters
    assert all(doc not in train for doc in heldout_docs)


def test_calibration_texts_come_from_the_train_split():
    train, heldout = docs_lm.split_corpus()
    texts = docs_lm.calibration_texts(64)
    assert texts == docs_lm.calibration_texts(64) and len(set(texts)) == 64
    assert all(500 <= len(t) <= 2000 and t in train and t not in heldout for t in texts)
    with pytest.raises(BitsmithError, match="calibration texts"):
        docs_lm.calibration_texts(100_000)


def test_tokenizer_training_is_deterministic_and_round_trips():
    texts = [text for _, text in docs_lm.documents()[:20]]
    tokenizer = docs_lm.train_tokenizer(texts, vocab_size=512)
    again = docs_lm.train_tokenizer(texts, vocab_size=512)
    assert tokenizer.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    assert len(tokenizer) == 512
    assert [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id] == [0, 1, 2]
    unseen = "naïve café ✓ \t tabs\n\n    >>> print('\\u2603')"  # bytes the training text may lack
    assert tokenizer.decode(tokenizer(unseen)["input_ids"]) == unseen


def test_perplexity_windows_and_reference(tiny_split):
    texts = docs_lm._split_documents()[0]
    tokenizer = docs_lm.train_tokenizer(texts, vocab_size=320)
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(docs_lm.llama_config(TINY, tokenizer)).eval()
    text = texts[0]
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    result = docs_lm.perplexity(model, tokenizer, text, window=64)
    full, rest = divmod(n, 64)
    assert result["windows"] == full + (rest >= 16)
    assert result["tokens"] == full * 63 + (rest - 1 if rest >= 16 else 0)
    # sliding windows score every token but the first exactly once
    sliding = docs_lm.perplexity(model, tokenizer, text, window=64, stride=16)
    assert sliding["tokens"] == n - 1
    # one window equals the model's own loss on it
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:64]])
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss.item()
    one = docs_lm.perplexity(model, tokenizer, text, window=64, max_windows=1)
    assert one["windows"] == 1 and one["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_too_short_text_is_an_error(tiny_split):
    tokenizer = docs_lm.train_tokenizer(docs_lm._split_documents()[0], vocab_size=320)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(docs_lm.llama_config(TINY, tokenizer)).eval()
    for text in ("", "def f(): pass"):
        with pytest.raises(BitsmithError, match="too short for one window of 256 tokens") as error:
            docs_lm.perplexity(model, tokenizer, text)
        assert "\n" not in str(error.value)
    with pytest.raises(BitsmithError, match="window"):
        docs_lm.perplexity(model, tokenizer, "x" * 1000, window=1)


def test_tiny_build_is_deterministic_cached_and_atomic(tmp_path, monkeypatch, tiny_split):
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path))
    rng, flag, threads = torch.get_rng_state(), torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    path = docs_lm.build_docs_lm(recipe=TINY)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global state is left alone
    assert torch.are_deterministic_algorithms_enabled() == flag and torch.get_num_threads() == threads
    model, _ = docs_lm.load_docs_lm(TINY)
    first = _state(model)
    info = json.loads((path / "bitsmith_zoo.json").read_text())
    assert info["recipe"] == dataclasses.asdict(TINY) and info["heldout"]["perplexity"] > 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the model is cached")

    with monkeypatch.context() as patch:
        patch.setattr(docs_lm, "train_docs_lm", no_training)
        assert docs_lm.model_dir(TINY) == path

    for corrupt in (b"not a safetensors file", (path / "model.safetensors").read_bytes()[:100]):
        (path / "model.safetensors").write_bytes(corrupt)
        assert docs_lm.model_dir(TINY) == path
        rebuilt, _ = docs_lm.load_docs_lm(TINY)
        assert all(torch.equal(v, first[k]) for k, v in rebuilt.state_dict().items())  # training is deterministic
    assert docs_lm.build_docs_lm(force=True, recipe=TINY) == path
    assert [p.name for p in (tmp_path / "zoo").iterdir()] == [path.name]  # no temp directories left behind


def test_model_directory_is_an_ordinary_transformers_llama(docs_lm_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = docs_lm.model_dir()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "bitsmith_zoo.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] >= 4
    assert config["hidden_size"] % 128 == 0 and config["intermediate_size"] % 128 == 0

    model, tokenizer = docs_lm_model
    auto_model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    auto_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    text = docs_lm.heldout_text()[:2000]
    ids = auto_tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, tokenizer(text, return_tensors="pt")["input_ids"])
    with torch.inference_mode():
        assert torch.equal(auto_model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_tokenizer_round_trip_on_heldout_text(docs_lm_model):
    _, tokenizer = docs_lm_model
    text = docs_lm.heldout_text()[:20_000]
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(text) / len(ids) > 3.0  # 3.86 characters per token
    assert len(tokenizer) == docs_lm.RECIPE.vocab_size


def test_heldout_perplexity_is_the_recorded_one(docs_lm_model):
    """The figure the build recorded is the built model's: measured again here over all held-out windows (the
    build ran with pinned numerics, this process with its own kernels: equal to rounding)."""
    model, tokenizer = docs_lm_model
    result = docs_lm.perplexity(model, tokenizer, docs_lm.heldout_text())
    recorded = docs_lm.figures()
    assert result["windows"] == recorded["windows"] and result["tokens"] == recorded["tokens"]
    assert result["perplexity"] == pytest.approx(recorded["heldout_perplexity"], rel=1e-4)
    assert math.isfinite(result["perplexity"]) and result["perplexity"] < 160  # a trained model: 132.27 here
    info = json.loads((docs_lm.model_dir() / "bitsmith_zoo.json").read_text())
    assert info["numerics"] == PINNED_ENV if can_pin() else isinstance(info["numerics"], str)

    # the same architecture untrained is close to uniform over the vocabulary
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = LlamaForCausalLM(model.config).eval()
    random_init = docs_lm.perplexity(untrained, tokenizer, docs_lm.heldout_text(), max_windows=8)
    result = docs_lm.perplexity(model, tokenizer, docs_lm.heldout_text(), max_windows=8)
    assert random_init["perplexity"] > 2000  # 4339, near the 4096 of a uniform guess
    assert random_init["perplexity"] > 20 * result["perplexity"]  # 36x
