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
import contextlib
import json
import sys
import time


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


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


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

    # llm-compressor logs to stdout by default (its loguru sink is added at
    # import time and some messages are emitted during import); send its log to
    # stderr so stdout holds only the result line.
    with contextlib.redirect_stdout(sys.stderr):
        import llmcompressor
        from llmcompressor.logger import LoggerConfig, configure_logger, logger

        configure_logger(LoggerConfig(console_log_level=None))
    logger.add(sys.stderr, level="WARNING" if args.json else "INFO")

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(args.calib)
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    if ids.dim() != 2:
        raise SystemExit(f"--calib: expected a 2-D tensor, got shape {tuple(ids.shape)}")
    n, seq_len = ids.shape
    ids = ids.long()
    ds = Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
        }
    )

    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, device_map=None
    )
    model.to("cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    recipe = build_recipe(
        args.bits, args.group, args.symmetric, args.actorder, args.damp
    )

    t0, c0 = time.perf_counter(), time.process_time()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=n,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0  # all threads; inflates too on a busy machine

    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)

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
        "peak_rss_bytes": _peak_rss(),
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
