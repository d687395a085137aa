"""Zoo entry ``docs-lm``: a small Llama causal language model trained by bitsmith on Python's own documentation.

Corpus: the ``pydoc_data.topics`` pages plus the docstrings of the standard library (module, class, function
and method docstrings of every importable public stdlib module, in sorted order, each docstring kept once).
A *document* is one topic page or one module's docstrings. The split is by document and fixed: a document is
held out when ``sha256("<seed>:<name>") % 10 == 0`` (about 10%). Hashing the name rather than counting
positions keeps a module on the same side of the split when another Python version adds or drops modules.

The tokenizer is a byte-level BPE (``tokenizers``) trained on the train split only; the model is a
``transformers.LlamaForCausalLM`` trained from scratch with AdamW on random 256-token windows of the train
split, deterministically (seeded, deterministic kernels, one thread: bitwise repeatable on one machine).
The build takes 5-9 minutes on two shared CPU cores and is cached as an ordinary transformers directory
(config, safetensors, generation config, tokenizer files, plus ``bitsmith_zoo.json`` with the recipe, the
held-out perplexity and the build time) in ``$BITSMITH_CACHE/zoo`` (default ``~/.cache/bitsmith/zoo``).

    field                   | value
    vocab_size              | 4096 byte-level BPE tokens (<s>, </s>, <pad> included)
    hidden_size             | 256
    intermediate_size       | 768 (SwiGLU)
    num_hidden_layers       | 4
    num_attention_heads     | 4 (head_dim 64)
    num_key_value_heads     | 2 (grouped-query attention: k_proj, v_proj are 256 -> 128)
    tie_word_embeddings     | False (lm_head is its own Linear, quantizable like the others)
    max_position_embeddings | 512 (trained on 256-token windows)
    parameters              | 5,245,184 (float32)

Its evaluation is perplexity over fixed-length windows of held-out text (``perplexity``); the build records
it in ``bitsmith_zoo.json`` (``figures()``): 132.27 over the 175 windows of 256 tokens of the held-out split on
Python 3.11, built with pinned numerics (zoo/pinned.py; an untrained model of the same shape: ~4300).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.nn import functional as F

from bitsmith.errors import BitsmithError
from bitsmith.zoo.cache import read_built_dir, write_built_dir, zoo_root

__all__ = [
    "TrainRecipe",
    "documents",
    "corpus",
    "split_corpus",
    "heldout_text",
    "calibration_texts",
    "train_tokenizer",
    "llama_config",
    "train_docs_lm",
    "build_docs_lm",
    "model_dir",
    "load_docs_lm",
    "perplexity",
    "load",
    "build",
    "is_built",
    "figures",
]

NAME = "docs-lm"
HELDOUT_EVERY = 10  # one document in 10 (by name hash) is held out: 29 of 395, 155k characters
SPLIT_SEED = 0
MIN_WINDOW_TOKENS = 16  # a trailing partial window shorter than this is not scored
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2



# ---------------------------------------------------------------------------------------------------- corpus


@functools.cache
def documents() -> tuple[tuple[str, str], ...]:
    """``(name, text)`` of every document: ``topic:<key>`` pages, then ``module:<name>`` docstrings, sorted.

    Collected by ``_stdlib_docs.py`` in a child interpreter that sees the standard library only (``python -I
    -S``): what the caller imported or patched (transformers puts ``warning_once`` on ``logging.Logger``, a test
    may patch a module) cannot reach the corpus, and the caller's process is not made to import every stdlib
    module. The result depends on the Python version, not on the caller.
    """
    script = Path(__file__).with_name("_stdlib_docs.py")
    with tempfile.TemporaryDirectory(prefix="bitsmith-docs-") as tmp:
        out = Path(tmp) / "documents.json"
        done = subprocess.run([sys.executable, "-I", "-S", str(script), str(out)], cwd=tmp,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=600)
        if done.returncode != 0 or not out.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise BitsmithError(f"collecting Python's documentation for docs-lm failed: {last}")
        return tuple((name, text) for name, text in json.loads(out.read_text(encoding="utf-8")))


def _is_heldout(name: str) -> bool:
    digest = hashlib.sha256(f"{SPLIT_SEED}:{name}".encode()).hexdigest()
    return int(digest, 16) % HELDOUT_EVERY == 0


def _split_documents() -> tuple[list[str], list[str]]:
    """(train document texts, held-out document texts), both in ``documents()`` order."""
    train, heldout = [], []
    for name, text in documents():
        (heldout if _is_heldout(name) else train).append(text)
    return train, heldout


def corpus() -> str:
    """All documents, separated by blank lines (about 1.7 million characters on Python 3.11)."""
    return "\n\n".join(text for _, text in documents())


def split_corpus() -> tuple[str, str]:
    """``(train_text, heldout_text)``: the fixed split by document, each side's documents joined by blank lines."""
    train, heldout = _split_documents()
    return "\n\n".join(train), "\n\n".join(heldout)


