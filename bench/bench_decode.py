"""Decode speed on this CPU: smollm2's prompt processing (prefill) and decoding per scheme, beside the bandwidth floor.

Each variant runs in a process of its own (``--threads`` torch threads): smollm2 loaded, the variant's recipe
applied by round-to-nearest (no calibration: speed depends on the scheme and its kernels, not on how the codes
were chosen), then:

    prefill     one forward over a 512-token prompt (docs-lm's held-out Python documentation), median of
                ``--repeats``: prompt tokens per second (transformers' forward for every bitsmith row)
    decode b1   ``--tokens`` greedy steps of one token after a 32-token prompt: tokens per second
    decode b8   the same for 8 prompts at once: tokens per second over all 8 (transformers' rows only)
    ppl         perplexity of 512 held-out tokens, teacher-forced, after a 32-token start: what each row's
                numerics cost (the same tokens in llama.cpp's rows)

    variants: fp32 (the float model), bf16, w8a16 (int8 per channel), w4a16 (int4 g128 asymmetric; GPTQ's
    gptq-w4a16 stores the same layout and runs the same kernels), decoded by transformers' forward with its
    DynamicCache on bitsmith's modules; and the native decode step (``bitsmith.nn.decode``, ``generate
    --decoder native``: a Llama block a native call): fp32 native, w4a16 native (float32 activations: the
    w4a16 math), w4a16 native-q8 (each int4 matmul's input rounded to int8 in blocks of 32, as llama.cpp does),
    q4_0-layout native-q8 (int4 g32 symmetric: GGUF Q4_0's grouping)

The bandwidth floor of a variant is a streaming read rate measured in the same run (a 1 GiB float32 tensor
summed, median of 5) divided by the weight bytes read per token (every weight once; smollm2's output head is
its embedding table, so it is read whole): the most tokens per second decode at batch 1 could reach if it did
nothing but read weights.

With llama-cpp-python installed (``make llama-cpp``), llama.cpp runs beside them on its own Q4_0, Q4_1 and Q8_0
files of the same float model (written by ``export --format gguf``, blocks rounded to nearest by the gguf
package's reference quantizer), prefill and decode at batch 1 alike (batch 8: not measured).

Targets (issue 13; the exit status is 1 if one fails), on bitsmith's fastest int4 row at batch 1: at least 3x
bitsmith's fastest fp32 row (engine for engine: the native step's fp32 is faster than transformers' forward;
transformers' own w4a16 / fp32 ratio is printed too), and at least 0.8x llama.cpp's Q4_0 in the same run
(without llama.cpp: not measured, a failed target).

    .venv/bin/python bench/bench_decode.py [--tokens 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import bench_parser, finish, machine_line, parse, run_child

# name -> (recipe, native decoder activations or None for transformers' forward)
Q4_0_LAYOUT = {"version": 2, "name": "int4-g32-sym", "stages": [{"quantize": {"rules": [
    {"targets": ["Embedding"], "scheme": {"weights": {"dtype": "int8", "granularity": "channel", "symmetric": True}}},
    {"targets": ["Linear"], "scheme": {"weights": {"dtype": "int4", "granularity": 32, "symmetric": True}}}]}}]}
VARIANTS = {"fp32": (None, None), "bf16": ("bf16", None), "w8a16": ("w8a16", None), "w4a16": ("w4a16", None),
            "fp32 native": (None, "float32"), "w4a16 native": ("w4a16", "float32"),
            "w4a16 native-q8": ("w4a16", "q8"), "q4_0-layout native-q8": (Q4_0_LAYOUT, "q8")}
NATIVE_TARGET = "w4a16 native-q8"  # the int4 row held to the targets (the transformers-forward w4a16 row is shown)
PPL_TOKENS = 512  # held-out tokens scored, teacher-forced, after a PROMPT-token start
LLAMA_TYPES = ("q4_0", "q4_1", "q8_0")  # llama.cpp's own files of the same model, when llama-cpp-python is installed
PROMPT, PREFILL, BATCH = 32, 512, 8


def _prompts(tokenizer, count: int, length: int) -> torch.Tensor:
    from bitsmith.zoo.docs_lm import heldout_text

    ids = tokenizer(heldout_text()[:200_000], return_tensors="pt")["input_ids"][0]
    return torch.stack([ids[i * length:(i + 1) * length] for i in range(count)])


def _decode_rate(model, prompts: torch.Tensor, tokens: int) -> float:
    """Tokens per second of ``tokens`` greedy one-token steps after the prompts (cache filled first)."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=prompts, past_key_values=cache, use_cache=True)
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
            step = out.logits[:, -1].argmax(-1, keepdim=True)
        return prompts.shape[0] * tokens / (time.perf_counter() - start)


