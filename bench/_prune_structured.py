"""bench_prune.py's part ``structured``: structured pruning on MiniLM (FFN channels) and digits-cnn (convolution
channels) at 25% and 50%, beside the float model, in one process: latency (interleaved repeats on the task's
timed batch), the saved model.safetensors, the FLOPs of one forward on that batch (torch's FlopCounterMode:
matrix products and convolutions), and quality (MiniLM: mean cosine of sentence embeddings to the float model;
digits-cnn: test accuracy). Each pruned model is saved and loaded back (bitsmith.load; MiniLM also by plain
transformers, whose output must match) before it is timed.

Latency is measured twice, in one interleaved loop: eager, the model as bitsmith.load returns it, and compiled,
the same model under torch.compile with inductor's freezing, timed in a loop of its own (weights as constants: BatchNorm folded into the
convolution before it, ReLU and pooling fused into one loop), as a CPU deployment runs it. FLOPs count only the
products; in eager mode BatchNorm, ReLU and max-pooling are separate passes over memory whose cost falls with
the channel count (0.75x at 25%), not with the products (0.5625x for a conv whose inputs and outputs both
lose 25%), so eager latency cannot fall in proportion on a convolutional model; the compiled one is the one held
to the target.

Targets at 25%: the saved file is smaller, and the compiled latency falls at least in proportion to the FLOPs
removed (latency ratio <= FLOPs ratio); the ratio of the two falls is reported for both modes and at 50% too.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

STRUCTURED = {"minilm": "ffn", "digits-cnn": "Conv2d"}
FRACTIONS = (0.25, 0.5)


def _flops(run) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        run()
    return counter.get_total_flops()


def _compiled(model):
    """The deployed form of ``model`` (module docstring): torch.compile with inductor's freezing."""
    import torch._dynamo
    import torch._inductor.config

    torch._inductor.config.freezing = True
    torch._dynamo.config.cache_size_limit = 64  # one graph per model instance; six models share two classes
    return torch.compile(model, dynamic=False)


def _recipe(kind: str, fraction: float):
    from bitsmith.recipe import Recipe

    stage = {"prune_structured": {"rules": [{"targets": [kind], "fraction": fraction}],
                                  "multiple_of": 8 if kind == "ffn" else 1}}
    return Recipe.model_validate({"name": f"structured-{kind}-{round(fraction * 100)}", "stages": [stage]})


def _quality(task, float_model, model) -> dict:
    figures = task.fidelity(float_model, model)
    if "mean_cosine" in figures:
        return {"mean_cosine": figures["mean_cosine"]}
    return {"accuracy": figures["accuracy"], "float_accuracy": figures.get("float_accuracy")}


def _transformers_matches(directory: Path, model, task) -> bool:
    import transformers

    plain = transformers.AutoModel.from_pretrained(directory).eval()
    with torch.inference_mode():
        return bool(torch.allclose(task.runner(plain)(), task.runner(model)(), atol=1e-5))


