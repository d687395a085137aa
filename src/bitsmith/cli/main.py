"""The ``bitsmith`` command line. Every command takes ``--json`` for machine-readable output.

Errors in what the user gave (paths, recipes, checkpoints) print one line and exit with status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bitsmith.errors import BitsmithError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make trained PyTorch models smaller and faster.")
# wide enough that a layer table is not wrapped when the output goes to a file or a pipe
out_console = Console(width=None if sys.stdout.isatty() else 220)
err_console = Console(stderr=True)

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _fidelity_columns(m: dict) -> dict[str, tuple[str, str]]:
    """Column name -> (float model's value, compressed model's value) for the task's fidelity (a model
    evaluated without a float original shows its own value in both)."""
    if "mean_cosine" in m:
        return {"mean cosine": ("1", f"{m['mean_cosine']:.5f}"), "min cosine": ("1", f"{m['min_cosine']:.5f}")}
    if "perplexity" in m:
        own = f"{m['perplexity']:.3f}"
        float_value = f"{m['float_perplexity']:.3f}" if "float_perplexity" in m else own
        columns = {"perplexity": (float_value, own)}
        if "perplexity_increase_pct" in m:
            columns["increase"] = ("", f"{m['perplexity_increase_pct']:+.2f}%")
        return columns
    if "accuracy" in m:
        own = f"{100 * m['accuracy']:.2f}%"
        return {"test accuracy": (f"{100 * m['float_accuracy']:.2f}%" if "float_accuracy" in m else own, own)}
    return {}


def _pruning_column(m: dict) -> dict[str, tuple[str, str]]:
    """The sparsity column (zero weights of the pruned layers) and the parameters column (structured pruning),
    when a pruning stage ran."""
    columns = {}
    if "sparsity" in m:
        columns["sparsity"] = ("0%", f"{100 * m['sparsity']:.1f}%")
    if "parameters" in m:
        columns["parameters"] = (f"{m['original_parameters'] / 1e6:.2f} M",
                                 f"{m['parameters'] / 1e6:.2f} M (-{100 * m['parameters_removed']:.1f}%)")
    return columns


class _StageBars:
    """One progress bar per recipe stage: the pipeline calls ``stage(i, n, name)`` before each stage and the
    progress itself per layer or block."""

    def __init__(self, progress: Progress):
        self.progress, self.task = progress, None

    def _close(self) -> None:
        if self.task is not None:
            done = next(t.completed for t in self.progress.tasks if t.id == self.task)
            self.progress.update(self.task, total=max(done, 1), completed=max(done, 1))

    def stage(self, index: int, count: int, name: str) -> None:
        self._close()
        self.task = self.progress.add_task(f"{index + 1}/{count} {name}", total=None, step="")

    def __call__(self, message: str) -> None:
        if self.task is None:
            self.task = self.progress.add_task("", total=None, step="")
        self.progress.update(self.task, advance=1, step=message)

    def finish(self) -> None:
        self._close()


def _emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def compress(
    model: str = typer.Argument("minilm", help="Zoo name (minilm) or a local transformers model directory."),
    recipe: str = typer.Option("w8a8-dynamic", "--recipe", "-r", help="Built-in recipe name or a YAML file."),
    out: Path = typer.Option(..., "--out", "-o", help="New (or empty) directory to write the compressed model to."),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluate on this text file (one sentence per line)."),
    calib: Optional[Path] = typer.Option(
        None, "--calib", help="Calibration set: text/JSONL file, folder of images or .npy/.pt, or a datasets folder."
    ),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration samples to use."),
    repeats: int = typer.Option(5, help="Timed runs per model (median reported)."),
    offload: bool = typer.Option(
        False, "--offload", help="Larger than memory: quantize block by block from disk (causal LM directory or"
        " docs-lm);"
        " no evaluation."),
    checkpoints: Optional[Path] = typer.Option(
        None, "--checkpoints", help="Where training stages (qat, distill) with checkpoint_every keep their"
        " checkpoints (default: OUT.checkpoints)."),
    resume: bool = typer.Option(False, "--resume", help="Training stages start from their last checkpoint."),
    nproc: int = typer.Option(1, "--nproc", help="Data parallel: run the training stages (qat, distill, qlora) in"
                              " this many processes on torch.distributed (gloo on CPU), each on a share of every"
                              " batch."),
    merge: bool = typer.Option(False, "--merge", help="qlora: fold the trained adapters into the float weights and"
                               " quantize again (a plain quantized model; the adapters are still written)."),
    as_json: bool = JSON_OPTION,
):
    """Quantize MODEL by a recipe, compare it with the original on this machine, and save it."""
    from bitsmith.api.compress import compress as run_compress
    from bitsmith.api.compress import compress_offloaded
    from bitsmith.recipe import load_recipe

    from bitsmith.api.compress import check_counts

    check_counts(repeats, calib_samples)  # bad counts fail before the model loads
    if nproc < 1:
        raise BitsmithError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(_launch(nproc))
    from bitsmith.api.compress import init_from_env, is_main, shutdown

    init_from_env()
    recipe_name, recipe = recipe, load_recipe(recipe)  # a bad recipe fails before the model loads; read once
    if merge:
        from bitsmith.api.compress import merged_recipe

        recipe = merged_recipe(recipe)
    if offload:
        with Progress(TextColumn("[bold]quantizing block by block"), TextColumn("{task.description}"),
                      TimeElapsedColumn(), console=err_console, disable=as_json, transient=True) as progress:
            task = progress.add_task("", total=None)
            result = compress_offloaded(model, recipe, out, calib=calib, calib_samples=calib_samples,
                                        progress=lambda name: progress.update(task, description=name))
        if as_json:
            _emit_json(result)
        else:
            peak = result["peak_rss_bytes"]
            out_console.print(
                f"{model} -> {recipe_name}: {result['quantized_layers']} layers in {result['blocks']} blocks,"
                f" {result['quantize_seconds']:.0f} s, peak memory {_mb(peak) if peak else 'unknown'}; saved to {out}"
            )
            _print_stages(result.get("stages", []))
            _print_outcomes(result)
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[step]}"),
        TimeElapsedColumn(), console=err_console, disable=as_json, transient=True,
    ) as progress:
        bars = _StageBars(progress)
        result = run_compress(
            model, recipe, out, text=text, calib=calib, calib_samples=calib_samples, repeats=repeats, progress=bars,
            checkpoints=checkpoints, resume=resume,
        )
        bars.finish()
    shutdown()  # data parallel: every process has finished (rank 0 has written) before gloo is torn down
    result.pop("model")
    if not is_main():  # data parallel: rank 0 reports
        return
    if as_json:
        _emit_json(result)
        return
    m = result["metrics"]
    table = Table(title=f"{model} -> {recipe_name}  ({m['machine']['cpu']}, {m['machine']['threads']} threads)")
    fidelity = _fidelity_columns(m)
    pruned = _pruning_column(m)
    for column in ("model", "size", *pruned, "latency", "vs float", *fidelity):
        table.add_column(column, justify="right" if column != "model" else "left")
    table.add_row("float (original)", _mb(m["original_bytes"]), *(v[0] for v in pruned.values()),
                  f"{m['original_latency_s'] * 1e3:.0f} ms", "1.00x", *(v[0] for v in fidelity.values()))
    table.add_row(recipe_name, _mb(m["bytes"]), *(v[1] for v in pruned.values()), f"{m['latency_s'] * 1e3:.0f} ms",
                  f"{m['latency_ratio']:.2f}x", *(v[1] for v in fidelity.values()))
    out_console.print(table)
    shape = m.get("batch_shape")
    out_console.print(
        f"size {m['size_ratio']:.3f}x of float; {result['quantized_layers']} layers quantized; "
        f"timed on batch {shape}; {m['evaluation']}; saved to {result['out']}"
    )
    if m.get("truncated_sentences"):
        out_console.print(f"[yellow]note[/]: {m['truncated_sentences']} sentences are longer than {m['max_tokens']}"
                          " tokens and were cut there")
    _print_machine(m["machine"])
    _print_kernels(result["kernels"])
    _print_stages(result.get("stages", []))
    _print_outcomes(result)


def _print_machine(machine: dict) -> None:
    out_console.print(f"kernels here: int8 {machine['int8_dot_product']} ({machine['int8']}); bf16"
                      f" {machine['bf16']}; native loops {machine['native']}")


def _print_kernels(kernels: dict[str, dict]) -> None:
    """One line per kernel that ran in the timed runs, with how many layers used it."""
    counts: dict[tuple[str, int], int] = {}
    for ran in kernels.values():
        key = (ran["kernel"], ran["rows"])
        counts[key] = counts.get(key, 0) + 1
    for (kernel, rows), count in sorted(counts.items()):
        out_console.print(f"ran: {kernel} on {count} layers ({rows} rows)")


def _print_stages(stages: list[dict]) -> None:
    """One line: the recipe's stages in the order they ran, with how many layers each changed."""
    if stages:
        parts = [f"{s['stage']} ({sum('done' in e for e in s['layers'].values())} layers)" for s in stages]
        out_console.print("stages: " + " -> ".join(parts))


