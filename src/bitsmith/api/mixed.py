"""Mixed precision under a budget: per-layer options chosen by an integer program, then verified for real.

The per-layer table comes from ``analyze_sensitivity`` (each candidate's measured harm, bytes and, for a latency
budget, measured time, with every layer alone changed); each layer may also stay float (harm 0). Budgets:

    "60MB", "1.5GB", "900000B"  | every tensor of the model (the layers outside the analysis count as they are)
    "4.5bits"                   | average bits per weight over the analyzed layers, scales and biases included
    "0.6x"                      | the analyzed layers' summed measured time, as a fraction of their float time

``algorithms.mixed.choose_mix`` picks the least summed harm within the budget; the result is a plain recipe
(one stage per candidate, its rules naming the layers it got; pruning before quantization), applied to a copy
of the float model and judged by the task, so what is reported is measured, not predicted.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from torch import nn

from bitsmith.algorithms.mixed import choose_mix
from bitsmith.api.sensitivity import analyze_sensitivity, candidate
from bitsmith.errors import BitsmithError
from bitsmith.evaluation.tasks import task_for
from bitsmith.io.models import load_model
from bitsmith.pipeline import run_stages
from bitsmith.recipe import Recipe
from bitsmith.recipe.stages import PruneConfig

__all__ = ["parse_budget", "mixed_precision", "model_bytes"]

_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def parse_budget(text: str) -> tuple[str, float]:
    """("bytes" | "bits" | "latency", value) from ``"60MB"``, ``"4.5bits"`` or ``"0.6x"``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(B|KB|MB|GB|bits|x)\s*", str(text), flags=re.IGNORECASE)
    if match is None:
        raise BitsmithError(f"budget {text!r} is not a size (60MB), an average width (4.5bits) or a latency"
                            " fraction (0.6x)")
    value, unit = float(match.group(1)), match.group(2)
    if value <= 0:
        raise BitsmithError(f"budget {text!r} must be positive")
    if unit.lower() == "bits":
        return "bits", value
    if unit.lower() == "x":
        return "latency", value
    return "bytes", value * _UNITS[unit.upper()]


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, a tensor shared by two modules (a tied head) counted once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor is None or tensor.data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _recipe(name: str, choice: dict[str, str], description: str) -> Recipe:
    """One stage per chosen candidate, its Linear rule aimed at the layers it got; pruning stages first."""
    stages = []
    for cand_name in dict.fromkeys(choice.values()):
        if cand_name == "float":
            continue
        cand = candidate(cand_name)
        layers = [layer for layer, chosen in choice.items() if chosen == cand_name]
        data = cand.stage.to_dict()
        rule = next(r for r in data["rules"] if "Linear" in r["targets"])
        data["rules"], data["ignore"] = [{**rule, "targets": layers}], []
        stages.append((isinstance(cand.stage, PruneConfig), {cand.stage.stage: data}))
    stages.sort(key=lambda item: not item[0])  # stable: pruning stages, then the rest in candidate order
    return Recipe.model_validate({"name": name, "description": description,
                                  "stages": [stage for _, stage in stages]})


def mixed_precision(model: str | Path, budget: str, candidates: list[str] | None = None,
                    out: str | Path | None = None, calib=None, calib_samples: int = 32, **analysis) -> dict:
    """Choose, write (``out``: the recipe YAML) and verify a per-layer mix within ``budget`` (module docstring)."""
    kind, value = parse_budget(budget)
    table = analyze_sensitivity(model, candidates, calib, calib_samples, group="layer",
                                latency=kind == "latency", **analysis)
    loaded = load_model(model)
    float_model = loaded.model.eval()
    modules = dict(float_model.named_modules())
    layers = list(dict.fromkeys(row["group"] for row in table["rows"]))
    rows = {(row["candidate"], row["group"]): row for row in table["rows"]}
    options = ["float", *table["candidates"]]

    def cost(row: dict) -> float:
        return row["latency_s"] if kind == "latency" else row["bytes"]

    def float_cost(layer: str) -> float:
        first = rows[(table["candidates"][0], layer)]
        return first["float_latency_s"] if kind == "latency" else first["float_bytes"]

    harm = [[0.0, *(max(rows[(c, layer)]["measured"], 0.0) for c in table["candidates"])] for layer in layers]
    costs = [[float_cost(layer), *(cost(rows[(c, layer)]) for c in table["candidates"])] for layer in layers]
    weights = sum(modules[layer].weight.numel() for layer in layers)
    float_layers = sum(float_cost(layer) for layer in layers)
    outside = model_bytes(float_model) - sum(rows[(table["candidates"][0], layer)]["float_bytes"] for layer in layers)
    limit = {"bytes": value - outside, "bits": value * weights / 8, "latency": value * float_layers}[kind]
    if limit <= 0:
        raise BitsmithError(f"the budget {budget} is below what the layers outside the analysis take"
                            f" ({outside / 1e6:.2f} MB)")
    picks = choose_mix(harm, costs, limit)
    choice = {layer: options[pick] for layer, pick in zip(layers, picks)}
    counts = {name: sum(1 for chosen in choice.values() if chosen == name) for name in options}
    recipe = _recipe(f"mix-{budget.strip()}", choice, f"per-layer mix chosen by bitsmith for {model} within {budget}"
                     f" ({', '.join(f'{n}: {c} layers' for n, c in counts.items() if c)}); layers not named stay as"
                     " they are")

    task = task_for(loaded.source, loaded.tokenizer, None, model=float_model)
    mixed = copy.deepcopy(float_model)
    if recipe.stages:
        run_stages(mixed, recipe, task.calibration(calib, calib_samples))
    measured = task.judge(float_model)(mixed)
    mixed_modules = dict(mixed.named_modules())
    layer_bytes = sum(model_bytes(mixed_modules[layer]) for layer in layers)
    spent = {"bytes": model_bytes(mixed), "bits": 8 * layer_bytes / weights,
             "latency": sum(c[p] for c, p in zip(costs, picks)) / float_layers}[kind]
    if out is not None:
        Path(out).write_text(recipe.to_yaml())
    return {
        "model": str(model), "budget": budget, "kind": kind, "metric": table["metric"], "choice": choice,
        "counts": counts, "predicted_harm": sum(h[p] for h, p in zip(harm, picks)), "measured_harm": measured,
        "spent": spent, "model_bytes": model_bytes(mixed), "float_model_bytes": model_bytes(float_model),
        "average_bits": 8 * layer_bytes / weights, "recipe": recipe.to_dict(), "recipe_file": str(out) if out else None,
        "analysis": {k: table[k] for k in ("chosen", "note", "spearman", "measured_now", "from_cache", "cache")},
    }
