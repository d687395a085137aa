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
import math
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bitsmith.algorithms.mixed import choose_mix
from bitsmith.api.sensitivity import analyze_sensitivity, candidate
from bitsmith.errors import BitsmithError
from bitsmith.evaluation.tasks import task_for
from bitsmith.io.models import load_model
import bitsmith.stages  # noqa: F401  (registers every stage handler run_stages looks up)
from bitsmith.pipeline import run_stages
from bitsmith.recipe import QuantizeConfig, Recipe, load_recipe
from bitsmith.recipe.stages import PruneConfig

__all__ = ["parse_budget", "mixed_precision", "model_bytes", "mix_recipe", "mix_table", "MixTable"]

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


def mix_recipe(name: str, choice: dict[str, str], description: str, members: dict[str, list[str]] | None = None,
               base: Recipe | None = None) -> Recipe:
    """One stage per chosen candidate, its Linear rule aimed at the layers its groups hold (``members``: group ->
    layers, default each group its own layer); pruning stages first. ``base`` (a quantize-only recipe) does the rest
    of the model, every analyzed layer in its ``ignore``: what the mix keeps in float stays float."""
    members = members or {group: [group] for group in choice}
    stages = []
    for cand_name in dict.fromkeys(choice.values()):
        if cand_name == "float":
            continue
        cand = candidate(cand_name)
        layers = sorted(layer for group, chosen in choice.items() if chosen == cand_name for layer in members[group])
        data = cand.stage.to_dict()
        rule = next(r for r in data["rules"] if "Linear" in r["targets"])
        data["rules"], data["ignore"] = [{**rule, "targets": layers}], []
        stages.append((isinstance(cand.stage, PruneConfig), {cand.stage.stage: data}))
    stages.sort(key=lambda item: not item[0])  # stable: pruning stages, then the rest in candidate order
    stages = [stage for _, stage in stages]
    if base is not None:
        analyzed = sorted(layer for group in choice for layer in members[group])
        for stage in base.stages:
            if not isinstance(stage, QuantizeConfig):
                raise BitsmithError(f"the mix's base recipe '{base.name}' has a {stage.stage} stage; give a recipe of"
                                    " quantize stages only")
            data = stage.to_dict()
            data["ignore"] = [*data.get("ignore", []), *analyzed]
            stages.append({stage.stage: data})
    return Recipe.model_validate({"name": name, "description": description, "stages": stages})


@dataclass
class MixTable:
    """The sensitivity table as the integer program reads it: ``options[0]`` is "float" (harm 0, the float layer's
    cost), then the candidates; ``harm[l][o]`` the measured harm (negatives clipped to 0), ``cost[l][o]`` bytes or
    measured seconds; both infinite where the candidate does not apply to the layer (a GPTQ scheme on a table)."""

    kind: str
    layers: list[str]  # the groups the table was measured by: layers, or blocks
    options: list[str]
    harm: list[list[float]]
    cost: list[list[float]]
    members: dict[str, list[str]]  # group -> its Linear layers

    @property
    def float_cost(self) -> float:
        return sum(row[0] for row in self.cost)

    @property
    def cheapest_cost(self) -> float:
        return sum(min(row) for row in self.cost)  # float is always there: every row has a finite minimum

    def choose(self, limit: float) -> dict[str, str]:
        """layer -> option for the least summed harm within ``limit`` (``choose_mix``)."""
        picks = choose_mix(self.harm, self.cost, limit)
        return {layer: self.options[pick] for layer, pick in zip(self.layers, picks)}

    def predicted(self, choice: dict[str, str]) -> tuple[float, float]:
        """(summed harm, summed cost) the table predicts for ``choice``."""
        index = {name: i for i, name in enumerate(self.options)}
        picks = [index[choice[layer]] for layer in self.layers]
        return (sum(h[p] for h, p in zip(self.harm, picks)), sum(c[p] for c, p in zip(self.cost, picks)))


def mix_table(table: dict, kind: str) -> MixTable:
    """``MixTable`` of an ``analyze_sensitivity`` result; ``kind`` "latency" costs measured time, else bytes."""
    layers = list(dict.fromkeys(row["group"] for row in table["rows"]))
    rows = {(row["candidate"], row["group"]): row for row in table["rows"]}
    if kind == "latency" and any("latency_s" not in row for row in table["rows"]):
        raise BitsmithError("a latency budget needs each layer's measured time; analyze with latency on")

    def cost(row: dict, prefix: str = "") -> float:
        return row[f"{prefix}latency_s"] if kind == "latency" else row[f"{prefix}bytes"]

    missing = {"measured": math.inf, "bytes": math.inf, "latency_s": math.inf}
    harm = [[0.0, *(max(rows.get((c, layer), missing)["measured"], 0.0) for c in table["candidates"])]
            for layer in layers]
    first = {}
    for row in table["rows"]:
        first.setdefault(row["group"], row)
    costs = [[cost(first[layer], "float_"), *(cost(rows.get((c, layer), missing)) for c in table["candidates"])]
             for layer in layers]
    members = {row["group"]: list(row["layers"]) for row in table["rows"]}
    return MixTable(kind, layers, ["float", *table["candidates"]], harm, costs, members)


