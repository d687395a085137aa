"""LLM post-training quantization, bitsmith beside llm-compressor, on one zoo language model, in one run.

Every method quantizes the same calibration windows (the model's default calibration set: ``--windows``
windows of 256 tokens of docs-lm's train-split documentation) in a process of its own, so that its wall time
and peak resident memory (VmHWM) are its own; the parent then evaluates every result on the same held-out
text (256-token windows of docs-lm's held-out Python documentation) with bitsmith's perplexity.

    rows                          | what
      rtn / gptq / awq W4, W3     | bitsmith, int4 / int3 groups of 128, asymmetric, lm_head in float (rtn: min-max
                                  | ranges, rtn-mse: MSE-searched ranges; gptq: act-order with static groups,
                                  | true-sequential, MSE ranges)
      llm-compressor gptq W4, W3  | llm-compressor's GPTQModifier (actorder static, dampening 0.01), from its own
                                  | venv (bench/.venv-llmcompressor: its pins clash with ours); its compressed-tensors
                                  | output is evaluated on bitsmith's modules
      W8A8 naive / smoothquant    | static per-tensor and dynamic per-token int8 activations, SmoothQuant alpha 0.8

Targets (the exit status is 1 if one fails): GPTQ W4's perplexity increase at most half round-to-nearest's,
and no worse than llm-compressor's GPTQ W4 (the same comparisons at W3 are reported).

    python bench/bench_llm.py --model smollm2 [--windows 128] [--skip-llmcompressor] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from _common import finish, machine_line, run_child, zoo_worker

LLMC_PYTHON = Path(__file__).parent / ".venv-llmcompressor" / "bin" / "python"
LLMC_SCRIPT = Path(__file__).parent / "llmcompressor_gptq.py"


def weight_only(bits: int, algorithm: str, clip: str = "minmax", group: int = 128) -> dict:
    weights = {"dtype": f"int{bits}", "granularity": group, "symmetric": False, "algorithm": algorithm}
    if algorithm != "awq":
        weights["clip"] = clip
    return {"rules": [{"targets": ["Linear"], "scheme": {"weights": weights}}], "ignore": ["lm_head"]}


def w8a8(static: bool, smoothquant: float | None) -> dict:
    acts = {"dtype": "int8", "granularity": "tensor", "dynamic": False} if static else {"dtype": "int8"}
    config = {"rules": [{"targets": ["Linear"], "scheme": {
        "weights": {"dtype": "int8", "granularity": "channel", "symmetric": True}, "activations": acts}}],
        "ignore": ["lm_head"]}
    if smoothquant is not None:  # a recipe of two stages: smooth, then quantize
        return {"name": "smoothquant", "stages": [{"smooth": {"alpha": smoothquant}}, {"quantize": config}]}
    return config


METHODS = {
    "rtn-w4": weight_only(4, "rtn"), "rtn-mse-w4": weight_only(4, "rtn", "mse"), "gptq-w4": weight_only(4, "gptq", "mse"),
    "awq-w4": weight_only(4, "awq"),
    "rtn-w3": weight_only(3, "rtn"), "rtn-mse-w3": weight_only(3, "rtn", "mse"), "gptq-w3": weight_only(3, "gptq", "mse"),
    "awq-w3": weight_only(3, "awq"),
    "w8a8-static": w8a8(True, None), "smoothquant-w8a8-static": w8a8(True, 0.8),
    "w8a8-dynamic": w8a8(False, None), "smoothquant-w8a8-dynamic": w8a8(False, 0.8),
    # llm-compressor 0.14 cannot quantize a layer whose width is no multiple of the group (its observers
    # reshape by the group size): where a model has such layers (SmolLM2: 576 = 4.5 x 128), both tools are
    # compared at groups of 64 as well
    "gptq-w4-g64": weight_only(4, "gptq", "mse", 64), "gptq-w3-g64": weight_only(3, "gptq", "mse", 64),
    "rtn-w4-g64": weight_only(4, "rtn", "minmax", 64), "rtn-w3-g64": weight_only(3, "rtn", "minmax", 64),
}


def worker(args) -> int:
    """In a process of its own: load the float model, quantize it by one method, save it, report."""
    import bitsmith
    from bitsmith.recipe import QuantizeConfig, Recipe, config_from_dict

    spec = METHODS[args.worker]
    config = config_from_dict(spec, Recipe if "stages" in spec else QuantizeConfig)
    result = zoo_worker(args, lambda model, calibration: bitsmith.quantize_(model, config, calibration=calibration))
    print(json.dumps({"quantize_seconds": result.pop("seconds"), **result}), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a zoo language model (smollm2, docs-lm)")
    parser.add_argument("--windows", type=int, default=128, help="calibration windows of 256 tokens")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--skip-llmcompressor", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="keep each method's output and result here; a rerun with the"
                        " same --work reuses the results it finds (default: a new temporary directory)")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)

    import bitsmith
    from bitsmith.io.models import load_model
    from bitsmith.evaluation.tasks import LanguageModelTask
    from bitsmith.zoo import zoo_model_dir
    from bitsmith.zoo.docs_lm import heldout_text, perplexity

    loaded = load_model(args.model)
    tokenizer, text = loaded.tokenizer, heldout_text()
    calibration = LanguageModelTask(tokenizer).calibration(None, args.windows)
    windows = torch.cat([batch["input_ids"] for batch in calibration])  # (windows, 256)
    fp32 = perplexity(loaded.model, tokenizer, text)
    del loaded
    results = {"fp32": {"perplexity": fp32["perplexity"]}}
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    calib_file = work / "calib.pt"
    if calib_file.exists() and not torch.equal(torch.load(calib_file), windows):
        raise SystemExit(f"{work} holds results of other calibration windows; give another --work")
    torch.save(windows, calib_file)
    rows = {name: ["bitsmith", name] for name in args.methods}
    if not args.skip_llmcompressor:
        rows.update({f"llm-compressor-gptq-w{b}": ["llm-compressor", (b, 128)] for b in (4, 3)})
        rows.update({f"llm-compressor-gptq-w{b}-g64": ["llm-compressor", (b, 64)] for b in (4, 3)})
    for name, (tool, what) in rows.items():
        out, saved = work / name, work / f"{name}.json"
        if saved.exists():  # measured by an earlier run on the same windows
            results[name] = json.loads(saved.read_text())
            continue
        if out.exists():
            import shutil

            shutil.rmtree(out)
        if tool == "bitsmith":
            command = [sys.executable, __file__, "--worker", what, "--model", args.model, "--calib", str(calib_file),
                       "--out", str(out), "--threads", str(args.threads)]
        else:
            command = [str(LLMC_PYTHON), str(LLMC_SCRIPT), "--model", str(zoo_model_dir(args.model)), "--calib",
                       str(calib_file), "--bits", str(what[0]), "--group", str(what[1]), "--out", str(out),
                       "--threads", str(args.threads), "--json"]
        print(f"{name} ...", flush=True, file=sys.stderr)
        try:
            row = run_child(command)
        except RuntimeError as err:  # reported, and any target that needs this row fails
            print(f"{name} failed: {err}", file=sys.stderr)
            continue
        model = bitsmith.load(out)  # a compressed-tensors directory from llm-compressor runs on bitsmith's modules
        row["perplexity"] = perplexity(model, tokenizer, text)["perplexity"]
        row["increase_pct"] = 100 * (row["perplexity"] / fp32["perplexity"] - 1)
        results[name] = row
        saved.write_text(json.dumps(row))
        del model

    print(machine_line())
    print(f"{args.model}: held-out perplexity over {fp32['windows']} windows of 256 tokens ({fp32['tokens']} scored);"
          f" {len(windows)} calibration windows of 256 tokens, the same for every method\n")
    print("| method | perplexity | increase | quantize s | peak memory MB |\n|---|---|---|---|---|")
    print(f"| fp32 | {fp32['perplexity']:.3f} | | | |")
    for name, row in results.items():
        if name != "fp32":
            print(f"| {name} | {row['perplexity']:.3f} | {row['increase_pct']:+.2f}% | {row['quantize_seconds']:.1f} |"
                  f" {row.get('peak_rss_bytes', 0) / 1e6:.0f} |")
    print()
    checks = []
    gain = lambda a, b: results[a]["increase_pct"] / results[b]["increase_pct"]  # noqa: E731
    if {"gptq-w4", "rtn-w4"} <= set(results):
        checks.append((f"gptq W4 g128 increase <= 0.5x round-to-nearest's (measured {gain('gptq-w4', 'rtn-w4'):.3f}x)",
                       gain("gptq-w4", "rtn-w4") <= 0.5))
    if not args.skip_llmcompressor:
        for group, suffix in ((128, ""), (64, "-g64")):
            ours, theirs = f"gptq-w4{suffix}", f"llm-compressor-gptq-w4{suffix}"
            if {ours, theirs} <= set(results):
                a, b = results[ours]["increase_pct"], results[theirs]["increase_pct"]
                checks.append((f"gptq W4 g{group} increase <= llm-compressor's ({a:+.2f}% vs {b:+.2f}%)", a <= b))
            elif theirs not in results and ours in results:
                print(f"reported: llm-compressor's GPTQ W4 g{group} did not run on {args.model} (see its error above)")
        if not any(name.startswith("llm-compressor-gptq-w4") for name in results):
            checks.append(("gptq W4 increase <= llm-compressor's (no llm-compressor run succeeded)", False))
    for a, b in (("gptq-w3", "rtn-w3"), ("gptq-w3", "llm-compressor-gptq-w3"), ("gptq-w3-g64", "rtn-w3-g64"),
                 ("gptq-w3-g64", "llm-compressor-gptq-w3-g64"), ("gptq-w4-g64", "rtn-w4-g64"),
                 ("smoothquant-w8a8-static", "w8a8-static"), ("smoothquant-w8a8-dynamic", "w8a8-dynamic")):
        if {a, b} <= set(results):
            print(f"reported: {a} {results[a]['increase_pct']:+.2f}% vs {b} {results[b]['increase_pct']:+.2f}%"
                  f" ({gain(a, b):.3f}x)")
    code = finish(checks)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "model": args.model, "results": results}, indent=2))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