def _print_outcomes(result: dict) -> None:
    """Every layer not quantized as asked: notes (quantized, but not quite as asked) and skipped ones."""
    for name, note in result.get("notes", {}).items():
        label = result.get("quantized", {}).get(name, "")
        out_console.print(f"[yellow]note[/]: {name}{f' ({label})' if label else ''}: {note}")
    for name, reason in result.get("skipped", {}).items():
        out_console.print(f"[yellow]kept in float[/]: {name}: {reason}")


@app.command("eval")
def eval_command(
    model: str = typer.Argument("minilm", help="Zoo name, transformers directory, or bitsmith directory."),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluate on this text file (one sentence per line)."),
    repeats: int = typer.Option(5, help="Timed runs (median reported)."),
    baseline: Optional[str] = typer.Option(
        None, "--baseline", help="Float model to compare with (zoo name or directory); needed for compressed-tensors"
        " directories, which do not name their original."),
    as_json: bool = JSON_OPTION,
):
    """Run MODEL's evaluation: a float model on its own, or a compressed directory against its float source."""
    from bitsmith.api.compress import check_counts, evaluate

    check_counts(repeats)
    metrics = evaluate(model, text=text, repeats=repeats, baseline=baseline)
    if as_json:
        _emit_json(metrics)
        return
    compared = "latency_ratio" in metrics
    table = Table(title=f"eval {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("evaluation", metrics["evaluation"])
    table.add_row("input batch", str(metrics.get("batch_shape")))
    for column, (float_value, value) in _fidelity_columns(metrics).items():
        if compared:
            table.add_row(column + " (float model)", float_value)
        table.add_row(column, value)
    table.add_row("size", _mb(metrics["bytes"]))
    table.add_row("latency", f"{metrics['latency_s'] * 1e3:.0f} ms")
    if compared:
        table.add_row("float latency, same run", f"{metrics['original_latency_s'] * 1e3:.0f} ms")
        table.add_row("latency vs float", f"{metrics['latency_ratio']:.2f}x")
    elif metrics.get("baseline", "") is None:
        table.add_row("compared with", "nothing: give --baseline FLOAT_MODEL")
    out_console.print(table)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A bitsmith model directory."),
    as_json: bool = JSON_OPTION,
):
    """List each layer's scheme, bits, bytes, sparsity and the kernel it runs on."""
    from bitsmith.api.inspect import inspect_checkpoint

    info = inspect_checkpoint(path)
    if as_json:
        _emit_json(info)
        return
    table = Table(title=f"{path}  (source: {info['source'].get('name') or info['source'].get('class')})")
    for column in ("layer", "module", "scheme", "bits", "bytes", "sparsity", "kernel"):
        table.add_column(column, justify="right" if column in ("bits", "bytes", "sparsity") else "left")
    quantized = info.get("quantized", {})
    for row in info["layers"]:
        kernel = row["kernel"]
        if "ran_at_compress" in row:
            ran = row["ran_at_compress"]
            kernel = f"{' | '.join(row.get('kernels_here', []))}; at compress: {ran['kernel']} ({ran['rows']} rows)"
        sparsity = f"{row['sparsity']:.0%} {row['pattern']}" if row.get("sparse_kernel") else ""
        table.add_row(row["name"], row["module"], quantized.get(row["name"], row["scheme"]),
                      f"{row['bits']} in {row['held_as']}" if "held_as" in row else str(row["bits"]),
                      f"{row['bytes']:,}", sparsity, kernel)
    out_console.print(table)
    _print_machine_inspect(info["machine"])
    reasons: dict[tuple[str, str], int] = {}
    for row in info["layers"]:
        if row["why"]:
            reasons[(row["module"], row["why"])] = reasons.get((row["module"], row["why"]), 0) + 1
    for (module, why), count in reasons.items():
        out_console.print(f"why ({module}, {count} layers): {why}")
    sparse = [row for row in info["layers"] if row.get("sparse_kernel")]
    if sparse:
        stored = sum(row["storage"].startswith("bitmask") for row in sparse)
        out_console.print(f"sparse layers: {len(sparse)}, {stored} stored as a bitmask; sparse kernel:"
                          f" {sparse[0]['sparse_kernel']}")
    out_console.print(
        f"quantized layers {_mb(info['quantized_bytes'])}, float tensors {_mb(info['float_bytes'])}, "
        f"file {_mb(info['file_bytes'])}"
    )
    if info.get("metrics"):
        m = info["metrics"]
        if "latency_ratio" in m:
            fidelity = ", ".join(f"{k} {v[1]}" for k, v in _fidelity_columns(m).items())
            out_console.print(f"measured at compress time: {fidelity}, latency {m['latency_ratio']}x float")
    resized = info.get("resized", {})
    if resized:
        name, tensors = next(iter(resized.items()))
        out_console.print(f"resized by structured pruning: {len(resized)} modules (e.g. {name}: weight"
                          f" {'x'.join(map(str, tensors.get('weight', [])))})")
    _print_stages(info.get("stages", []))
    _print_outcomes(info)


