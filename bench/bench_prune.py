"""Pruning, bitsmith beside llm-compressor, in one run, in parts: unstructured and N:M sparsity on a zoo LLM.

Part ``llm``: every method prunes the same calibration windows (the model's default calibration set:
``--windows`` windows of 256 tokens of docs-lm's train-split documentation, as bench_llm.py) in a process of
its own, so that its wall time (the pruning call alone) and peak resident memory (VmHWM) are its own; the
parent then evaluates every result on the same held-out text (256-token windows of docs-lm's held-out Python
documentation) with bitsmith's perplexity, and measures the zeros it really holds.

    rows                              | what
      magnitude / wanda / sparsegpt   | bitsmith's prune stage, every Linear but lm_head, at 30%, 50%, 70%
        -30, -50, -70, -2of4          | unstructured and 2:4 (magnitude: per layer; wanda: per output row;
                                      | sparsegpt: block size 128, dampening 0.01, every Linear of a block on
                                      | the block's inputs, as llm-compressor's pipeline does)
      llm-compressor-sparsegpt / -wanda | llm-compressor's SparseGPTModifier / WandaPruningModifier at the same
                                      | settings, from its own venv (bench/.venv-llmcompressor, llmcompressor_prune.py)
      sparsegpt-50 / -2of4-true-sequential | bitsmith's SparseGPT true-sequential (its default until 2026-12-03):
                                      | each layer group of a block on the outputs of the groups already pruned
      gptq-w4a16                      | bitsmith's built-in recipe: int4 g128 GPTQ alone
      sparsegpt-50-w4a16              | the built-in recipe: SparseGPT 50%, then GPTQ W4 g128 with the zeros kept

Targets (the exit status is 1 if one fails), at 50% and at 2:4 each: SparseGPT's perplexity increase at most
0.6x magnitude's, and no worse than llm-compressor's SparseGPT; Wanda's below magnitude's.

Part ``structured``: structured pruning on MiniLM (FFN channels) and digits-cnn (convolution channels) at 25%
and 50%: latency, size, FLOPs and quality beside the float model (bench/_prune_structured.py says how, and
its targets).

    python bench/bench_prune.py --model smollm2 [--part llm|structured|all] [--windows 128] [--methods ...]
        [--skip-llmcompressor] [--work DIR] [--plot out.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from _common import finish, machine_line, run_child, zoo_worker

HERE = Path(__file__).parent
LLMC_PYTHON = HERE / ".venv-llmcompressor" / "bin" / "python"
LLMC_SCRIPT = HERE / "llmcompressor_prune.py"

SHAPES = {"50": 0.5, "2of4": "2:4", "30": 0.3, "70": 0.7}  # row suffix -> sparsity, or an N:M pattern


def prune_recipe(method: str, shape: str) -> dict:
    """A one-stage recipe: ``method`` on every Linear but lm_head (as the built-in magnitude-50 and others)."""
    what = SHAPES[shape]
    rule = {"targets": ["Linear"], **({"pattern": what} if isinstance(what, str) else {"sparsity": what})}
    stage = {"prune": {"method": method, "rules": [rule], "ignore": ["lm_head"]}}
    return {"name": f"{method}-{shape}", "stages": [stage]}


# row -> how it is made: a recipe dict or a built-in recipe's name (bitsmith), or ("llm-compressor", method, shape)
# (in the order they run: the rows the targets need first, llm-compressor's 30% and 70% last)
ROWS: dict[str, dict | str | tuple] = {}
for _shape in SHAPES:
    for _method in ("magnitude", "wanda", "sparsegpt"):
        ROWS[f"{_method}-{_shape}"] = prune_recipe(_method, _shape)
    if _shape in ("50", "2of4"):
        for _method in ("sparsegpt", "wanda"):
            ROWS[f"llm-compressor-{_method}-{_shape}"] = ("llm-compressor", _method, _shape)
    if _shape == "2of4":  # prune then quantize, beside each alone (their quantize stages are the same)
        ROWS["gptq-w4a16"] = "gptq-w4a16"
        ROWS["sparsegpt-50-w4a16"] = "sparsegpt-50-w4a16"
for _shape in ("30", "70"):
    for _method in ("sparsegpt", "wanda"):
        ROWS[f"llm-compressor-{_method}-{_shape}"] = ("llm-compressor", _method, _shape)
for _shape in ("50", "2of4"):  # SparseGPT layer group by layer group inside a block (the default until 2026-12-03)
    ROWS[f"sparsegpt-{_shape}-true-sequential"] = prune_recipe("sparsegpt", _shape)
    ROWS[f"sparsegpt-{_shape}-true-sequential"]["stages"][0]["prune"]["sparsegpt"] = {"true_sequential": True}


def worker(args) -> int:
    """In a process of its own: load the float model, prune it by one bitsmith row, save it, report."""
    import bitsmith
    from bitsmith.recipe import Recipe, config_from_dict, load_recipe

    spec = ROWS[args.worker]
    recipe = load_recipe(spec) if isinstance(spec, str) else config_from_dict(spec, Recipe)
    result = zoo_worker(args, lambda model, calibration: bitsmith.run_stages(model, recipe, calibration))
    print(json.dumps({"prune_seconds": result.pop("seconds"), **result}), flush=True)
    return 0


def measured_sparsity(model: nn.Module) -> float:
    """The fraction of zeros over the weights of the Linear layers in the repeated blocks (lm_head left out);
    quantized layers are dequantized first (a kept zero is code == zero point, so exactly 0)."""
    zeros = total = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head") or not hasattr(module, "in_features"):
            continue
        weight = module.weight if isinstance(module, nn.Linear) else module.dequantize()
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / max(total, 1)


def _command(name: str, args, calib_file: Path, out: Path) -> list[str]:
    spec = ROWS[name]
    if isinstance(spec, tuple):
        from bitsmith.zoo import zoo_model_dir

        _, method, shape = spec
        what = SHAPES[shape]
        shape_args = ["--pattern", what] if isinstance(what, str) else ["--sparsity", str(what)]
        return [str(LLMC_PYTHON), str(LLMC_SCRIPT), "--model", str(zoo_model_dir(args.model)), "--calib",
                str(calib_file), "--method", method, *shape_args, "--out", str(out), "--threads", str(args.threads),
                "--json"]
    return [sys.executable, __file__, "--worker", name, "--model", args.model, "--calib", str(calib_file),
            "--out", str(out), "--threads", str(args.threads)]


def _load(out: Path) -> nn.Module:
    """A bitsmith directory (``bitsmith.load``), or llm-compressor's: compressed-tensors 0.19 writes a pruned
    float model as a plain transformers checkpoint (no sparse format, no quantization_config), which the
    general loader reads as a float model."""
    from bitsmith.io.models import load_model

    return load_model(out).model


def llm_part(args) -> tuple[dict, list[tuple[str, bool]]]:
    """Prune, score and compare (the module docstring); returns (results for --json, targets)."""
    from bitsmith.evaluation.tasks import LanguageModelTask
    from bitsmith.io.models import load_model
    from bitsmith.zoo.docs_lm import heldout_text, perplexity

    loaded = load_model(args.model)
    tokenizer, text = loaded.tokenizer, heldout_text()
    calibration = LanguageModelTask(tokenizer).calibration(None, args.windows)
    windows = torch.cat([batch["input_ids"] for batch in calibration])  # (windows, 256)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-prune-"))
    work.mkdir(parents=True, exist_ok=True)
    fp32_file = work / "fp32.json"  # the float model's score, kept too (it does not depend on the windows)
    fp32 = json.loads(fp32_file.read_text()) if fp32_file.exists() else perplexity(loaded.model, tokenizer, text)
    fp32_file.write_text(json.dumps(fp32))
    del loaded
    results = {"fp32": {"perplexity": fp32["perplexity"], "sparsity": 0.0}}
    calib_file = work / "calib.pt"
    if calib_file.exists() and not torch.equal(torch.load(calib_file), windows):
        raise SystemExit(f"{work} holds results of other calibration windows; give another --work")
    torch.save(windows, calib_file)
    rows = [n for n in args.methods if not (args.skip_llmcompressor and isinstance(ROWS[n], tuple))]
    for name in rows:
        out, saved = work / name, work / f"{name}.json"
        if saved.exists():  # measured by an earlier run on the same windows
            results[name] = json.loads(saved.read_text())
            continue
        if out.exists():
            shutil.rmtree(out)
        print(f"{name} ...", flush=True, file=sys.stderr)
        try:
            row = run_child(_command(name, args, calib_file, out))
        except RuntimeError as err:  # reported, and any target that needs this row fails
            print(f"{name} failed: {err}", file=sys.stderr)
            continue
        model = _load(out)
        row["threads"] = args.threads
        row["sparsity"] = measured_sparsity(model)
        row["perplexity"] = perplexity(model, tokenizer, text)["perplexity"]
        row["increase_pct"] = 100 * (row["perplexity"] / fp32["perplexity"] - 1)
        results[name] = row
        saved.write_text(json.dumps(row))
        print(f"{name}: {row['perplexity']:.3f} ({row['increase_pct']:+.2f}%), {row['prune_seconds']:.1f} s",
              flush=True, file=sys.stderr)
        del model
        if not args.keep:
            shutil.rmtree(out)

    print(f"{args.model}: held-out perplexity over {fp32['windows']} windows of 256 tokens ({fp32['tokens']} scored);"
          f" {len(windows)} calibration windows of 256 tokens, the same for every method\n")
    print("| method | sparsity | perplexity | increase | prune s | threads | peak memory MB |\n"
          "|---|---|---|---|---|---|---|")
    print(f"| fp32 | 0.0% | {fp32['perplexity']:.3f} | | | | |")
    for name, row in results.items():
        if name != "fp32":
            print(f"| {name} | {row['sparsity']:.1%} | {row['perplexity']:.3f} | {row['increase_pct']:+.2f}% |"
                  f" {row['prune_seconds']:.1f} | {row['threads']} | {row.get('peak_rss_bytes', 0) / 1e6:.0f} |")
    print()
    return results, llm_targets(results, args.skip_llmcompressor)


def llm_targets(results: dict, skip_llmcompressor: bool) -> list[tuple[str, bool]]:
    """At 50% and at 2:4: SparseGPT <= 0.6x magnitude, SparseGPT <= llm-compressor's, Wanda < magnitude."""
    checks = []
    increase = lambda name: results[name]["increase_pct"]  # noqa: E731
    for shape, label in (("50", "50%"), ("2of4", "2:4")):
        sgpt, mag, wanda, theirs = (f"sparsegpt-{shape}", f"magnitude-{shape}", f"wanda-{shape}",
                                    f"llm-compressor-sparsegpt-{shape}")
        if {sgpt, mag} <= set(results):
            ratio = increase(sgpt) / increase(mag)
            checks.append((f"{label} sparsegpt increase <= 0.6x magnitude's (measured {ratio:.3f}x:"
                           f" {increase(sgpt):+.1f}% vs {increase(mag):+.1f}%)", ratio <= 0.6))
        if not skip_llmcompressor:
            if {sgpt, theirs} <= set(results):
                checks.append((f"{label} sparsegpt increase <= llm-compressor's ({increase(sgpt):+.2f}% vs"
                               f" {increase(theirs):+.2f}%)", increase(sgpt) <= increase(theirs)))
            else:
                checks.append((f"{label} sparsegpt increase <= llm-compressor's (a row did not run)", False))
        if {wanda, mag} <= set(results):
            checks.append((f"{label} wanda increase < magnitude's ({increase(wanda):+.1f}% vs {increase(mag):+.1f}%)",
                           increase(wanda) < increase(mag)))
    for a, b in (("wanda-50", "llm-compressor-wanda-50"), ("wanda-2of4", "llm-compressor-wanda-2of4"),
                 ("sparsegpt-50-w4a16", "sparsegpt-50"), ("sparsegpt-50-w4a16", "gptq-w4a16")):
        if {a, b} <= set(results):
            print(f"reported: {a} {increase(a):+.2f}% vs {b} {increase(b):+.2f}%")
    return checks