def heldout_text() -> str:
    """The held-out documents, joined by blank lines: the text ``docs-lm`` is evaluated on."""
    return split_corpus()[1]


def calibration_texts(n: int = 128, max_chars: int = 2000, seed: int = 0) -> list[str]:
    """``n`` pieces of train-split text (never held-out text), drawn with a fixed seed, for GPTQ/AWQ calibration.

    A piece is consecutive paragraphs of one train document, up to ``max_chars`` characters (about 500
    tokens; a single longer paragraph is cut). Pieces under a quarter of ``max_chars`` are not used.
    """
    pieces = []
    for text in _split_documents()[0]:
        piece = ""
        for paragraph in text.split("\n\n"):
            if piece and len(piece) + 2 + len(paragraph) > max_chars:
                pieces.append(piece)
                piece = ""
            piece = f"{piece}\n\n{paragraph}" if piece else paragraph[:max_chars]
        pieces.append(piece)
    pieces = [p for p in pieces if len(p) >= max_chars // 4]
    if n > len(pieces):
        raise BitsmithError(f"docs-lm has {len(pieces)} calibration texts, fewer than the {n} asked for")
    random.Random(seed).shuffle(pieces)
    return pieces[:n]


# ------------------------------------------------------------------------------------------ tokenizer, model


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """How ``train_docs_lm`` builds the model; the cache entry is keyed by this recipe and the Python version."""

    version: int = 2  # bump when the training code changes in a way these fields do not show (2: pinned numerics)
    vocab_size: int = 4096  # BPE vocabulary including the special tokens
    hidden_size: int = 256
    intermediate_size: int = 768  # SwiGLU width; a multiple of 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # head_dim = hidden_size / heads = 64
    num_key_value_heads: int = 2  # grouped-query attention, two query heads per key/value head
    window: int = 256  # tokens per training sequence
    # compute, not text, is what runs out: at a fixed number of tokens, more and smaller steps learn more
    # (held-out perplexity after 328k tokens: 262 with 160 steps of 8 windows, 202 with 320 steps of 4)
    batch_size: int = 4  # sequences per step: 1024 tokens
    steps: int = 768  # 786k tokens, ~1.9 passes over the train split: 5 minutes at 2,500 tokens/s, 9 at 1,500
    lr: float = 1e-3  # peak; linear warm-up, then cosine decay to lr * min_lr_ratio (2e-3: same, 3e-3: worse)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # on matrices only, not on norms
    grad_clip: float = 1.0
    seed: int = 0


RECIPE = TrainRecipe()


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``; bos ``<s>``, eos ``</s>``, pad ``<pad>``.

    It adds no special tokens when encoding (``tokenizer(text)`` is the plain BPE ids); every byte is in the
    vocabulary, so there is no unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    bos, eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=model_max_length
    )


def llama_config(recipe: TrainRecipe, tokenizer):
    """The ``LlamaConfig`` of the recipe, with the tokenizer's vocabulary size and special token ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=2 * recipe.window,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _init_weights(model: torch.nn.Module, recipe: TrainRecipe) -> None:
    """transformers' N(0, 0.02) init, but the projections that write into the residual stream scaled down.

    With o_proj and down_proj at 0.02 / sqrt(2 * layers) (GPT-2's rule) each block starts close to the
    identity; measured held-out perplexity after 160 steps: 372 with the plain init, 262 with this.
    """
    std = 0.02 / math.sqrt(2 * recipe.num_hidden_layers)
    for name, parameter in model.named_parameters():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            torch.nn.init.normal_(parameter, std=std)


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """(N,) int64: each text's BPE ids followed by ``</s>``, all texts concatenated."""
    ids = []
    for encoded in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)


