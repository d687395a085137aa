"""LLM post-training quantization on docs-lm, bitsmith beside llm-compressor, in one run.

Same 128 calibration windows of 256 tokens (docs-lm's default calibration set) for every method;
perplexity over docs-lm's held-out text (256-token windows); wall time of the quantization call
alone. Weight-only rows quantize every Linear in the blocks and leave lm_head and the embedding in
float (llm-compressor's defaults), asymmetric, groups of 128.

    rows                        | what
      fp32                      | the float model
      rtn / gptq / awq W4, W3   | bitsmith (gptq: act-order, static groups, true-sequential, MSE ranges)
      llm-compressor gptq W4, W3| llm-compressor's GPTQModifier (actorder static, dampening 0.01), run with the
                                | interpreter of its own venv (bench/.venv-llmcompressor; pins clash with ours)
      W8A8 naive / smoothquant  | static per-tensor and dynamic per-token activations, SmoothQuant alpha 0.8
      MiniLM W8A8 static        | naive vs SmoothQuant (mean cosine to fp32 over 64 sentences)

GPTQ timings alternate bitsmith and llm-compressor ``--rounds`` times; the minimum of each is reported
(the machine is shared and noisy).

    python bench/bench_llm.py [--rounds 2] [--skip-llmcompressor] [--skip-minilm] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import bitsmith
from bitsmith.api.compress import machine_summary
from bitsmith.api.config import config_from_dict
from bitsmith.api.tasks import LanguageModelTask
from bitsmith.zoo.docs_lm import heldout_text, load_docs_lm, model_dir, perplexity

LLMC_PYTHON = Path(__file__).parent / ".venv-llmcompressor" / "bin" / "python"
LLMC_SCRIPT = Path(__file__).parent / "llmcompressor_gptq.py"


def weight_only(bits: int, algorithm: str, clip: str = "minmax") -> dict:
    weights = {"dtype": f"int{bits}", "granularity": 128, "symmetric": False, "algorithm": algorithm, "clip": clip}
    return {"rules": [{"targets": ["Linear"], "scheme": {"weights": weights}}], "ignore": ["lm_head"]}


def w8a8(static: bool, smoothquant: float | None) -> dict:
    acts = {"dtype": "int8", "granularity": "tensor", "dynamic": False} if static else {"dtype": "int8"}
    config = {"rules": [{"targets": ["Linear"], "scheme": {
        "weights": {"dtype": "int8", "granularity": "channel", "symmetric": True}, "activations": acts}}],
        "ignore": ["lm_head"]}
    if smoothquant is not None:
        config["smoothquant"] = {"alpha": smoothquant}
    return config


def run_bitsmith(model, config: dict, calibration, tokenizer, text) -> dict:
    quantized = copy.deepcopy(model)
    start = time.perf_counter()
    bitsmith.quantize_(quantized, config_from_dict(config), calibration=calibration)
    seconds = time.perf_counter() - start
    return {"perplexity": perplexity(quantized, tokenizer, text)["perplexity"], "quantize_seconds": seconds}


def run_llmcompressor(bits: int, calib_file: Path, tokenizer, text, work: Path) -> dict:
    out = work / f"llmc-w{bits}-{time.monotonic_ns()}"
    proc = subprocess.run(
        [str(LLMC_PYTHON), str(LLMC_SCRIPT), "--model", str(model_dir()), "--calib", str(calib_file), "--bits",
         str(bits), "--group", "128", "--out", str(out), "--json"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"llm-compressor failed: {proc.stderr.strip().splitlines()[-1:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    loaded = bitsmith.load(out)  # compressed-tensors directory, run on bitsmith's modules
    return {"perplexity": perplexity(loaded, tokenizer, text)["perplexity"], "quantize_seconds": info["quantize_seconds"],
            "llmcompressor": info["llmcompressor"]}


def minilm_smoothquant() -> dict:
    from torch import nn

    from bitsmith.zoo.minilm import encode_batch, load_minilm, sentence_embeddings
    from bitsmith.zoo.text import doc_sentences

    model, tokenizer = load_minilm()
    batch = encode_batch(tokenizer, doc_sentences(64))
    reference = sentence_embeddings(model, batch)
    texts = doc_sentences(128, split="calib")
    calibration = [encode_batch(tokenizer, texts[i : i + 16]) for i in range(0, 128, 16)]
    rows = {}
    for name in ("w8a8-static", "smoothquant-w8a8"):
        quantized = copy.deepcopy(model)
        bitsmith.quantize_(quantized, bitsmith.load_recipe(name), calibration=calibration)
        cos = nn.functional.cosine_similarity(sentence_embeddings(quantized, batch), reference)
        rows[name] = {"mean_cosine": cos.mean().item(), "loss": 1 - cos.mean().item()}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="alternating GPTQ timing rounds (min reported)")
    parser.add_argument("--skip-llmcompressor", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model, tokenizer = load_docs_lm()
    calibration = LanguageModelTask(tokenizer).calibration(None)  # 128 windows x 256 tokens, in batches of 8
    text = heldout_text()
    results = {"machine": machine_summary(), "calibration_windows": sum(len(b["input_ids"]) for b in calibration)}
    base = perplexity(model, tokenizer, text)["perplexity"]
    results["fp32"] = {"perplexity": base}
    llmc = not args.skip_llmcompressor and LLMC_PYTHON.exists()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        calib_file = work / "calib.pt"
        torch.save(torch.cat([b["input_ids"] for b in calibration]), calib_file)
        for bits in (4, 3):
            results[f"rtn-w{bits}"] = run_bitsmith(model, weight_only(bits, "rtn"), calibration, tokenizer, text)
            results[f"awq-w{bits}"] = run_bitsmith(model, weight_only(bits, "awq"), calibration, tokenizer, text)
            gptq, theirs = [], []
            for _ in range(args.rounds):
                gptq.append(run_bitsmith(model, weight_only(bits, "gptq", "mse"), calibration, tokenizer, text))
                if llmc:
                    theirs.append(run_llmcompressor(bits, calib_file, tokenizer, text, work))
            results[f"gptq-w{bits}"] = {**gptq[0], "quantize_seconds": min(r["quantize_seconds"] for r in gptq),
                                        "quantize_seconds_all": [round(r["quantize_seconds"], 2) for r in gptq]}
            if llmc:
                results[f"llmcompressor-gptq-w{bits}"] = {
                    **theirs[0], "quantize_seconds": min(r["quantize_seconds"] for r in theirs),
                    "quantize_seconds_all": [round(r["quantize_seconds"], 2) for r in theirs]}
    for static in (True, False):
        kind = "static" if static else "dynamic"
        results[f"w8a8-{kind}"] = run_bitsmith(model, w8a8(static, None), calibration, tokenizer, text)
        results[f"smoothquant-w8a8-{kind}"] = run_bitsmith(model, w8a8(static, 0.8), calibration, tokenizer, text)
    for name, row in results.items():
        if isinstance(row, dict) and "perplexity" in row and name != "fp32":
            row["increase_pct"] = 100 * (row["perplexity"] / base - 1)
    if not args.skip_minilm:
        results["minilm"] = minilm_smoothquant()

    print(f"docs-lm held-out perplexity, {results['calibration_windows']} calibration windows; {results['machine']}")
    print(f"{'method':32} {'perplexity':>10} {'increase':>9} {'quantize s':>10}")
    for name, row in results.items():
        if isinstance(row, dict) and "perplexity" in row:
            seconds = f"{row['quantize_seconds']:.1f}" if "quantize_seconds" in row else ""
            print(f"{name:32} {row['perplexity']:10.3f} {row.get('increase_pct', 0):+8.3f}% {seconds:>10}")
    if "minilm" in results:
        for name, row in results["minilm"].items():
            print(f"minilm {name:25} mean cosine {row['mean_cosine']:.5f} (loss {row['loss']:.5f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
