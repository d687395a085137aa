"""Analyses that compare choices on one model: which activation observer keeps it closest to float."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from bitsmith.algorithms.observers import OBSERVERS
from bitsmith.errors import BitsmithError
from bitsmith.evaluation.tasks import task_for
from bitsmith.io.models import load_model
import bitsmith.stages  # noqa: F401  (registers every stage handler run_stages looks up)
from bitsmith.pipeline import run_stages
from bitsmith.recipe import QuantizeConfig, Recipe, load_recipe

__all__ = ["with_observer", "compare_observers"]


def with_observer(recipe: Recipe, observer: str) -> Recipe:
    """The same recipe with every static activation rule set to ``observer``."""
    data = recipe.to_dict()
    for stage in data["stages"]:
        for rule in stage.get(QuantizeConfig.stage, {}).get("rules", []):
            activations = (rule.get("scheme") or {}).get("activations")
            if activations and not activations.get("dynamic", True):
                activations["observer"] = observer
    return Recipe.model_validate(data)


def compare_observers(
    model: str | Path, recipe: str = "w8a8-static", calib: str | Path | None = None, calib_samples: int = 128,
    observers: list[str] | None = None, progress=None,
) -> list[dict]:
    """Fidelity of ``model`` under ``recipe`` with each observer, on the same calibration data."""
    base = load_recipe(recipe)
    if not any(stage.is_static for stage in base.stages_of(QuantizeConfig)):
        raise BitsmithError(f"recipe '{recipe}' has no static activations: observers do not apply to it")
    loaded = load_model(model)
    if loaded.compressed:
        raise BitsmithError(f"{model} is already compressed; analyze its float original")
    task = task_for(loaded.source, loaded.tokenizer, model=loaded.model)
    calibration = task.calibration(calib, calib_samples)
    rows = []
    for name in observers or list(OBSERVERS):
        quantized = copy.deepcopy(loaded.model)
        start = time.perf_counter()
        run_stages(quantized, with_observer(base, name), calibration)
        seconds = time.perf_counter() - start
        rows.append({"observer": name, "quantize_s": round(seconds, 2), **task.fidelity(loaded.model, quantized)})
        if progress is not None:
            progress(name)
    return rows