def plot(results: dict, fp32: float, title: str, path: Path) -> None:
    """Perplexity (log scale) against sparsity: a line per method over the unstructured rows, its 2:4 row as a
    hollow marker at 50%, llm-compressor dashed, fp32 dotted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"magnitude": "tab:gray", "wanda": "tab:blue", "sparsegpt": "tab:red",
              "llm-compressor-wanda": "tab:cyan", "llm-compressor-sparsegpt": "tab:orange"}
    for index, (method, color) in enumerate(colors.items()):
        style = "--" if method.startswith("llm-compressor") else "-"
        points = sorted((SHAPES[s], results[f"{method}-{s}"]["perplexity"]) for s in SHAPES
                        if not isinstance(SHAPES[s], str) and f"{method}-{s}" in results)
        if points:  # every line starts at the float model (0% sparsity)
            ax.plot(*zip((0.0, fp32), *points), style, marker="o", color=color, label=method)
        if f"{method}-2of4" in results:  # side by side around 50%, so that close ones stay apart
            ax.plot([0.5 + 0.012 * (index - 2)], [results[f"{method}-2of4"]["perplexity"]], marker="s",
                    markersize=8, linestyle="none", markerfacecolor="none", markeredgecolor=color,
                    markeredgewidth=1.5, label=None if points else method)
    ax.axhline(fp32, color="black", linestyle=":", label=f"fp32 ({fp32:.2f})")
    ax.plot([], [], marker="s", markerfacecolor="none", markeredgecolor="black", linestyle="none",
            label="2:4 (50%), hollow squares")
    ax.set_yscale("log")
    ticker, plain = matplotlib.ticker, matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if high / low < 3 else ticker.NullFormatter())  # a narrow range: label all
    ax.set_xticks([0.0, 0.3, 0.5, 0.7], ["0%", "30%", "50%", "70%"])
    ax.set_xlabel("sparsity of the Linear layers (lm_head dense)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def structured_part(args) -> tuple[dict, list[tuple[str, bool]]]:
    """Structured pruning on MiniLM and digits-cnn at 25% and 50% (bench/_prune_structured.py)."""
    from _prune_structured import structured_part as run

    return run(args)


PARTS = {"llm": llm_part, "structured": structured_part}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--model", default="smollm2", help="part llm: a zoo language model (smollm2, docs-lm)")
    parser.add_argument("--windows", type=int, default=128, help="part llm: calibration windows of 256 tokens")
    parser.add_argument("--methods", nargs="+", default=list(ROWS), choices=list(ROWS), help="part llm: rows to run")
    parser.add_argument("--skip-llmcompressor", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="part llm: the PNG (default bench/out/prune-MODEL.png)")
    parser.add_argument("--work", type=Path, help="keep each row's result here; a rerun with the same --work reuses"
                        " the results it finds (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep each pruned model in --work (default: deleted"
                        " once scored, as each is a full float copy)")
    parser.add_argument("--worker", choices=[n for n, s in ROWS.items() if not isinstance(s, tuple)],
                        help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)

    print(machine_line())
    results, checks = {}, []
    for part in PARTS if args.part == "all" else [args.part]:
        results[part], part_checks = PARTS[part](args)
        checks += part_checks
    if "llm" in results:
        llm = results["llm"]
        plot(llm, llm["fp32"]["perplexity"], f"{args.model}: pruning, {args.windows} calibration windows",
             args.plot or HERE / "out" / f"prune-{args.model}.png")
    code = finish(checks)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_line(), "model": args.model, "windows": args.windows,
                                         "parts": results}, indent=2))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
