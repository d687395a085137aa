"""bitsmith's GGUF files in llama.cpp: GPTQ / AWQ codes against llama.cpp-style round-to-nearest, same size.

smollm2's (or ``--model``'s) float model is written two ways per block type, and llama.cpp (llama-cpp-python,
``make llama-cpp``) computes the perplexity of each on the same windows of docs-lm's held-out Python documentation:

    rtn-q4_0   the float model exported with --gguf-type q4_0: every matrix rounded to nearest by the gguf
               package's reference quantizer (llama.cpp's own Q4_0 without an importance matrix)
    imatrix-q4_0  the built-in imatrix-q4_0 recipe: llama.cpp's importance-matrix idea done by bitsmith (int4 g32
               symmetric, each group's scale of least error weighted by the calibration inputs' mean squares),
               exported as Q4_0: the fairer round-to-nearest baseline (printed beside GPTQ, not a target)
    gptq-q4_0  the built-in gptq-q4_0 recipe (int4 g32 symmetric, GPTQ on the calibration windows), exported:
               its codes written as Q4_0 as they are; the embedding, kept float by the recipe, rounded to Q4_0
    rtn-q4_1 / gptq-q4_1   the same for Q4_1 (int4 g32 asymmetric; each block's minimum rounded to fp16)
    awq-q4_1   the built-in awq-q4_1 recipe (int4 g32 asymmetric after AWQ), exported as Q4_1 (printed)

Every file holds the same tensors in the same block types, so the sizes are equal (printed). Each recipe runs in
a process of its own (``--calib-samples`` windows of 256 tokens of docs-lm's train split). ``--model docs-lm``
runs the same on docs-lm (trained by bitsmith in float). On smollm2, Q4_1 compares nothing: its zoo weights are
the dequantized Q4_1 blocks of the file it ships in, so round-to-nearest Q4_1 at group 32 gives them back exactly.

Targets (issue 13; the exit status is 1 if one fails): gptq-q4_0's perplexity in llama.cpp below rtn-q4_0's,
and gptq-q4_1's below rtn-q4_1's, at the same file size.

    .venv/bin/python bench/bench_gguf.py [--calib-samples 64] [--windows 32] [--threads 2]
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import bench_parser, finish, machine_line, parse, run_child

ROWS = {"rtn-q4_0": (None, "q4_0"), "imatrix-q4_0": ("imatrix-q4_0", "q4_0"), "gptq-q4_0": ("gptq-q4_0", "q4_0"),
        "rtn-q4_1": (None, "q4_1"), "gptq-q4_1": ("gptq-q4_1", "q4_1"), "awq-q4_1": ("awq-q4_1", "q4_1")}
WINDOW = 256


def export_worker(args) -> int:
    """The row's recipe on ``args.model`` (none: the float model), written as GGUF to ``args.out``."""
    import bitsmith
    from bitsmith.evaluation.tasks import task_for
    from bitsmith.export.gguf import export_gguf
    from bitsmith.io.models import load_model

    recipe, gguf_type = ROWS[args.worker]
    loaded = load_model(args.model)
    if recipe is not None:
        task = task_for(loaded.source, loaded.tokenizer, None, model=loaded.model)
        bitsmith.run_stages(loaded.model, bitsmith.load_recipe(recipe), task.calibration(None, args.calib_samples))
    result = export_gguf(loaded.model, loaded.tokenizer, args.out, gguf_type=gguf_type)
    print(json.dumps({"bytes": Path(args.out).stat().st_size, "notes": len(result.get("notes", []))}))
    return 0


def windows(model: str, count: int) -> list[list[int]]:
    from bitsmith.io.models import load_model
    from bitsmith.zoo.docs_lm import heldout_text

    tokenizer = load_model(model).tokenizer
    ids = tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]
    return [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(min(count, len(ids) // WINDOW))]


def llama_perplexity(path: Path, chunks: list[list[int]], threads: int) -> float:
    """exp(mean next-token cross-entropy) of every window, each evaluated from an empty context in llama.cpp."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=WINDOW, n_batch=WINDOW, logits_all=True, verbose=False,
                          n_threads=threads, n_threads_batch=threads)
    total, count = 0.0, 0
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk)
        logits = torch.from_numpy(np.array(llm.scores[: len(chunk) - 1], dtype=np.float32))
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


def main(argv=None) -> int:
    parser = bench_parser(__doc__, repeats=1, json_option=False)
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration windows for GPTQ, AWQ, imatrix")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of 256 tokens")
    parser.add_argument("--model", default="smollm2", help="a Llama-family zoo model: smollm2 or docs-lm")
    parser.add_argument("--worker", help=__import__("argparse").SUPPRESS)
    parser.add_argument("--out", type=Path, help=__import__("argparse").SUPPRESS)
    args = parse(parser, argv)
    if args.worker:
        return export_worker(args)
    print(machine_line())
    chunks = windows(args.model, args.windows)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ROWS:
            path = Path(folder) / f"{name}.gguf"
            rows[name] = run_child([sys.executable, __file__, "--threads", str(args.threads), "--calib-samples",
                                    str(args.calib_samples), "--model", args.model, "--worker", name, "--out",
                                    str(path)])
            rows[name]["perplexity"] = llama_perplexity(path, chunks, args.threads)
            print(f"{name}: {rows[name]['bytes'] / 1e6:.2f} MB, perplexity in llama.cpp {rows[name]['perplexity']:.4f}",
                  flush=True)
    print(f"\n## {args.model} GGUF files in llama.cpp ({len(chunks)} held-out windows of {WINDOW} tokens; GPTQ and"
          f" AWQ on {args.calib_samples} calibration windows)")
    print("| file | MB | perplexity in llama.cpp |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['bytes'] / 1e6:.2f} | {row['perplexity']:.4f} |")
    checks = []
    for method, rtn in (("gptq-q4_0", "rtn-q4_0"), ("gptq-q4_1", "rtn-q4_1")):
        same_size = rows[method]["bytes"] == rows[rtn]["bytes"]
        checks.append((f"{args.model} {method} below llama.cpp-style round-to-nearest {rtn[4:].upper()} in llama.cpp,"
                       f" same file size", same_size and rows[method]["perplexity"] < rows[rtn]["perplexity"]))
    gptq, imatrix = rows["gptq-q4_0"]["perplexity"], rows["imatrix-q4_0"]["perplexity"]
    print(f"gptq-q4_0 against the importance-weighted round-to-nearest imatrix-q4_0: {gptq:.4f} vs {imatrix:.4f}"
          f" ({'below' if gptq < imatrix else 'not below'}; rtn-q4_0 {rows['rtn-q4_0']['perplexity']:.4f})")
    print(f"awq-q4_1 {rows['awq-q4_1']['perplexity']:.4f} against rtn-q4_1 {rows['rtn-q4_1']['perplexity']:.4f}")
    return finish(checks)


if __name__ == "__main__":
    sys.exit(main())
