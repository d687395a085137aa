"""Real English text that ships with Python: paragraphs of its own documentation (``pydoc_data.topics``)."""

from __future__ import annotations

import functools
import random

__all__ = ["doc_sentences"]


@functools.cache
def _paragraphs() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            text = " ".join(block.split())
            # prose only: skip code samples, tables, and grammar rules
            if 40 <= len(text) <= 400 and text[0].isalpha() and "::=" not in text and ">>>" not in text:
                paragraphs.append(text)
    return tuple(dict.fromkeys(paragraphs))  # drop repeats, keep order


def doc_sentences(count: int = 64, split: str = "eval", seed: int = 0) -> list[str]:
    """``count`` paragraphs of Python's documentation, drawn with a fixed seed.

    ``split="eval"`` and ``split="calib"`` are disjoint halves (even / odd positions after shuffling).
    """
    items = list(_paragraphs())
    random.Random(seed).shuffle(items)
    half = items[0::2] if split == "eval" else items[1::2]
    return half[:count]
