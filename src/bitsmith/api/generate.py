"""``bitsmith generate MODEL --prompt TEXT``: text from a causal language model, float or compressed.

The model is loaded as ``bitsmith.load`` loads it (a compressed directory runs on bitsmith's modules and
kernels) and generates with transformers' ``generate``: greedy by default, sampling with ``temperature`` > 0
(and ``top_k`` / ``top_p``), seeded. When the tokenizer has a chat template (an instruct model's), the prompt
is one user turn in it, unless ``chat=False``. Prompt processing (prefill) and decoding are timed apart: the
first new token's time is the prefill's, the rest are decode steps.

``decoder`` picks what runs the decode steps: ``torch`` (transformers' ``generate`` on bitsmith's modules),
``native`` (``bitsmith.nn.decode``: a Llama-family model at batch 1, a whole block a native call, on the int4
codes as stored or float32 weights: the same math, summed in another order) or ``native-q8`` (the same step
with the input of each int4 matmul rounded to int8 in blocks of 32, as llama.cpp's Q4_0/Q4_1 matmuls do: faster,
a different numeric, only when asked). A model the native step cannot run gets one line saying why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from bitsmith.errors import BitsmithError
from bitsmith.io.models import load_model

__all__ = ["generate", "check_sampling", "DECODERS"]

DECODERS = ("torch", "native", "native-q8")


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 1:
        raise BitsmithError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise BitsmithError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k < 0:
        raise BitsmithError(f"--top-k must be 0 (off) or positive, got {top_k}")
    if not 0 < top_p <= 1:
        raise BitsmithError(f"--top-p must be in (0, 1], got {top_p}")


def _causal_lm(model, name: str) -> None:
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    if not (hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()):
        raise BitsmithError(f"{name} is not a language model that generates text ({architectures[0]});"
                            " generate needs a causal LM such as docs-lm or smollm2")


def _prompt_ids(tokenizer, prompt: str, chat: bool | None) -> tuple[dict, bool]:
    """(input_ids and attention_mask of the prompt, whether the chat template was used)."""
    templated = bool(getattr(tokenizer, "chat_template", None)) and chat is not False
    if chat and not templated:
        raise BitsmithError("--chat: this model's tokenizer has no chat template")
    if templated:
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}, templated


class _Clock:
    """A transformers streamer that times each step and hands decoded text on as it comes."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None, prompt_length: int):
        self.tokenizer, self.on_text, self.prompt_length = tokenizer, on_text, prompt_length
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.shown = ""

    def put(self, value: torch.Tensor) -> None:
        if not self.times:  # the first call is the prompt itself
            self.times.append(time.perf_counter())
            return
        self.times.append(time.perf_counter())
        self.tokens += value.reshape(-1).tolist()
        if self.on_text is not None:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # a byte of a character still to come
                self.on_text(text[len(self.shown):])
                self.shown = text

    def end(self) -> None:
        pass


def generate(model: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, chat: bool | None = None,
             on_text: Callable[[str], None] | None = None, decoder: str = "torch") -> dict:
    """Generate from ``model`` (a zoo name or directory); ``on_text`` receives the text as it is decoded."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if decoder not in DECODERS:
        raise BitsmithError(f"--decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if not prompt:
        raise BitsmithError("--prompt is empty; give the text to continue")
    loaded = load_model(model)
    if loaded.tokenizer is None:
        raise BitsmithError(f"{model} has no tokenizer files; generate needs the model's tokenizer")
    _causal_lm(loaded.model, model)
    inputs, templated = _prompt_ids(loaded.tokenizer, prompt, chat)
    length = inputs["input_ids"].shape[1]
    clock = _Clock(loaded.tokenizer, on_text, length)
    torch.manual_seed(seed)
    if decoder == "torch":
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or None, "top_p": top_p} \
            if temperature > 0 else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        pad = (loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None
               else loaded.tokenizer.eos_token_id)
        start = time.perf_counter()
        with torch.inference_mode():
            output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=clock, pad_token_id=pad,
                                           **sampling)
        new = output[0, length:]
    else:
        start = time.perf_counter()
        new = _native_generate(loaded.model, inputs["input_ids"], max_new_tokens, temperature, top_k, top_p, clock,
                               activations="q8" if decoder == "native-q8" else "float32",
                               stop=_stop_ids(loaded.model, loaded.tokenizer))
    steps = clock.times[1:]
    prefill = steps[0] - start if steps else None
    decode = steps[-1] - steps[0] if len(steps) > 1 else None
    return {
        "model": model, "compressed": loaded.compressed, "chat_template": templated, "decoder": decoder,
        "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed} if temperature > 0
        else "greedy",
        "prompt_tokens": length, "new_tokens": int(new.numel()),
        "text": loaded.tokenizer.decode(new, skip_special_tokens=True),
        "prefill_seconds": round(prefill, 4) if prefill is not None else None,
        "decode_tokens_per_second": round((len(steps) - 1) / decode, 2) if decode else None,
    }


def _stop_ids(model, tokenizer) -> set[int]:
    """The token ids that end generation: the generation config's end-of-sequence ids, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])


def _next_token(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, top_k: int, top_p: float) -> int:
    """Greedy (temperature 0), or a sample from the logits through transformers' own temperature, top-k and top-p
    warpers (what ``generate`` applies with the same options); ``tokens`` are the ids so far."""
    if temperature == 0:
        return int(logits.argmax())
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    scores = warpers(tokens[None], logits.float()[None])[0]
    return int(torch.multinomial(scores.softmax(-1), 1))


def _native_generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int,
                     top_p: float, clock: _Clock, activations: str, stop: set[int]) -> torch.Tensor:
    from bitsmith.nn.decode import NativeDecoder, unsupported

    problem = unsupported(model)
    if problem:
        raise BitsmithError(f"--decoder native: {problem}; --decoder torch runs it")
    decoder = NativeDecoder(model, max_len=input_ids.shape[1] + max_new_tokens, activations=activations)
    clock.put(input_ids)
    logits = decoder.prefill(input_ids)
    tokens: list[int] = []
    while True:
        token = _next_token(logits, torch.cat([input_ids[0], torch.tensor(tokens, dtype=torch.long)]), temperature,
                            top_k, top_p)
        tokens.append(token)
        clock.put(torch.tensor([token]))
        if token in stop or len(tokens) == max_new_tokens:
            break
        logits = decoder.step(token)
    return torch.tensor(tokens)
