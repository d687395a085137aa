import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(2)


def tiny_llama():
    """A 2-block Llama (hidden 64, vocab 64) with seeded random weights, in eval mode: for training and
    data-parallel tests that need a real causal LM but no real one's cost."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def outlier_llama(hidden: int, intermediate: int, kv_heads: int, channels: int, value: float,
                  norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm"), seed: int = 0):
    """A 2-block Llama (vocab 256, 4 heads) with seeded random weights, in eval mode, whose ``norms`` scale the first
    ``channels`` inputs of every block by ``value``: the outlier channels of trained LLMs, which AWQ, SmoothQuant,
    Wanda and imatrix answer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in norms:
                getattr(layer, norm).weight[:channels] = value
    return model


def llama_batches(n: int = 4, seed: int = 1) -> list[dict]:
    """``n`` seeded batches of 4 sequences of 32 token ids below 256, for ``outlier_llama``."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (4, 32), generator=g)} for _ in range(n)]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference.float() - approx.float()).pow(2).mean()
    return (10 * torch.log10(reference.float().pow(2).mean() / noise)).item()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """The bitsmith CLI in this process: (exit status, stdout, stderr)."""
    import sys

    from bitsmith.cli.main import main

    argv, sys.argv, code = sys.argv, ["bitsmith", *map(str, args)], 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def minilm():
    """(BertModel, tokenizer, batch of 16 real sentences, fp32 embeddings), loaded once."""
    from bitsmith.zoo.minilm import encode_batch, load_minilm, sentence_embeddings
    from bitsmith.zoo.text import doc_sentences

    model, tokenizer = load_minilm()
    batch = encode_batch(tokenizer, doc_sentences(16))
    return model, tokenizer, batch, sentence_embeddings(model, batch)


@pytest.fixture(scope="session")
def docs_lm_model():
    """(model, tokenizer) of the zoo model from the shared cache: built at most once per session (~10 minutes)."""
    from bitsmith.zoo import docs_lm

    return docs_lm.load_docs_lm()


def each_kernel(module, x: torch.Tensor, monkeypatch):
    """{candidate name: module(x) with that candidate forced} for every kernel the module offers here."""
    from bitsmith.nn import dispatch

    variable = "BITSMITH_KERNEL_" + module.family.upper().replace("-", "_")
    outputs = {}
    for name in module.kernel_names(rows=x.numel() // x.shape[-1]):
        monkeypatch.setenv(variable, name)
        dispatch.reset()
        with torch.inference_mode():
            outputs[name] = module(x)
        assert module.last_kernel[0] == name
    monkeypatch.delenv(variable)
    dispatch.reset()
    return outputs


class OpCounter:
    """Records every aten / onednn op that runs inside ``with OpCounter() as ops:`` (ops.names)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.names.append(str(func.overloadpacket))
                return func(*args, **(kwargs or {}))

        self.names = []
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


@pytest.fixture(scope="session")
def docs_lm_text(tmp_path_factory):
    """The first 12,000 characters of docs-lm's held-out text (11 windows of 256 tokens): for tests that evaluate a
    compressed docs-lm only to check that evaluation runs or agrees with itself, not to measure it (the full text is
    156 windows, most of a compress's time)."""
    from bitsmith.zoo.docs_lm import heldout_text

    path = tmp_path_factory.mktemp("docs-lm-text") / "heldout.txt"
    path.write_text(heldout_text()[:12000])
    return path


@pytest.fixture(scope="session")
def minilm_rows(tmp_path_factory):
    """A sensitivity row cache shared by the tests that analyze MiniLM's first block without testing the cache (the
    test of the cache works on a copy): each (candidate, layer) row is measured once per session."""
    return tmp_path_factory.mktemp("minilm-sensitivity-rows")
