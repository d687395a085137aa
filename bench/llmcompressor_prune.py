"""Prune a Llama checkpoint with llm-compressor's SparseGPT or Wanda, for side-by-side benchmarks.

Run with the interpreter of the separate llm-compressor virtual environment
(bench/.venv-llmcompressor), not bitsmith's own: llm-compressor pins its own
transformers / compressed-tensors versions.

    bench/.venv-llmcompressor/bin/python bench/llmcompressor_prune.py \
        --model MODEL_DIR --calib calib.pt --method sparsegpt --sparsity 0.5 --out OUT_DIR --json
    (or --pattern 2:4 for N:M sparsity)

--calib is a torch .pt file holding a LongTensor input_ids of shape (N, seq_len).
Only the oneshot() call is timed (wall seconds, plus process CPU seconds).

llm-compressor's arguments, as its 0.14 source has them (modifiers/pruning/):

    argument            | here                    | why
      sparsity          | --sparsity (2:4: 0.5)   | required even with a mask structure, which overrides it
      mask_structure    | "0:0" or "2:4"          | "N:M" prunes N of every M ("0:0": unstructured)
      targets           | ["Linear"]              | every Linear ...
      ignore            | ["re:.*lm_head"]        | ... but lm_head, dense as in bitsmith's recipes
      dampening_frac    | --damp (0.01, default)  | SparseGPT only; of mean(diag H), as bitsmith's damp_percent
      block_size        | --block-size (128)      | SparseGPT only; columns whose mask is chosen together
      sequential_targets| LlamaDecoderLayer       | its default (the model's no-split modules), named here

Its sequential pipeline runs one decoder layer at a time on the pruned outputs of the earlier layers, but
every Linear inside a layer is calibrated on that layer's unpruned inputs (q/k/v, o, gate/up and down
all at once), as bitsmith's SparseGPT does by default (``true_sequential: true`` is the other order).

The result is saved as llmcompressor_gptq.py saves its own (model.save_pretrained(..., save_compressed=True)),
with the tokenizer. compressed-tensors 0.19 has dropped its sparse formats (sparse-bitmask, sparse-24-bitmask:
"Sparse compression is no longer supported"), so a pruned float model is written as a plain transformers
checkpoint: dense float32 weights with the zeros in them, and no quantization_config in config.json.
``bitsmith.load`` refuses it (it reads bitsmith directories and compressed-tensors ones, and this is
neither); ``bitsmith.io.models.load_model`` (what ``bitsmith eval DIR`` uses) reads it as a float
transformers directory, and bench_prune.py loads it so.
"""

from __future__ import annotations

import argparse
import json

from _llmcompressor import calibration, peak_rss, quiet_logs, save, timed_oneshot


def build_recipe(method: str, sparsity: float, pattern: str, block_size: int, damp: float):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    common = {"sparsity": sparsity, "mask_structure": "0:0" if pattern == "unstructured" else pattern,
              "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    if method == "sparsegpt":
        return SparseGPTModifier(**common, block_size=block_size, dampening_frac=damp)
    return WandaPruningModifier(**common)


def _zeros(model) -> dict:
    """The fraction of zeros over the pruned Linears (all but lm_head), and lm_head's own."""
    import torch

    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    head = model.get_output_embeddings().weight
    head_zeros = float((head == 0).float().mean())
    return {"sparsity": round(zeros / max(total, 1), 4), "lm_head_sparsity": round(head_zeros, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="LlamaForCausalLM directory")
    p.add_argument("--calib", required=True, help=".pt file with LongTensor (N, L)")
    p.add_argument("--method", choices=("sparsegpt", "wanda"), default="sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights set to zero (unstructured)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M (2:4), N of every M pruned")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT's block_size")
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT's dampening_frac")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    args = p.parse_args(argv)
    if args.pattern != "unstructured":  # llm-compressor's N:M prunes N of every M: 2:4 is 50%
        n, _, m = args.pattern.partition(":")
        args.sparsity = int(n) / int(m)

    import torch

    torch.set_num_threads(args.threads)
    llmcompressor = quiet_logs(args.json)
    data, n, seq_len = calibration(args.calib)
    recipe = build_recipe(args.method, args.sparsity, args.pattern, args.block_size, args.damp)
    model, tokenizer, seconds, cpu_seconds = timed_oneshot(args.model, recipe, data, n, seq_len,
                                                           sequential_targets=["LlamaDecoderLayer"])
    zeros = _zeros(model)
    save(model, tokenizer, args.out)

    result = {
        "llmcompressor": llmcompressor.__version__,
        "method": args.method,
        "sparsity_asked": args.sparsity,
        "pattern": args.pattern,
        "block_size": args.block_size,
        "damp": args.damp,
        "calib_samples": n,
        "seq_len": seq_len,
        "prune_seconds": round(seconds, 3),
        "prune_cpu_seconds": round(cpu_seconds, 3),
        "threads": args.threads,
        "out": args.out,
        "peak_rss_bytes": peak_rss(),
        **zeros,
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(f"llmcompressor {result['llmcompressor']} {args.method} {args.pattern} {args.sparsity:g}: oneshot"
              f" {seconds:.1f}s, {zeros['sparsity']:.1%} zeros -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
