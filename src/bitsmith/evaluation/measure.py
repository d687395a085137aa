"""Measurements: fidelity to the float model, latency on this machine, and size."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from bitsmith.errors import BitsmithError

__all__ = ["read_text", "read_sentences", "cosine_fidelity", "interleaved_latency", "eval_sentences"]


def read_text(path: str | Path) -> str:
    """A user's text file, whole; a missing, unreadable or blank file is a one-line BitsmithError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BitsmithError(f"text file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BitsmithError(f"cannot read text file {path}: {err}") from None
    if not text.strip():
        raise BitsmithError(f"text file {path} has no non-empty lines")
    return text


def read_sentences(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of a user's text file (one sentence or paragraph per line), all of them or ``limit``."""
    lines = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    return lines if limit is None else lines[:limit]


def eval_sentences(text: str | Path | None = None, count: int = 64) -> list[str]:
    """A user's sentences (every line of the file), or ``count`` paragraphs of Python's documentation."""
    from bitsmith.zoo.text import doc_sentences

    return read_sentences(text) if text else doc_sentences(count)


def cosine_fidelity(embeddings: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean and minimum cosine between matching rows of two (sentences, hidden) embedding tables."""
    cos = torch.nn.functional.cosine_similarity(embeddings.float(), reference.float(), dim=-1)
    if not torch.isfinite(cos).all():
        raise BitsmithError("the model produced NaN or infinite outputs")
    return {"mean_cosine": round(cos.mean().item(), 6), "min_cosine": round(cos.min().item(), 6)}


def interleaved_latency(runs: dict[str, callable], repeats: int = 5) -> dict[str, float]:
    """Median seconds of each callable, run in turn (a, b, a, b, ...) so that load from other
    processes on a shared machine falls on all of them alike. One warm-up call each."""
    if repeats < 1:
        raise BitsmithError(f"--repeats must be at least 1, got {repeats}")
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def no_grad_eval(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