def structured_part(args, repeats: int = 11) -> tuple[dict, list[tuple[str, bool]]]:
    import bitsmith
    from bitsmith.evaluation.measure import interleaved_latency
    from bitsmith.evaluation.tasks import task_for
    from bitsmith.io.models import load_model

    results, checks = {}, []
    work = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    for name, kind in STRUCTURED.items():
        loaded = load_model(name)
        task = task_for(loaded.source, loaded.tokenizer, None, model=loaded.model)
        calibration = task.calibration(None, 128)
        bitsmith.save(loaded.model, work / f"{name}-float", tokenizer=loaded.tokenizer)
        rows = {"float": {"bytes": (work / f"{name}-float" / "model.safetensors").stat().st_size,
                          "flops": _flops(task.runner(loaded.model))}}
        models = {"float": bitsmith.load(work / f"{name}-float")}  # every row timed as bitsmith.load returns it
        for fraction in FRACTIONS:
            label = f"{kind}-{round(fraction * 100)}%"
            pruned = copy.deepcopy(loaded.model)
            report = bitsmith.prune_(pruned, _recipe(kind, fraction), calibration)
            directory = work / f"{name}-{label}"
            bitsmith.save(pruned, directory, tokenizer=loaded.tokenizer)
            restored = bitsmith.load(directory)  # what is timed is what a user loads
            row = {"bytes": (directory / "model.safetensors").stat().st_size, "flops": _flops(task.runner(restored)),
                   "parameters_removed": report.stages[0].summary["parameters_removed"],
                   **_quality(task, loaded.model, restored)}
            if name == "minilm":
                row["transformers_loads"] = _transformers_matches(directory, restored, task)
            rows[label], models[label] = row, restored
        # two loops: inductor's worker threads still spin for a while after a compiled call, which slowed the eager
        # call timed right after one by 2x on MiniLM
        latency = interleaved_latency({label: task.runner(m) for label, m in models.items()}, repeats)
        compiled = {f"{label} compiled": task.runner(_compiled(m)) for label, m in models.items()}
        latency.update(interleaved_latency(compiled, repeats))
        for label, row in rows.items():
            row["latency_s"] = latency[label]
            row["latency_ratio"] = latency[label] / latency["float"]
            row["compiled_latency_s"] = latency[f"{label} compiled"]
            row["compiled_latency_ratio"] = latency[f"{label} compiled"] / latency["float compiled"]
            row["flops_ratio"] = row["flops"] / rows["float"]["flops"]
            row["size_ratio"] = row["bytes"] / rows["float"]["bytes"]
        _print(name, task, rows, repeats)
        first = rows[f"{kind}-25%"]
        checks.append((f"{name} {kind} 25%: saved file smaller ({first['size_ratio']:.3f}x)", first["size_ratio"] < 1))
        checks.append((f"{name} {kind} 25%: compiled latency falls at least in proportion to the FLOPs removed"
                       f" (latency {first['compiled_latency_ratio']:.3f}x vs FLOPs {first['flops_ratio']:.3f}x;"
                       f" eager {first['latency_ratio']:.3f}x, not a target)",
                       first["compiled_latency_ratio"] <= first["flops_ratio"]))
        if name == "minilm":
            checks.append(("minilm ffn 25%: plain transformers loads the saved directory, same output",
                           bool(first["transformers_loads"])))
        results[name] = rows
    return results, checks


def _print(name: str, task, rows: dict, repeats: int) -> None:
    quality = "mean cosine" if "mean_cosine" in rows[next(iter(rows.keys() - {"float"}))] else "test accuracy"
    print(f"\n{name}: structured pruning, 128 calibration samples; latency: median of {repeats} interleaved runs"
          f" on {task.evaluation.split(';')[0]}\n")
    print(f"| row | model.safetensors MB | size | parameters removed | FLOPs | eager ms | eager | falls ratio"
          f" | compiled ms | compiled | falls ratio | {quality} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        falls = compiled_falls = ""
        if label != "float" and row["flops_ratio"] < 1:
            falls = f"{(1 - row['latency_ratio']) / (1 - row['flops_ratio']):.2f}"
            compiled_falls = f"{(1 - row['compiled_latency_ratio']) / (1 - row['flops_ratio']):.2f}"
        if quality == "mean cosine":
            value = "1" if label == "float" else f"{row['mean_cosine']:.5f}"
        else:
            value = "" if label == "float" else f"{100 * row['accuracy']:.2f}% (float {100 * row['float_accuracy']:.2f}%)"
        removed = "" if label == "float" else f"{100 * row['parameters_removed']:.1f}%"
        print(f"| {label} | {row['bytes'] / 1e6:.2f} | {row['size_ratio']:.3f}x | {removed} | {row['flops_ratio']:.3f}x"
              f" | {1e3 * row['latency_s']:.1f} | {row['latency_ratio']:.3f}x | {falls}"
              f" | {1e3 * row['compiled_latency_s']:.1f} | {row['compiled_latency_ratio']:.3f}x | {compiled_falls}"
              f" | {value} |")
    print("\nfalls ratio: (1 - latency ratio) / (1 - FLOPs ratio); at least 1 is a latency fall in proportion")