def _print_machine_inspect(machine: dict) -> None:
    out_console.print(f"this machine: {machine['cpu']}; int8 {machine['int8_dot_product']} ({machine['onednn_int8']});"
                      f" bf16 {machine['bf16']}; native loops {machine['native']}")


@app.command()
def analyze(
    model: str = typer.Argument("minilm", help="Zoo name or transformers directory (float)."),
    observers: bool = typer.Option(False, "--observers", help="Compare activation observers for a static recipe."),
    sensitivity: bool = typer.Option(False, "--sensitivity", help="Harm of each candidate on each layer alone,"
                                     " beside proxies and how well they rank it."),
    recipe: str = typer.Option("w8a8-static", "--recipe", "-r", help="--observers: the static recipe to analyze."),
    schemes: str = typer.Option(",".join(("w8a16", "w4a16", "nf4")), "--schemes", help="--sensitivity: candidates,"
                                " comma-separated one-stage recipes (names or YAML files; quantize or prune)."),
    group: str = typer.Option("layer", "--group", help="--sensitivity: change one layer at a time, or each"
                              " block's layers together (block)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="--sensitivity: regex over Linear names to analyze."),
    eval_windows: Optional[int] = typer.Option(None, "--eval-windows", help="--sensitivity, language models: judge"
                                               " on the first N held-out windows (default all)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="--sensitivity: where rows are kept and reused"
                                         " (default $BITSMITH_CACHE/sensitivity)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="--sensitivity: choose per-layer candidates within"
                                         " a budget (60MB, 4.5bits or 0.6x of the float time) and verify the mix."),
    write_recipe: Optional[Path] = typer.Option(None, "--write-recipe", help="--budget: write the chosen mix as a"
                                                " recipe YAML here."),
    base: Optional[str] = typer.Option(None, "--base", help="--budget: a quantize-only recipe for the rest of the"
                                       " model (embeddings, layers outside --layers); default: they stay float."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="--sensitivity: time each candidate's layer"
                                 " beside the float one on this machine."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration set (default: the model's own)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration samples to use"
                                                " (default 128; --sensitivity 32)."),
    as_json: bool = JSON_OPTION,
):
    """Analyses of one model: --observers (fidelity per activation observer under a static recipe) or
    --sensitivity (per-layer harm of each candidate scheme or pruning ratio, and which proxy ranks it)."""
    if observers == sensitivity:
        raise BitsmithError("say what to analyze: --observers or --sensitivity (one of them)")
    if (budget is None) != (write_recipe is None) or (budget is not None and not sensitivity):
        raise BitsmithError("--budget and --write-recipe go together, with --sensitivity")
    if budget is not None:
        _analyze_budget(model, schemes, budget, write_recipe, layers, eval_windows, cache, calib, calib_samples or 32,
                        as_json, group, base)
        return
    if sensitivity:
        _analyze_sensitivity(model, schemes, group, layers, eval_windows, cache, calib, calib_samples or 32, latency,
                             as_json)
        return
    from bitsmith.api.analyze import compare_observers

    with Progress(TextColumn("[bold]observers"), BarColumn(), TextColumn("{task.description}"),
                  console=err_console, disable=as_json, transient=True) as progress:
        task = progress.add_task("", total=5)
        rows = compare_observers(model, recipe, calib, calib_samples or 128,
                                 progress=lambda name: progress.update(task, advance=1, description=name))
    if as_json:
        _emit_json(rows)
        return
    table = Table(title=f"{model} under {recipe}: fidelity per activation observer")
    columns = [k for k in rows[0] if k not in ("batch_shape", "sentences", "test_samples")]
    for column in columns:
        table.add_column(column, justify="left" if column == "observer" else "right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    out_console.print(table)


def _analyze_budget(model, schemes, budget, write_recipe, layers, eval_windows, cache, calib, calib_samples,
                    as_json, group="layer", base=None) -> None:
    from bitsmith.api.mixed import mixed_precision, parse_budget

    parse_budget(budget)  # a malformed budget is refused before anything is measured
    if write_recipe.exists() and write_recipe.is_dir():
        raise BitsmithError(f"--write-recipe {write_recipe} is a directory; give a file name")
    names = [name.strip() for name in schemes.split(",") if name.strip()]
    with err_console.status("measuring per-layer sensitivity, choosing and verifying the mix", spinner="dots") \
            if not as_json else _nothing():
        result = mixed_precision(model, budget, names, write_recipe, calib, calib_samples, group=group, base=base,
                                 layers=layers, eval_limit=eval_windows, cache=cache)
    if as_json:
        _emit_json(result)
        return
    shown = ", ".join(f"{name} {count}" for name, count in result["counts"].items() if count)
    spent = {"bytes": f"{result['spent'] / 1e6:.2f} MB", "bits": f"{result['spent']:.3f} bits per weight",
             "latency": f"{result['spent']:.3f}x of the float layers' time"}[result["kind"]]
    out_console.print(f"{model} within {budget}: {shown} {group}s; {spent}; model {result['model_bytes'] / 1e6:.2f} MB"
                      f" (float {result['float_model_bytes'] / 1e6:.2f} MB)")
    out_console.print(f"{result['metric']}: predicted {result['predicted_harm']:.4g} (layers measured alone, summed),"
                      f" measured {result['measured_harm']:.4g} with the whole mix applied")
    out_console.print(f"recipe written to {result['recipe_file']}")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _analyze_sensitivity(model, schemes, group, layers, eval_windows, cache, calib, calib_samples, latency,
                         as_json) -> None:
    from bitsmith.api.sensitivity import analyze_sensitivity

    names = [name.strip() for name in schemes.split(",") if name.strip()]
    if not names:
        raise BitsmithError("--schemes names no candidate")
    if eval_windows is not None and eval_windows < 1:
        raise BitsmithError(f"--eval-windows must be at least 1, got {eval_windows}")
    with Progress(TextColumn("[bold]sensitivity"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=err_console, disable=as_json, transient=True) as progress:
        task = progress.add_task("", total=None)
        result = analyze_sensitivity(model, names, calib, calib_samples, group, layers, eval_windows, cache=cache,
                                     latency=latency, progress=lambda what, done: progress.update(task, completed=done,
                                                                                 description=what))
    if as_json:
        _emit_json(result)
        return
    rows = result["rows"]
    table = Table(title=f"{model}: {result['metric']} with one {result['group']} changed"
                        f" (proxy: {result['chosen']})")
    table.add_column("layer" if result["group"] == "layer" else "group")
    timed = "latency_s" in rows[0]
    for name in result["candidates"]:
        table.add_column(name, justify="right")
        if result["chosen"] != "measured":
            table.add_column(f"{name} {result['chosen']}", justify="right")
        if timed:
            table.add_column(f"{name} time", justify="right")
    by_group: dict[str, dict] = {}
    for row in rows:
        by_group.setdefault(row["group"], {})[row["candidate"]] = row
    for label, cells in by_group.items():
        values = [label]
        for name in result["candidates"]:
            if name not in cells:  # the candidate does not apply to this layer (a GPTQ scheme on a table)
                values.extend(["n/a"] * (1 + (result["chosen"] != "measured") + timed))
                continue
            values.append(f"{cells[name]['measured']:.4g}")
            if result["chosen"] != "measured":
                values.append(f"{cells[name][result['chosen']]:.4g}")
            if timed:
                cell = cells[name]
                ratio = f"{cell['latency_s'] / cell['float_latency_s']:.2f}x"
                values.append(ratio if cell["saves_time"] else f"{ratio} (no saving)")
        table.add_row(*values)
    out_console.print(table)
    shown = ", ".join(f"{proxy} {value:.3f}" if value is not None else f"{proxy} -"
                      for proxy, value in result["spearman"].items())
    out_console.print(f"Spearman against the measured harm: {shown}. {result['note']}.")
    reasons = dict.fromkeys(f"{item['candidate']}: {item['why']}" for item in result["not_applicable"])
    if reasons:
        out_console.print("n/a: " + "; ".join(reasons))
    for name, why in result["skipped"].items():
        out_console.print(f"{name} not analyzed: {why}")
    if timed:
        out_console.print("time: each layer's measured time with the candidate's kernel / the float layer's, on the"
                          " task's timed batch shape; 'no saving' where it was not measurably faster (inspect names"
                          " the kernels)")
    out_console.print(f"{result['measured_now']} measured now, {result['from_cache']} from the cache ({result['cache']})")


@app.command()
def tune(
    model: str = typer.Argument("minilm", help="Zoo name or transformers directory (float)."),
    target: str = typer.Option(..., "--target", "-t", help="Quality to keep: cosine>=0.999, perplexity_increase<=1"
                               " or accuracy_drop<=0.5."),
    objective: str = typer.Option("latency", "--objective", help="What the best recipe minimises: latency or size."),
    out: Path = typer.Option(Path("tune"), "--out", "-o", help="Directory of the trial log (resumed when it"
                             " exists), sensitivity.json, tune.json, the best recipe.yaml and its model/."),
    space: Optional[str] = typer.Option(None, "--space", help="Whole-model recipes to try, comma-separated (default:"
                                        " the built-in quantization and pruning recipes); an empty string for none."),
    strategy: str = typer.Option("pareto", "--strategy", help="pareto: per-layer mixes by bisection over the budget;"
                                 " greedy: INC-style fallback (all layers narrow, the most harmful back to float)."),
    mix: bool = typer.Option(True, "--mix/--no-mix", help="Search per-layer mixes after the whole-model recipes."),
    mix_candidates: Optional[str] = typer.Option(None, "--mix-candidates", help="What a layer may become,"
                                                 " comma-separated one-stage recipes (default by objective)."),
    mix_rounds: int = typer.Option(5, "--mix-rounds", help="Bisection rounds over the mix budget."),
    workers: int = typer.Option(1, "--workers", help="Trials at once, on Ray when it is installed."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Regex of the Linear layers the mixes may change."),
    group: str = typer.Option("layer", "--group", help="Mixes choose per layer, or per block (block)."),
    mix_base: Optional[str] = typer.Option(None, "--mix-base", help="A quantize-only recipe for what the mixes do"
                                           " not choose for (embeddings, layers outside --layers); default float."),
    eval_windows: Optional[int] = typer.Option(None, "--eval-windows", help="Held-out windows each layer's"
                                               " sensitivity is judged on (language models; default all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sensitivity probes."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration set (default: the model's own)."),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration samples to use."),
    repeats: int = typer.Option(5, help="Timed runs per trial (median reported)."),
    as_json: bool = JSON_OPTION,
):
    """Search recipes and per-layer mixes for the smallest or fastest model meeting a quality target, each
    evaluated for real."""
    from bitsmith.api.tune import tune as run_tune

    names = None if space is None else [name.strip() for name in space.split(",") if name.strip()]
    if names == [] and not mix and strategy != "greedy":
        raise BitsmithError("--space names no recipe and --no-mix leaves nothing to search")
    candidates = None if mix_candidates is None else [c.strip() for c in mix_candidates.split(",") if c.strip()]
    with Progress(TextColumn("[bold]tune"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=err_console, disable=as_json, transient=True) as progress:
        task = progress.add_task("", total=None)
        result = run_tune(model, target, objective, out, names, calib, calib_samples, repeats, strategy=strategy,
                          mix=mix, mix_candidates=candidates, mix_rounds=mix_rounds, workers=workers, layers=layers,
                          group=group, mix_base=mix_base,
                          eval_limit=eval_windows, seed=seed,
                          progress=lambda name, done: progress.update(task, completed=done, description=name))
    if as_json and result["met"]:
        _emit_json(result)
        return
    if not as_json:
        _print_tune(model, target, objective, result)
    if not result["met"]:
        closest = result["closest"]
        blocking = ", ".join(f"{b['layer']} ({b['least_harm']:.4g} > {b['allowed_harm']:.4g})"
                             for b in result.get("blocking", [])[:5])
        raise BitsmithError(f"no recipe met {target}; closest: {closest['name']} ({result['metric']}"
                            f" {closest[result['metric']]})" + (f"; layers no cheaper option of which alone meets it:"
                                                                f" {blocking}" if blocking else "")
                            + f"; every trial is in {result['log']}")


def _print_tune(model: str, target: str, objective: str, result: dict) -> None:
    key = result["metric"]
    table = Table(title=f"{model}: trials against {target} (objective: {objective})")
    for column in ("trial", key, "file", "latency", "front", "layers"):
        table.add_column(column, justify="left" if column in ("trial", "front", "layers") else "right")
    for trial in result["trials"]:
        marks = [m for m in ("size", "latency") if trial["name"] in result[f"front_{m}"]]
        name = f"[bold]{trial['name']}[/bold] (best)" if trial["name"] == result["best"] else trial["name"]
        counts = ", ".join(f"{n} {option}" for option, n in trial.get("counts", {}).items())
        table.add_row(name, f"{trial[key]:.6g}", f"{trial['bytes'] / 1e6:.2f} MB", f"{trial['latency_ratio']:.3f}x",
                      ", ".join(marks), counts)
    out_console.print(table)
    for name, why in result["failed"].items():
        out_console.print(f"{name}: did not run on this model: {why}")
    if "sensitivity" in result:
        out_console.print(f"sensitivity: {result['sensitivity']['note']}; the mixes use the measured harm")
        if result["no_saving"]:
            out_console.print(f"{len(result['no_saving'])} of the analyzed layers measured no {objective} saving with"
                              f" any candidate here (e.g. {result['no_saving'][0]}): no mix makes them cheaper")
    if result["workers"] > 1:
        out_console.print(f"{result['workers']} trials ran at once (Ray): their latencies were measured side by side")
    elif result["workers_asked"] > 1:
        out_console.print(f"--workers {result['workers_asked']}: Ray is not installed (pip install bitsmith[ray]),"
                          " so the trials ran one after another")
    if result["met"]:
        line = f"best meeting {target} by {objective}: {result['best']}; recipe written to {result['recipe_file']}"
        if "model_dir" in result:
            alone = result["model_dir"]
            line += f"; model in {alone['path']} ({alone['bytes'] / 1e6:.2f} MB, {alone['latency_ratio']:.3f}x alone)"
        out_console.print(line)


@app.command()
def export(
    path: Path = typer.Argument(..., help="A bitsmith model directory."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx, compressed-tensors, gptq or gguf."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write (e.g. model.onnx, model.gguf)."),
    dynamic: str = typer.Option("token", "--dynamic", help="W8A8-dynamic pattern in ONNX: token, tensor or block."),
    activations: str = typer.Option("u8", "--activations", help="Static int8 QDQ activations: u8 (U8S8) or s8 (S8S8)."),
    sparse: str = typer.Option("dense", "--sparse", help="compressed-tensors: pruned float layers dense, or as"
                               " sparse-bitmask (read by compressed-tensors <= 0.14 and bitsmith only)."),
    gguf_type: str = typer.Option("q8_0", "--gguf-type", help="GGUF: block type of the layers whose codes are no GGUF"
                                  " block already (q8_0, q4_0, q4_1, q4_k, q6_k); int4/int8 g32 codes are written as"
                                  " they are."),
    as_json: bool = JSON_OPTION,
):
    """Export a compressed model for another runtime: ONNX (QDQ, MatMulNBits) for ONNX Runtime;
    compressed-tensors or GPTQ transformers directories for transformers and vLLM; GGUF for llama.cpp."""
    from bitsmith.api.export import export_checkpoint

    result = export_checkpoint(path, fmt, out, dynamic_activations=dynamic, activation_type=activations, sparse=sparse,
                               gguf_type=gguf_type)
    if as_json:
        _emit_json(result)
        return
    if "layers" in result:
        layers = ", ".join(f"{n} {k}" for k, n in result["layers"].items())
        out_console.print(f"wrote {result['path']} ({_mb(result['bytes'])}, opset {result['opset']}): {layers}")
    elif "tensors" in result:
        tensors = ", ".join(f"{n} {kind}" for kind, n in result["tensors"].items())
        out_console.print(f"wrote {result['path']} ({_mb(result['bytes'])}), a GGUF file for llama.cpp: {tensors}")
    else:
        out_console.print(f"wrote {result['path']} ({_mb(result['bytes'])}), a {fmt} transformers model directory")
    for note in result.get("notes", []):
        out_console.print(f"note: {note}")


@app.command()
def report(
    path: Path = typer.Argument(..., help="A directory written by bitsmith compress --out or bitsmith tune --out."),
    out: Path = typer.Option(..., "--out", "-o", help="HTML file to write (one self-contained page)."),
    as_json: bool = JSON_OPTION,
):
    """Write one self-contained HTML page of a compressed model or a tune search: tables and plots."""
    from bitsmith.api.report import report as write_report

    result = write_report(path, out)
    if as_json:
        _emit_json(result)
        return
    out_console.print(f"wrote {result['path']} ({result['bytes'] / 1024:.0f} KB): sections"
                      f" {', '.join(result['sections'])}", markup=False, highlight=False)


zoo_app = typer.Typer(help="The bundled models.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("list")
def zoo_list(
    measure: bool = typer.Option(False, "--measure/--no-measure",
                                 help="Evaluate each built fp32 model now (default: the figures its build recorded)."),
    as_json: bool = JSON_OPTION,
):
    """All zoo entries with their evaluation and fp32 figure."""
    from bitsmith.io.models import load_model
    from bitsmith.evaluation.tasks import task_for
    from bitsmith.zoo import ZOO, figures, is_built

    rows = []
    for name, entry in ZOO.items():
        row = {"name": name, "description": entry.description, "evaluation": entry.evaluation,
               "task": entry.task, "built": is_built(name)}
        if not row["built"]:
            row["fp32"] = f"not built yet: bitsmith zoo build {name}"
        else:
            row["recorded"] = figures(name)
            if measure:
                loaded = load_model(name)
                own = task_for(loaded.source, loaded.tokenizer, model=loaded.model).own_figures(loaded.model)
                row["fp32"] = own.get("accuracy", own.get("perplexity", "reference"))
            else:
                row["fp32"] = row["recorded"]
        rows.append(row)
    if as_json:
        _emit_json(rows)
        return
    table = Table(title="bitsmith zoo")
    for column in ("name", "description", "evaluation", "fp32"):
        table.add_column(column)
    for row in rows:
        figure = row.get("fp32", "")
        if isinstance(figure, dict):  # the recorded figures: the headline one
            figure = figure.get("test_accuracy", figure.get("heldout_perplexity", figure.get("reference", figure)))
        table.add_row(row["name"], row["description"], row["evaluation"], str(figure))
    out_console.print(table)


@zoo_app.command("build")
def zoo_build(name: str = typer.Argument(..., help="Zoo entry to build (train) and cache."),
              force: bool = typer.Option(False, "--force", help="Rebuild even if cached."),
              as_json: bool = JSON_OPTION):
    """Train (or fetch from the package) a zoo model and cache it."""
    from bitsmith.zoo import build

    with Progress(TextColumn("[bold]building"), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, disable=as_json, transient=True) as progress:
        task = progress.add_task(name, total=None)
        info = build(name, force=force, progress=lambda text: progress.update(task, description=text))
    if as_json:
        _emit_json(info)
        return
    def shown(value):  # the pinned environment as NAME=value pairs, not a Python dict
        return " ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value

    out_console.print(", ".join(f"{k}: {shown(v)}" for k, v in info.items()))


@app.command()
def generate(
    model: str = typer.Argument(..., help="Zoo name (docs-lm, smollm2), transformers directory, or bitsmith directory."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text to continue (a user turn under a chat template)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; above 0: sampling at this temperature."),
    top_k: int = typer.Option(0, "--top-k", help="Sampling: keep the k likeliest tokens (0: all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sampling: keep the likeliest tokens up to this probability."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    chat: Optional[bool] = typer.Option(None, "--chat/--raw", help="Use the tokenizer's chat template (default:"
                                        " when it has one) or give the prompt as raw text."),
    decoder: str = typer.Option("torch", "--decoder", help="torch: transformers' generate on bitsmith's modules;"
                                " native: a Llama-family model at batch 1, a whole block a native call (int4 or"
                                " float32 layers); native-q8: the same with each int4 matmul's input rounded to int8"
                                " in blocks of 32, as llama.cpp does (faster, another numeric)."),
    as_json: bool = JSON_OPTION,
):
    """Generate text with a causal language model, float or compressed, on bitsmith's kernels."""
    from bitsmith.api.generate import generate as run

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = run(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 seed=seed, chat=chat, on_text=None if as_json else show, decoder=decoder)
    if as_json:
        _emit_json(result)
        return
    sys.stdout.write("\n")
    speed = result["decode_tokens_per_second"]
    err_console.print(f"{result['new_tokens']} tokens after a prompt of {result['prompt_tokens']};"
                      f" prefill {result['prefill_seconds']} s"
                      + (f", decode {speed} tokens/s" if speed else ""), highlight=False)


@app.command()
def recipes(as_json: bool = JSON_OPTION):
    """List the built-in recipes."""
    from bitsmith.recipe import builtin_recipes, load_recipe

    rows = [{"name": n, "description": load_recipe(n).description} for n in sorted(builtin_recipes())]
    if as_json:
        _emit_json(rows)
        return
    for row in rows:
        out_console.print(f"[bold]{row['name']}[/]: {row['description']}")


def _error_line(message: str) -> None:
    """One line on stderr, never wrapped."""
    sys.stderr.write("error: " + " ".join(message.split()) + "\n")


def _usage_error(err: BaseException) -> bool:
    """Click's usage errors, from whichever click the installed typer uses (its own vendored copy or click)."""
    return callable(getattr(err, "format_message", None)) and isinstance(getattr(err, "exit_code", None), int)


def _launch(nproc: int) -> int:
    """``bitsmith compress ... --nproc N``: the same command in N processes on this machine, joined by
    torch.distributed over the loopback address (no host name is looked up: a sandbox's or container's host name
    may not resolve); rank 0 writes and prints. Returns the exit status."""
    import socket
    import subprocess
    import tempfile
    import time

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    with socket.socket() as probe:  # a free port for rank 0's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory(prefix="bitsmith-nproc-") as tmp:
        logs = [open(os.path.join(tmp, f"{rank}.err"), "w+") for rank in range(nproc)]
        procs = [subprocess.Popen([sys.executable, "-m", "bitsmith.cli.main", *argv],
                                  env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                  stdout=None if rank == 0 else subprocess.DEVNULL, stderr=logs[rank])
                 for rank in range(nproc)]
        try:
            while any(p.poll() is None for p in procs):
                if any(p.returncode not in (None, 0) for p in procs):
                    break  # one failed: the others would wait for it in their next all-reduce
                time.sleep(0.1)
        except KeyboardInterrupt:
            _stop(procs)
            return 130
        _stop(procs)
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
    failed = [rank for rank, p in enumerate(procs) if p.returncode != 0]
    if not failed:
        sys.stderr.write(texts[0])
        return 0
    errors = [line for text in texts for line in text.splitlines() if line.startswith("error: ")]
    if errors:
        sys.stderr.write(errors[0] + "\n")
        return 2
    rank = failed[0]
    last = [line.strip() for line in texts[rank].splitlines() if line.strip()]
    sys.stderr.write(f"error: --nproc {nproc}: process {rank} failed (exit {procs[rank].returncode})"
                     + (f": {last[-1]}" if last else "") + "\n")
    return 1


def _stop(procs) -> None:
    """End the processes still running (SIGTERM, then SIGKILL after 10 s)."""
    import subprocess

    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> None:
    """Entry point: user errors are one line on stderr and exit status 2, never a traceback; Ctrl-C is 130."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        code = app(standalone_mode=False)
    except BitsmithError as err:
        _error_line(str(err))
        sys.exit(2)
    except KeyboardInterrupt:
        _error_line("interrupted")
        sys.exit(130)
    except Exception as err:
        name = type(err).__name__
        if name == "Exit" and isinstance(getattr(err, "exit_code", None), int):
            sys.exit(err.exit_code)
        if name == "Abort":  # Ctrl-C or end of input at a prompt
            _error_line("interrupted")
            sys.exit(130)
        if _usage_error(err):
            _error_line(err.format_message())
            sys.exit(2)
        if os.environ.get("BITSMITH_DEBUG"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        _error_line(f"unexpected {name}: {first} (set BITSMITH_DEBUG=1 for the traceback)")
        sys.exit(1)
    if isinstance(code, int) and not isinstance(code, bool) and code:
        if code == 130:  # typer turns Ctrl-C into Exit(130) and, with standalone_mode=False, returns it
            _error_line("interrupted")
        sys.exit(code)


if __name__ == "__main__":
    main()