def _lr_factor(step: int, recipe: TrainRecipe) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine down to ``min_lr_ratio``."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    matrices = [p for p in model.parameters() if p.ndim >= 2]  # projections and embeddings decay
    vectors = [p for p in model.parameters() if p.ndim < 2]  # RMSNorm weights do not
    groups = [{"params": matrices, "weight_decay": recipe.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8)


def _train_steps(
    model: torch.nn.Module,
    stream: torch.Tensor,  # (N,) int64 token ids
    recipe: TrainRecipe,
    generator: torch.Generator,
    progress: Callable[[str], None] | None,
) -> float:
    """Trains ``model`` in place; returns the mean loss of the last 10% of steps."""
    optimizer = _optimizer(model, recipe)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    offsets = torch.arange(recipe.window)  # (T,)
    tail = []
    model.train()
    for step in range(recipe.steps):
        starts = torch.randint(0, stream.numel() - recipe.window + 1, (recipe.batch_size, 1), generator=generator)
        batch = stream[starts + offsets]  # (B, T): random windows of the stream
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels by one itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        if step >= recipe.steps - max(1, recipe.steps // 10):
            tail.append(loss.item())
        if progress is not None and (step + 1) % 10 == 0:
            progress(f"training step {step + 1}/{recipe.steps}, loss {loss.item():.3f}")
    return sum(tail) / len(tail)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels on one thread inside; the caller's flag, threads and global RNG state afterwards.

    One thread: the sums inside a matmul then do not depend on the core count, and on a shared machine one
    thread trains faster than two fighting other jobs for two cores (measured at load 7-9: 1,450-1,650
    tokens/s on one thread, 300-780 on two).
    """
    flag, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(flag)
        torch.set_num_threads(threads)


def train_docs_lm(recipe: TrainRecipe = RECIPE, progress: Callable[[str], None] | None = None):
    """``(LlamaForCausalLM in eval mode, tokenizer, facts)`` trained on the train split; same machine, same weights.

    ``facts`` is a dict about the data and training (document counts, tokens, seconds, final loss).
    """
    from transformers import LlamaForCausalLM

    say = progress or (lambda message: None)
    started = time.perf_counter()
    say("collecting Python documentation")
    train_docs, heldout_docs = _split_documents()
    say("training the tokenizer")
    tokenizer = train_tokenizer(train_docs, recipe.vocab_size, model_max_length=2 * recipe.window)
    stream = _token_stream(tokenizer, train_docs)
    with _deterministic():
        torch.manual_seed(recipe.seed)  # initial weights
        generator = torch.Generator().manual_seed(recipe.seed)  # window positions
        model = LlamaForCausalLM(llama_config(recipe, tokenizer))
        _init_weights(model, recipe)
        train_started = time.perf_counter()
        final_loss = _train_steps(model, stream, recipe, generator, progress)
        train_threads = torch.get_num_threads()
    facts = {
        "corpus_sha256": hashlib.sha256(corpus().encode()).hexdigest(),  # tells Python versions' corpora apart
        "train_documents": len(train_docs),
        "heldout_documents": len(heldout_docs),
        "train_chars": sum(map(len, train_docs)),
        "heldout_chars": sum(map(len, heldout_docs)),
        "train_tokens": stream.numel(),
        "trained_tokens": recipe.steps * recipe.batch_size * recipe.window,
        "final_train_loss": round(final_loss, 4),
        "train_seconds": round(time.perf_counter() - train_started, 1),
        "train_threads": train_threads,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return model.eval(), tokenizer, facts


# ---------------------------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    window: int = 256,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 8,
) -> dict:
    """Perplexity of ``text``: exp of the mean next-token negative log-likelihood over fixed-length windows.

    The text is tokenized without special tokens and cut into windows of ``window`` tokens starting every
    ``stride`` tokens (default: ``window``, so windows do not overlap). Each window is one independent
    forward pass; it scores the tokens no earlier window scored (with the default stride, all but its
    first). A trailing window shorter than 16 tokens is dropped. Returns ``perplexity``, ``nll`` (mean, in
    nats), ``tokens`` (tokens scored) and ``windows``.
    """
    stride = window if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise BitsmithError(f"perplexity needs window >= 2 and 1 <= stride <= window, not {window} and {stride}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # quiet: longer than the model
    if len(ids) < window:
        raise BitsmithError(f"text too short for one window of {window} tokens (it has {len(ids)}); give more text")
    spans = []  # (begin, end, first scored position) per window
    scored_until = 1  # token 0 has no context
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        if end - begin < min(MIN_WINDOW_TOKENS, window):
            break
        spans.append((begin, end, scored_until))
        scored_until = end
        if end == len(ids):
            break
    spans = spans[:max_windows]
    device = next(model.parameters()).device
    # padding sits after each window's tokens and is never scored (causal attention): any id will do,
    # and many tokenizers (Llama's) have no pad token
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    total_nll, total_tokens = 0.0, 0
    for first in range(0, len(spans), batch_size):
        group = spans[first : first + batch_size]
        width = max(end - begin for begin, end, _ in group)
        batch = torch.full((len(group), width), pad_id, dtype=torch.int64)  # (B, T)
        targets = torch.full((len(group), width), -100, dtype=torch.int64)  # -100: not scored
        for row, (begin, end, score_from) in enumerate(group):
            batch[row, : end - begin] = torch.tensor(ids[begin:end])
            targets[row, score_from - begin : end - begin] = batch[row, score_from - begin : end - begin]
        output = model(input_ids=batch.to(device))
        logits = (output.logits if hasattr(output, "logits") else output)[:, :-1].float()  # (B, T-1, V)
        targets = targets[:, 1:].to(device)  # (B, T-1): the next token at each position
        total_nll += F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum").item()
        total_tokens += int((targets != -100).sum())
    nll = total_nll / total_tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": total_tokens, "windows": len(spans)}


# --------------------------------------------------------------------------------------------------- cache


def _cache_path(recipe: TrainRecipe) -> Path:
    # the docstrings differ between Python versions; the hash only tells entries apart, bitsmith_zoo.json says more
    python = "{}.{}".format(*sys.version_info[:2])
    key = hashlib.sha256((python + json.dumps(dataclasses.asdict(recipe), sort_keys=True)).encode())
    return zoo_root() / f"{NAME}-{key.hexdigest()[:16]}"


def _is_complete(path: Path, recipe: TrainRecipe) -> bool:
    """True when ``path`` holds a whole build of ``recipe``: metadata, readable weights and tokenizer."""
    info = read_built_dir(path, "lm_head.weight")
    return info is not None and info.get("recipe") == dataclasses.asdict(recipe)


def build_docs_lm(
    force: bool = False, progress: Callable[[str], None] | None = None, recipe: TrainRecipe = RECIPE
) -> Path:
    """The cache directory of the built model: trained, evaluated and saved when missing, broken or ``force``."""
    import transformers

    from bitsmith.zoo import pinned

    path = _cache_path(recipe)
    if not force and _is_complete(path, recipe):
        return path
    if recipe == RECIPE and pinned.can_pin() and not pinned.in_pinned_child():
        # the zoo's own model: trained with every numeric library held to AVX2 and one thread (zoo/pinned.py),
        # so every x86-64 machine gets the same weights and figures
        pinned.run_pinned(f"from bitsmith.zoo import docs_lm, pinned\n"
                          f"docs_lm.build_docs_lm(force={force!r}, progress=pinned.child_progress)", progress)
        if not _is_complete(path, recipe):
            raise BitsmithError(f"the docs-lm build ended without a complete model in {path}")
        return path
    started = time.perf_counter()
    model, tokenizer, facts = train_docs_lm(recipe, progress)
    if progress is not None:
        progress("held-out perplexity")
    heldout = perplexity(model, tokenizer, heldout_text(), window=recipe.window)
    info = {
        "model": NAME,
        "recipe": dataclasses.asdict(recipe),
        "heldout": {
            "perplexity": round(heldout["perplexity"], 3),
            "window": recipe.window,
            "tokens": heldout["tokens"],
            "windows": heldout["windows"],
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": {
            "source": "pydoc_data.topics + standard-library docstrings",
            "split": f"held out when sha256('{SPLIT_SEED}:<document name>') % {HELDOUT_EVERY} == 0",
            **facts,
        },
        "build_seconds": round(time.perf_counter() - started, 1),
        "numerics": pinned.PINNED_ENV if pinned.in_pinned_child() else "this machine's own kernels (not pinned)",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if progress is not None:
        progress("saving")
    if not force and _is_complete(path, recipe):  # another process finished the same build meanwhile
        return path
    write_built_dir(path, model, tokenizer, info)
    return path


def is_built(recipe: TrainRecipe = RECIPE) -> bool:
    """Whether the model directory is complete in the cache (no training needed)."""
    return _is_complete(_cache_path(recipe), recipe)


def model_dir(recipe: TrainRecipe = RECIPE) -> Path:
    """The transformers directory of ``docs-lm`` (built on first use, 5-9 minutes)."""
    return build_docs_lm(recipe=recipe)


def load_docs_lm(recipe: TrainRecipe = RECIPE):
    """``(LlamaForCausalLM in eval mode, tokenizer)`` from the cache, built first on a miss."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = model_dir(recipe)
    model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def load():
    """The zoo interface (bitsmith.zoo): (model, tokenizer), built first on a miss."""
    return load_docs_lm()


def build(force: bool = False, progress=None) -> dict:
    path = build_docs_lm(force=force, progress=progress)
    info = json.loads((path / "bitsmith_zoo.json").read_text())
    return {"path": str(path), "heldout_perplexity": info["heldout"]["perplexity"], "parameters": info["parameters"],
            "build_seconds": info["build_seconds"]}


def figures(recipe: TrainRecipe = RECIPE) -> dict | None:
    """The figures recorded when the cached model was built: held-out perplexity and its window count."""
    path = _cache_path(recipe)
    if not _is_complete(path, recipe):
        return None
    info = json.loads((path / "bitsmith_zoo.json").read_text())
    return {"heldout_perplexity": info["heldout"]["perplexity"], "windows": info["heldout"]["windows"],
            "tokens": info["heldout"]["tokens"]}