def _outside_bytes(float_model: nn.Module, mix: MixTable, base: Recipe | None, calibration) -> int:
    """Bytes of everything the mix does not choose for: as it is, or as ``base`` makes it."""
    analyzed = [layer for group in mix.layers for layer in mix.members[group]]
    modules = dict(float_model.named_modules())
    float_analyzed = sum(model_bytes(modules[layer]) for layer in analyzed)
    if base is None:
        return model_bytes(float_model) - float_analyzed
    rest = copy.deepcopy(float_model)
    run_stages(rest, mix_recipe("base", {group: "float" for group in mix.layers}, "", mix.members, base), calibration)
    return model_bytes(rest) - float_analyzed


def mixed_precision(model: str | Path, budget: str, candidates: list[str] | None = None,
                    out: str | Path | None = None, calib=None, calib_samples: int = 32, group: str = "layer",
                    base: str | None = None, **analysis) -> dict:
    """Choose, write (``out``: the recipe YAML) and verify a per-layer (or per-block: ``group``) mix within
    ``budget`` (module docstring); ``base`` a quantize-only recipe for the rest of the model (default: float)."""
    kind, value = parse_budget(budget)
    base_recipe = load_recipe(base) if base else None
    table = analyze_sensitivity(model, candidates, calib, calib_samples, group=group,
                                latency=kind == "latency", **analysis)
    loaded = load_model(model)
    float_model = loaded.model.eval()
    modules = dict(float_model.named_modules())
    task = task_for(loaded.source, loaded.tokenizer, None, model=float_model)
    calibration = task.calibration(calib, calib_samples)
    mix = mix_table(table, kind)
    analyzed = [layer for g in mix.layers for layer in mix.members[g]]
    weights = sum(modules[layer].weight.numel() for layer in analyzed)
    outside = _outside_bytes(float_model, mix, base_recipe, calibration) if kind == "bytes" else 0
    limit = {"bytes": value - outside, "bits": value * weights / 8, "latency": value * mix.float_cost}[kind]
    if limit <= 0:
        raise BitsmithError(f"the budget {budget} is below what the layers outside the analysis take"
                            f" ({outside / 1e6:.2f} MB)")
    choice = mix.choose(limit)
    counts = {name: sum(1 for chosen in choice.values() if chosen == name) for name in mix.options}
    recipe = mix_recipe(f"mix-{budget.strip()}", choice, f"per-{group} mix chosen by bitsmith for {model} within"
                        f" {budget} ({', '.join(f'{n}: {c} {group}s' for n, c in counts.items() if c)}); the rest of"
                        f" the model {'by ' + base_recipe.name if base_recipe else 'stays as it is'}", mix.members,
                        base_recipe)
    predicted_harm, predicted_cost = mix.predicted(choice)

    mixed = copy.deepcopy(float_model)
    if recipe.stages:
        run_stages(mixed, recipe, calibration)
    measured = task.judge(float_model, analysis.get("eval_limit"))(mixed)
    mixed_modules = dict(mixed.named_modules())
    layer_bytes = sum(model_bytes(mixed_modules[layer]) for layer in analyzed)
    spent = {"bytes": model_bytes(mixed), "bits": 8 * layer_bytes / weights,
             "latency": predicted_cost / mix.float_cost}[kind]
    if out is not None:
        Path(out).write_text(recipe.to_yaml())
    return {
        "model": str(model), "budget": budget, "kind": kind, "metric": table["metric"], "choice": choice,
        "counts": counts, "predicted_harm": predicted_harm, "measured_harm": measured,
        "spent": spent, "model_bytes": model_bytes(mixed), "float_model_bytes": model_bytes(float_model),
        "average_bits": 8 * layer_bytes / weights, "recipe": recipe.to_dict(), "recipe_file": str(out) if out else None,
        "analysis": {k: table[k] for k in ("chosen", "note", "spearman", "measured_now", "from_cache", "cache")},
    }