def _native_decode_rate(decoder, prompt: torch.Tensor, tokens: int) -> float:
    """Tokens per second of ``tokens`` greedy steps of the native decoder after the prompt."""
    logits = decoder.prefill(prompt)
    start = time.perf_counter()
    for _ in range(tokens):
        logits = decoder.step(int(logits.argmax()))
    return tokens / (time.perf_counter() - start)


def _perplexity(score_next) -> float:
    """exp of the mean negative log-likelihood of the held-out tokens, ``score_next(ids)`` giving the logits that
    predict ids[PROMPT:] (PPL_TOKENS of them)."""
    from bitsmith.zoo.docs_lm import heldout_text

    ids = _TOKENIZER(heldout_text()[100_000:130_000], return_tensors="pt")["input_ids"][0][:PROMPT + PPL_TOKENS]
    logits = score_next(ids)
    return float(torch.exp(torch.nn.functional.cross_entropy(logits.float(), ids[PROMPT:])))


_TOKENIZER = None


def worker(args) -> int:
    global _TOKENIZER
    import bitsmith
    from bitsmith.io.models import load_model, state_bytes

    loaded = load_model("smollm2")
    model, (recipe, native) = loaded.model, VARIANTS[args.worker]
    _TOKENIZER = loaded.tokenizer
    if recipe is not None:
        bitsmith.run_stages(model, bitsmith.load_recipe(recipe) if isinstance(recipe, str)
                            else bitsmith.Recipe.model_validate(recipe))
    model.eval()
    prefill_ids = _prompts(loaded.tokenizer, 1, PREFILL)
    prompts = _prompts(loaded.tokenizer, BATCH, PROMPT)
    if native is not None:
        from bitsmith.nn.decode import NativeDecoder

        decoder = NativeDecoder(model, max_len=PREFILL + PPL_TOKENS + 64, activations=native)
        _native_decode_rate(decoder, prompts[:1], 2)  # warm-up
        decode_b1 = statistics.median(_native_decode_rate(decoder, prompts[:1], args.tokens)
                                      for _ in range(args.repeats))

        def score_next(ids):
            rows = [decoder.prefill(ids[None, :PROMPT])]
            rows += [decoder.step(int(token)) for token in ids[PROMPT:-1]]
            return torch.stack(rows)

        row = {"decode_b1": decode_b1, "decode_b8": None, "perplexity": _perplexity(score_next),
               "kernels": [f"native block step, {native} activations" + (" (int8 in blocks of 32)" if native == "q8"
                                                                          else "")]}
    else:
        _decode_rate(model, prompts[:1], 2)  # warm-up: kernels chosen and laid out

        def score_next(ids):
            with torch.inference_mode():
                return model(input_ids=ids[None]).logits[0, PROMPT - 1:-1]

        row = {"decode_b1": statistics.median(_decode_rate(model, prompts[:1], args.tokens)
                                              for _ in range(args.repeats)),
               "decode_b8": _decode_rate(model, prompts, args.tokens), "perplexity": _perplexity(score_next),
               "kernels": sorted({f"{type(m).__name__}: {m.last_kernel[0]}" for m in model.modules()
                                  if getattr(m, "last_kernel", None)})}
    prefill = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            model(input_ids=prefill_ids, use_cache=True)
            prefill.append(PREFILL / (time.perf_counter() - start))
    row.update(prefill=statistics.median(prefill), weight_bytes=state_bytes(model))
    print(json.dumps(row))
    return 0


