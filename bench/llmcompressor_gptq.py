"""Quantize a Llama checkpoint with llm-compressor's GPTQ, for side-by-side benchmarks.

Run with the interpreter of the separate llm-compressor virtual environment
(bench/.venv-llmcompressor), not bitsmith's own: llm-compressor pins its own
transformers / compressed-tensors versions.

    bench/.venv-llmcompressor/bin/python bench/llmcompressor_gptq.py \
        --model MODEL_DIR --calib calib.pt --bits 4 --group 128 --out OUT_DIR --json

--calib is a torch .pt file holding a LongTensor input_ids of shape (N, seq_len).
Only the oneshot() call is timed (wall seconds, plus process CPU seconds).
The result is saved in compressed-tensors form
(model.save_pretrained(..., save_compressed=True)) together with the tokenizer.
"""

from __future__ import annotations

import argparse
import json

from _llmcompressor import calibration, peak_rss, quiet_logs, save, timed_oneshot


def build_recipe(bits: int, group: int, symmetric: bool, actorder: str, damp: float):
    from llmcompressor.modifiers.quantization import GPTQModifier

    return GPTQModifier(
        targets=["Linear"],
        ignore=["lm_head"],
        dampening_frac=damp,
        # a last, shorter group where group_size does not divide a layer (SmolLM2's 576 = 4.5 x 128), as
        # bitsmith does; llm-compressor refuses it unless told that the runtime takes it (bitsmith's does)
        bypass_divisibility_checks=True,
        actorder=None if actorder == "none" else actorder,
        config_groups={
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "output_activations": None,
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": symmetric,
                    "strategy": "group",
                    "group_size": group,
                },
            }
        },
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="LlamaForCausalLM directory")
    p.add_argument("--calib", required=True, help=".pt file with LongTensor (N, L)")
    p.add_argument("--bits", type=int, choices=(3, 4), default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--symmetric", action="store_true", help="default: asymmetric")
    p.add_argument("--actorder", choices=("static", "none"), default="static")
    p.add_argument("--damp", type=float, default=0.01, help="dampening_frac")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    llmcompressor = quiet_logs(args.json)
    data, n, seq_len = calibration(args.calib)
    recipe = build_recipe(args.bits, args.group, args.symmetric, args.actorder, args.damp)
    model, tokenizer, seconds, cpu_seconds = timed_oneshot(args.model, recipe, data, n, seq_len)
    save(model, tokenizer, args.out)

    result = {
        "llmcompressor": llmcompressor.__version__,
        "bits": args.bits,
        "group": args.group,
        "symmetric": args.symmetric,
        "actorder": args.actorder,
        "calib_samples": n,
        "seq_len": seq_len,
        "quantize_seconds": round(seconds, 3),
        "quantize_cpu_seconds": round(cpu_seconds, 3),
        "threads": args.threads,
        "out": args.out,
        "peak_rss_bytes": peak_rss(),
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(
            f"llmcompressor {result['llmcompressor']} GPTQ w{args.bits} g{args.group}: "
            f"oneshot {result['quantize_seconds']:.1f}s -> {args.out}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
