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


def _emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def compress(
    model: str = typer.Argument("minilm", help="Zoo name (minilm) or a local transformers model directory."),
    recipe: str = typer.Option("w8a8-dynamic", "--recipe", "-r", help="Built-in recipe name or a YAML file."),
    out: Path = typer.Option(..., "--out", "-o", help="New (or empty) directory to write the compressed model to."),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluate on this text file (one sentence per line)."),
    repeats: int = typer.Option(5, help="Timed runs per model (median reported)."),
    as_json: bool = JSON_OPTION,
):
    """Quantize MODEL by a recipe, compare it with the original on this machine, and save it."""
    from bitsmith.api.compress import compress as run_compress
    from bitsmith.api.recipes import load_recipe

    load_recipe(recipe)  # an unknown recipe fails before the model loads
    with Progress(
        TextColumn("[bold]quantizing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), console=err_console, disable=as_json, transient=True,
    ) as progress:
        task = progress.add_task("", total=None)

        def step(name: str) -> None:
            progress.update(task, advance=1, description=name)

        result = run_compress(model, recipe, out, text=text, repeats=repeats, progress=step)
    result.pop("model")
    if as_json:
        _emit_json(result)
        return
    m = result["metrics"]
    table = Table(title=f"{model} -> {recipe}  ({m['machine']['cpu']}, {m['machine']['threads']} threads)")
    for column in ("model", "size", "latency", "vs float", "mean cosine", "min cosine"):
        table.add_column(column, justify="right" if column != "model" else "left")
    table.add_row("float (original)", _mb(m["original_bytes"]), f"{m['original_latency_s'] * 1e3:.0f} ms", "1.00x", "1", "1")
    table.add_row(
        recipe, _mb(m["bytes"]), f"{m['latency_s'] * 1e3:.0f} ms", f"{m['latency_ratio']:.2f}x",
        f"{m['mean_cosine']:.5f}", f"{m['min_cosine']:.5f}",
    )
    out_console.print(table)
    out_console.print(
        f"size {m['size_ratio']:.3f}x of float; {result['quantized_layers']} layers quantized; "
        f"{m['sentences']} sentences, batch {m['batch_shape']}; saved to {result['out']}"
    )
    for name, reason in result["skipped"].items():
        out_console.print(f"[yellow]kept in float[/]: {name}: {reason}")


@app.command("eval")
def eval_command(
    model: str = typer.Argument("minilm", help="Zoo name, transformers directory, or bitsmith directory."),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluate on this text file (one sentence per line)."),
    repeats: int = typer.Option(5, help="Timed runs (median reported)."),
    as_json: bool = JSON_OPTION,
):
    """Run MODEL's evaluation: a float original, or a compressed directory against its float source."""
    from bitsmith.api.compress import evaluate

    metrics = evaluate(model, text=text, repeats=repeats)
    if as_json:
        _emit_json(metrics)
        return
    table = Table(title=f"eval {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("evaluation", metrics["evaluation"])
    table.add_row("sentences / batch", f"{metrics['sentences']} / {metrics['batch_shape']}")
    table.add_row("mean cosine to float", f"{metrics['mean_cosine']:.5f}")
    table.add_row("min cosine to float", f"{metrics['min_cosine']:.5f}")
    table.add_row("size", _mb(metrics["bytes"]))
    table.add_row("latency", f"{metrics['latency_s'] * 1e3:.0f} ms")
    if metrics["compressed"]:
        table.add_row("float latency, same run", f"{metrics['original_latency_s'] * 1e3:.0f} ms")
        table.add_row("latency vs float", f"{metrics['latency_ratio']:.2f}x")
    out_console.print(table)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A bitsmith model directory."),
    as_json: bool = JSON_OPTION,
):
    """List each layer's scheme, bits, bytes and the kernel it runs on."""
    from bitsmith.api.inspect import inspect_checkpoint

    info = inspect_checkpoint(path)
    if as_json:
        _emit_json(info)
        return
    table = Table(title=f"{path}  (source: {info['source'].get('name') or info['source'].get('class')})")
    for column in ("layer", "module", "scheme", "bits", "bytes", "kernel"):
        table.add_column(column, justify="right" if column in ("bits", "bytes") else "left")
    for row in info["layers"]:
        table.add_row(row["name"], row["module"], row["scheme"], str(row["bits"]), f"{row['bytes']:,}", row["kernel"])
    out_console.print(table)
    out_console.print(
        f"quantized layers {_mb(info['quantized_bytes'])}, float tensors {_mb(info['float_bytes'])}, "
        f"file {_mb(info['file_bytes'])}"
    )
    if info.get("metrics"):
        m = info["metrics"]
        out_console.print(
            f"measured at compress time: mean cosine {m.get('mean_cosine')}, latency {m.get('latency_ratio')}x float"
        )
    for name, reason in info.get("skipped", {}).items():
        out_console.print(f"[yellow]kept in float[/]: {name}: {reason}")


@app.command()
def recipes(as_json: bool = JSON_OPTION):
    """List the built-in recipes."""
    from bitsmith.api.recipes import builtin_recipes, load_recipe

    rows = [{"name": n, "description": load_recipe(n).description} for n in sorted(builtin_recipes())]
    if as_json:
        _emit_json(rows)
        return
    for row in rows:
        out_console.print(f"[bold]{row['name']}[/]: {row['description']}")


def _error_line(message: str) -> None:
    """One line on stderr, never wrapped."""
    sys.stderr.write("error: " + " ".join(message.split()) + "\n")


def main() -> None:
    """Entry point: user errors are one line on stderr and exit status 2, never a traceback."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app(standalone_mode=False)
    except BitsmithError as err:
        _error_line(str(err))
        sys.exit(2)
    except KeyboardInterrupt:
        _error_line("interrupted")
        sys.exit(130)
    except Exception as err:  # click usage errors and the like
        import click

        if isinstance(err, click.exceptions.ClickException):
            _error_line(err.format_message())
            sys.exit(err.exit_code or 2)
        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        if os.environ.get("BITSMITH_DEBUG"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        _error_line(f"unexpected {type(err).__name__}: {first} (set BITSMITH_DEBUG=1 for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