def llama_worker(args) -> int:
    """llama.cpp on its own GGUF of the float smollm2 (blocks rounded to nearest by the gguf package, llama.cpp's
    reference quantizer): prefill and decode at batch 1 fed the held-out tokens one at a time."""
    import tempfile

    import llama_cpp

    from bitsmith.export.gguf import export_gguf
    from bitsmith.io.models import load_model

    global _TOKENIZER
    gguf_type = args.worker.split(":")[1]
    loaded = load_model("smollm2")
    _TOKENIZER = loaded.tokenizer
    prefill_ids = _prompts(loaded.tokenizer, 1, PREFILL)[0].tolist()
    steps = _prompts(loaded.tokenizer, 1, PROMPT + args.tokens)[0].tolist()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"smollm2-{gguf_type}.gguf"
        export_gguf(loaded.model, loaded.tokenizer, path, gguf_type=gguf_type)
        del loaded
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=PREFILL, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
        llm.reset()
        llm.eval(steps[:PROMPT])  # warm-up
        prefill, decode = [], []
        for _ in range(args.repeats):
            llm.reset()
            start = time.perf_counter()
            llm.eval(prefill_ids)
            prefill.append(PREFILL / (time.perf_counter() - start))
            llm.reset()
            llm.eval(steps[:PROMPT])
            start = time.perf_counter()
            for token in steps[PROMPT:]:
                llm.eval([token])
            decode.append(args.tokens / (time.perf_counter() - start))
        del llm
        scorer = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=PREFILL, n_threads=args.threads,
                                 n_threads_batch=args.threads, logits_all=True, verbose=False)

        def score_next(ids):
            scorer.reset()
            scorer.eval(ids.tolist())
            return torch.from_numpy(scorer.scores[PROMPT - 1:len(ids) - 1].copy())

        row = {"prefill": statistics.median(prefill), "decode_b1": statistics.median(decode), "decode_b8": None,
               "perplexity": _perplexity(score_next), "weight_bytes": path.stat().st_size,
               "kernels": [f"llama.cpp {llama_cpp.__version__}"]}
    print(json.dumps(row))
    return 0


def read_bandwidth() -> float:
    """Bytes per second of a streaming read (a 1 GiB float32 tensor summed), median of 5."""
    data = torch.ones(2**28)
    data.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times)


def main(argv=None) -> int:
    parser = bench_parser(__doc__, repeats=3, json_option=False)
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--worker", help=__import__("argparse").SUPPRESS)
    args = parse(parser, argv)
    if args.worker:
        return llama_worker(args) if args.worker.startswith("llama:") else worker(args)
    print(machine_line())
    bandwidth = read_bandwidth()
    common = [sys.executable, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats),
              "--tokens", str(args.tokens)]
    rows = {}
    names = [*VARIANTS, *(f"llama:{t}" for t in LLAMA_TYPES if importlib.util.find_spec("llama_cpp"))]
    for name in names:
        rows[name] = run_child([*common, "--worker", name])
        print(f"{name}: decode b1 {rows[name]['decode_b1']:.1f} tokens/s", flush=True)
    print(f"\n## smollm2 decode (prefill {PREFILL} tokens; decode {args.tokens} steps after {PROMPT}-token prompts;"
          f" streaming read {bandwidth / 1e9:.1f} GB/s)")
    print("| variant | weight MB | prefill tokens/s | decode b1 tokens/s | decode b8 tokens/s | b1 floor tokens/s |"
          f" b1 / floor | held-out ppl ({PPL_TOKENS} tokens) | kernels |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        floor = bandwidth / row["weight_bytes"]
        b8 = f"{row['decode_b8']:.1f}" if row["decode_b8"] is not None else "not measured"
        print(f"| {name} | {row['weight_bytes'] / 1e6:.0f} | {row['prefill']:.0f} | {row['decode_b1']:.1f} |"
              f" {b8} | {floor:.1f} | {row['decode_b1'] / floor:.2f} | {row['perplexity']:.2f} |"
              f" {'; '.join(row['kernels'])} |")
    # held to the targets: bitsmith's fastest int4 row against its fastest fp32 row (the native step's fp32 is
    # faster than transformers' forward: the comparison is engine for engine) and against llama.cpp's Q4_0
    int4 = max((n for n in rows if "w4a16" in n or "q4_0-layout" in n), key=lambda n: rows[n]["decode_b1"])
    fp32 = max(("fp32", "fp32 native"), key=lambda n: rows[n]["decode_b1"])
    speedup = rows[int4]["decode_b1"] / rows[fp32]["decode_b1"]
    llama = rows.get("llama:q4_0")
    versus = rows[int4]["decode_b1"] / llama["decode_b1"] if llama else None
    print(f"\nfastest int4 ({int4}) / fastest fp32 ({fp32}) decode at batch 1: {speedup:.2f}x;"
          f" {int4} / llama.cpp Q4_0: "
          + (f"{versus:.2f}x" if versus else "llama.cpp not installed (make llama-cpp), not measured"))
    print(f"transformers' forward: w4a16 / fp32 {rows['w4a16']['decode_b1'] / rows['fp32']['decode_b1']:.2f}x")
    return finish([("smollm2 int4 decode at batch 1 at least 3x bitsmith's fp32 decode", speedup >= 3.0),
                   ("smollm2 int4 decode at batch 1 at least 0.8x llama.cpp's Q4_0",
                    versus is not None and versus >= 0.8)])


if __name__ == "__main__":
    sys.exit(main())
