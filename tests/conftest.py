import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(2)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference.float() - approx.float()).pow(2).mean()
    return (10 * torch.log10(reference.float().pow(2).mean() / noise)).item()


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
