"""``bitsmith tune``: evaluate candidates for real, keep every trial in a resumable log, return the Pareto fronts
and the best recipe meeting a quality target.

A trial is ``compress`` of the float model by one recipe, saved to a scratch directory for its file's bytes:
quality by the task's own metric, the saved file's bytes, latency against the float model timed in turn. Each
finished trial is appended to ``DIR/trials.jsonl`` at once, so an interrupted search resumes without repeating
it, and the same log gives the same choice. The log's first line names the model (a fingerprint of its weights):
a log from another model is refused.

    target                          | metric (from the task's fidelity)
    cosine>=0.999                   | mean cosine of the embeddings to float
    perplexity_increase<=1          | % perplexity increase over float
    accuracy_drop<=0.5              | test accuracy points lost

The search, in order (``strategy="pareto"``):
1. whole-model recipes: the built-in quantization and pruning recipes that apply (or ``space``);
2. per-layer mixes: ``analyze_sensitivity`` measures each layer under each mix candidate (harm, bytes, time with
   the kernel that would run; written to ``DIR/sensitivity.json`` and reused), then the cheapest budget whose mix
   (``mixed.choose_mix``) meets the target *as measured* is found by bisection (``algorithms.search``), one
   budget per worker a round.

``strategy="greedy"`` replaces step 2 with Intel Neural Compressor's fallback: every analyzed layer by the
cheapest candidate, then the most harmful layers returned to float one at a time until the target holds.

Trials run ``workers`` at a time on Ray when it is installed (each worker on ``cores / workers`` threads, so
latencies measured side by side are contended: the best is measured again alone), one after another otherwise.
The best trial's model is saved to ``DIR/model``; ``DIR/tune.json`` holds the summary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from bitsmith.algorithms.search import blocking_layers, budget_at, greedy_order, next_fractions, pareto_front
from bitsmith.api.compress import compress
from bitsmith.api.mixed import mix_recipe, mix_table
from bitsmith.api.sensitivity import TABLE_VERSION, analyze_sensitivity, fingerprint
from bitsmith.errors import BitsmithError
from bitsmith.evaluation.tasks import task_for
from bitsmith.io.models import load_model
from bitsmith.recipe import QuantizeConfig, Recipe, load_recipe

__all__ = ["parse_target", "tune", "DEFAULT_SPACE", "DEFAULT_MIX", "TARGETS", "STRATEGIES"]

# metric name -> (the fidelity key, better is "higher" or "lower")
TARGETS = {
    "cosine": ("mean_cosine", "higher"),
    "perplexity_increase": ("perplexity_increase_pct", "lower"),
    "accuracy_drop": ("accuracy_drop_points", "lower"),
}
DEFAULT_SPACE = ("bf16", "fp8-w", "w8a16", "w8a8-dynamic", "w8a8-static", "smoothquant-w8a8", "nf4", "w4a16",
                 "mxfp4", "gptq-w4a16", "awq-w4a16", "gptq-w3a16", "sparsegpt-50-w4a16")
# per-layer mix candidates by objective: for latency those with a kernel that can save time here, for size the
# narrow ones (a pruned layer costs a float layer's bytes and time in the table, so it is never a cheaper option)
DEFAULT_MIX = {"latency": ("w8a8-dynamic", "w8a16", "w4a16"), "size": ("w8a16", "w4a16", "gptq-w4a16", "gptq-w3a16")}
OBJECTIVES = {"size": "bytes", "latency": "latency_ratio"}
STRATEGIES = ("pareto", "greedy")
LOG = "trials.jsonl"


def parse_target(text: str) -> tuple[str, str, float]:
    """(metric, ">=" or "<=", value) from ``"cosine>=0.999"``; the comparison must point the metric's good way."""
    match = re.fullmatch(r"\s*([a-z_]+)\s*(>=|<=)\s*(-?[0-9]*\.?[0-9]+)\s*%?\s*", str(text))
    if match is None:
        raise BitsmithError(f"target {text!r} is not METRIC>=VALUE or METRIC<=VALUE (e.g. cosine>=0.999)")
    metric, op, value = match.group(1), match.group(2), float(match.group(3))
    if metric not in TARGETS:
        raise BitsmithError(f"unknown metric {metric!r} in the target: use {', '.join(TARGETS)}")
    wanted = ">=" if TARGETS[metric][1] == "higher" else "<="
    if op != wanted:
        raise BitsmithError(f"{metric} is better {TARGETS[metric][1]}: write {metric}{wanted}{value:g}")
    return metric, op, value


def _allowed_harm(metric: str, limit: float) -> float:
    """The target as the sensitivity table's harm (1 - cosine, % perplexity increase, accuracy points)."""
    return 1.0 - limit if metric == "cosine" else limit


# ---------------------------------------------------------------------------------------------- one trial


def run_trial(model: str, name: str, recipe: dict, calib, calib_samples: int, repeats: int,
              threads: int | None = None) -> dict:
    """One trial's log row: ``compress`` by ``recipe`` into a scratch directory (for the saved file's bytes, then
    removed); a recipe that cannot run on the model is a row with its ``error``."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    scratch = Path(tempfile.mkdtemp(prefix="bitsmith-trial-"))
    start = time.perf_counter()
    try:
        result = compress(model, Recipe.model_validate(recipe), out=scratch / "model", calib=calib,
                          calib_samples=calib_samples, repeats=repeats)
    except BitsmithError as err:
        return {"name": name, "error": str(err), "recipe": recipe}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    metrics = result["metrics"]
    return {"name": name, "pid": os.getpid(), "seconds": round(time.perf_counter() - start, 2),
            "bytes": result.get("file_bytes", metrics["bytes"]),
            "memory_bytes": metrics["bytes"],
            "latency_ratio": metrics["latency_ratio"],
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, "recipe": recipe}


class _Trials:
    """The trial log of one search, and the runner that fills it (in process, or ``workers`` at a time on Ray)."""

    def __init__(self, out: Path, header: dict, settings: dict, workers: int, progress):
        self.out, self.header, self.settings, self.progress = out, header, settings, progress
        self.log = out / LOG
        self.done = self._read()
        self.ray, self.started_ray = _ray(workers)
        self.workers, self.asked = (workers if self.ray is not None else 1), workers
        self.order: list[str] = []  # names in the order the search asked for them

    def _read(self) -> dict[str, dict]:
        if not self.log.exists():
            return {}
        text = self.log.read_text()
        if text and not text.endswith("\n"):  # killed while writing a row: that trial runs again
            text = text[: text.rfind("\n") + 1]
            self.log.write_text(text)
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            first, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
        except (ValueError, IndexError):
            raise BitsmithError(f"tune log {self.log} is damaged; move it away to start again") from None
        if first.get("fingerprint") != self.header["fingerprint"]:
            raise BitsmithError(f"tune log {self.log} was made for another model ({first.get('model')!r}); give"
                                " another --out or the model it was made for")
        return {row["name"]: row for row in rows}

    def _append(self, row: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.log.exists():
            self.log.write_text(json.dumps(self.header) + "\n")
        with self.log.open("a") as f:  # one line per finished trial: a kill loses at most the running ones
            f.write(json.dumps(row) + "\n")
        self.done[row["name"]] = row

    def run(self, jobs: list[tuple[str, Recipe, dict]]) -> list[dict]:
        """The rows of ``jobs`` (name, recipe, extra fields for the row), running those not in the log."""
        todo = [(name, recipe.to_dict(), extra) for name, recipe, extra in jobs if name not in self.done]
        todo = list({name: (name, recipe, extra) for name, recipe, extra in todo}.values())  # two budgets, one mix
        args = [(self.settings["model"], name, recipe, self.settings["calib"], self.settings["calib_samples"],
                 self.settings["repeats"]) for name, recipe, _ in todo]
        extras = {name: extra for name, _, extra in todo}
        if self.ray is None or len(todo) < 2:
            for arg in args:
                self._finish(run_trial(*arg), extras)
        else:
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            remote = self.ray.remote(num_cpus=1)(run_trial)
            pending = [remote.remote(*arg, threads) for arg in args]
            while pending:
                ready, pending = self.ray.wait(pending, num_returns=1)
                self._finish(self.ray.get(ready[0]), extras)
        self.order.extend(name for name, _, _ in jobs if name not in self.order)
        return [self.done[name] for name, _, _ in jobs]

    def close(self) -> None:
        """Stop the Ray this search started (one the caller started is theirs to stop)."""
        if self.started_ray:
            self.ray.shutdown()

    def _finish(self, row: dict, extras: dict) -> None:
        row.update(extras.get(row["name"], {}))
        self._append(row)
        if self.progress is not None:
            self.progress(row["name"], len(self.done))


def _ray(workers: int):
    """(the ray module, whether this call started it) when ``workers`` > 1 and Ray is installed; else (None, False)."""
    if type(workers) is not int or workers < 1:
        raise BitsmithError(f"--workers must be a whole number of at least 1, got {workers!r}")
    if workers == 1:
        return None, False
    try:
        import ray
    except ImportError:
        return None, False
    if ray.is_initialized():
        return ray, False
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray, True


# ---------------------------------------------------------------------------------------------- the phases


class _Goal:
    """The target and objective of one search: whether a row meets it, and its cost."""

    def __init__(self, target: str, objective: str):
        self.metric, self.op, self.limit = parse_target(target)
        if objective not in OBJECTIVES:
            raise BitsmithError(f"--objective must be {' or '.join(OBJECTIVES)}, not {objective!r}")
        self.key, self.better = TARGETS[self.metric]
        self.objective, self.cost = objective, OBJECTIVES[objective]

    def meets(self, row: dict) -> bool:
        if "error" in row:
            return False
        value = row["metrics"][self.key]
        return value >= self.limit if self.op == ">=" else value <= self.limit

    def loss(self, row: dict) -> float:
        """The metric turned "lower is better"."""
        return -row["metrics"][self.key] if self.better == "higher" else row["metrics"][self.key]


def _choice_name(prefix: str, choice: dict[str, str]) -> str:
    """``prefix`` and a digest of the choice: a log reused with other candidates never answers for another mix."""
    digest = hashlib.sha256(json.dumps(sorted(choice.items())).encode()).hexdigest()[:8]
    return f"{prefix}-{digest}"


def _choice_fields(choice: dict[str, str], predicted: tuple[float, float]) -> dict:
    counts: dict[str, int] = {}
    for option in choice.values():
        counts[option] = counts.get(option, 0) + 1
    return {"choice": choice, "counts": counts, "predicted_harm": predicted[0], "predicted_cost": predicted[1]}


def _mix_phase(trials: _Trials, goal: _Goal, table: dict, model: str, rounds: int, base: Recipe | None) -> None:
    """Bisection over the budget fraction (``algorithms.search``) for the cheapest mix meeting the target."""
    mix = mix_table(table, "latency" if goal.objective == "latency" else "bytes")
    tried: dict[float, bool] = {}
    for _ in range(rounds):
        fractions = next_fractions(tried, trials.workers)
        if not fractions:
            break
        jobs = []
        for fraction in fractions:
            choice = mix.choose(budget_at(fraction, mix.cheapest_cost, mix.float_cost))
            name = _choice_name(f"mix-{goal.objective}", choice)  # a mix two budgets share runs once
            jobs.append((name, mix_recipe(name, choice, f"per-layer mix chosen by bitsmith tune for {model} at"
                                          f" {fraction:g} of the way from the cheapest to the float layers (log scale)"
                                          f" ({goal.objective}); the rest of the model"
                                          f" {'by ' + base.name if base else 'stays as it is'}", mix.members, base),
                         {"phase": "mix", "fraction": fraction, **_choice_fields(choice, mix.predicted(choice))}))
        rows = trials.run(jobs)
        if any("error" in row for row in rows):  # a mix that cannot run says nothing of the budget: stop here
            break
        for (_, _, extra), row in zip(jobs, rows):
            tried[extra["fraction"]] = goal.meets(row)


def _greedy_phase(trials: _Trials, goal: _Goal, table: dict, max_trials: int, base: Recipe | None) -> None:
    """INC's fallback: all analyzed layers by the cheapest candidate, then the most harmful back to float, one a trial."""
    mix = mix_table(table, "latency" if goal.objective == "latency" else "bytes")
    # a layer the option does not apply to (a table under GPTQ) stays float under it, and costs as float
    totals = {option: sum(row[i] if math.isfinite(row[i]) else row[0] for row in mix.cost)
              for i, option in enumerate(mix.options) if option != "float"}
    cheapest = min(totals, key=lambda option: (totals[option], option))
    column = mix.options.index(cheapest)
    order = greedy_order({layer: row[column] for layer, row in zip(mix.layers, mix.harm) if math.isfinite(row[column])})
    for start in range(0, min(len(order) + 1, max_trials), trials.workers):
        jobs = []
        for k in range(start, min(start + trials.workers, len(order) + 1, max_trials)):
            choice = {layer: cheapest if layer in order[k:] else "float" for layer in mix.layers}
            name = _choice_name(f"greedy-{cheapest}-{k}", choice)
            jobs.append((name, mix_recipe(name, choice, f"{cheapest} on every analyzed layer but the {k} most"
                                          " harmful, kept in float (INC-style fallback)", mix.members, base),
                         {"phase": "greedy", "float_layers": order[:k], **_choice_fields(choice, mix.predicted(choice))}))
        if any(goal.meets(row) for row in trials.run(jobs)):
            return


def _sensitivity(out: Path, model: str, candidates: list[str], settings: dict, objective: str, header: dict,
                 analysis: dict) -> dict:
    """The per-layer table of the mix phase, reused from ``out/sensitivity.json`` when it was made for this model
    and these candidates (so a resumed search chooses the same mixes: latencies are re-measured otherwise)."""
    path = out / "sensitivity.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            raise BitsmithError(f"{path} is damaged; move it away to measure again") from None
        if stored.get("fingerprint") == header["fingerprint"] and stored.get("candidates") == candidates and \
                stored.get("version") == TABLE_VERSION and stored.get("layers") == analysis["layers"] and \
                stored.get("group") == analysis["group"] and (
                objective != "latency" or all("latency_s" in row for row in stored["rows"])):
            return stored
    start = time.perf_counter()
    table = analyze_sensitivity(model, candidates, settings["calib"], min(settings["calib_samples"], 32),
                                latency=objective == "latency", **analysis)
    table["fingerprint"], table["seconds"] = header["fingerprint"], round(time.perf_counter() - start, 1)
    table["layers"] = analysis["layers"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1, allow_nan=True))
    tmp.replace(path)
    return table


# ---------------------------------------------------------------------------------------------- the search


def _save_best(out: Path, model: str, best: dict, settings: dict) -> dict:
    """The best trial's model in ``out/model`` (kept when it is already that recipe's), measured alone."""
    target = out / "model"
    meta_file = target / "bitsmith.json"
    digest = hashlib.sha256(json.dumps(best["recipe"], sort_keys=True).encode()).hexdigest()[:16]
    if meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("tune_recipe_digest") == digest:
                return {"path": str(target), **meta.get("tune_alone", {})}
        except ValueError:
            pass
    scratch = out / ".model-tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    result = compress(model, Recipe.model_validate(best["recipe"]), out=scratch, calib=settings["calib"],
                      calib_samples=settings["calib_samples"], repeats=settings["repeats"])
    metrics = result["metrics"]
    alone = {"bytes": result.get("file_bytes", metrics["bytes"]), "latency_ratio": metrics["latency_ratio"]}
    meta = json.loads((scratch / "bitsmith.json").read_text())
    meta.update(tune_recipe_digest=digest, tune_alone=alone)
    (scratch / "bitsmith.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    scratch.replace(target)
    return {"path": str(target), **alone}


def _saves(row: dict, objective: str) -> bool:
    """Whether a sensitivity row's candidate measured cheaper than the float layer (time for latency, else bytes)."""
    return row.get("saves_time", False) if objective == "latency" else row["bytes"] < row["float_bytes"]


def _blocking(table: dict | None, goal: _Goal, objective: str) -> list[dict]:
    """Layers whose every cost-saving candidate alone already misses the target (``algorithms.search``)."""
    if table is None:
        return []
    harm: dict[str, list[float]] = {}
    for row in table["rows"]:
        saves = _saves(row, objective)
        harm.setdefault(row["group"], [])
        if saves:
            harm[row["group"]].append(row["measured"])
    allowed = _allowed_harm(goal.metric, goal.limit)
    return [{"layer": layer, "least_harm": value, "allowed_harm": allowed}
            for layer, value in blocking_layers(harm, allowed)]


def _summary(model: str, target: str, goal: _Goal, trials: _Trials, table: dict | None) -> dict:
    rows = [trials.done[name] for name in trials.order]
    ran = [row for row in rows if "error" not in row]
    failed = {row["name"]: row["error"] for row in rows if "error" in row}
    if not ran:
        raise BitsmithError("no recipe of the search ran on this model: " + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    meeting = [row for row in ran if goal.meets(row)]
    best = min(meeting, key=lambda row: (row[goal.cost], row["name"])) if meeting else None
    closest = min(ran, key=lambda row: (goal.loss(row), row["name"]))
    fronts = {f"front_{objective}": [ran[i]["name"] for i in pareto_front([(row[cost], goal.loss(row)) for row in ran])]
              for objective, cost in OBJECTIVES.items()}
    shown = ("name", "bytes", "latency_ratio", "phase", "fraction", "counts", "predicted_harm")
    summary = {
        "model": str(model), "target": target, "objective": goal.objective, "metric": goal.key,
        "original_bytes": ran[0]["metrics"].get("original_bytes"),
        "trials": [{k: row[k] for k in shown if k in row} | {goal.key: row["metrics"][goal.key]} for row in ran],
        "failed": failed, **fronts, "met": best is not None, "best": best["name"] if best else None,
        "closest": {"name": closest["name"], goal.key: closest["metrics"][goal.key]}, "log": str(trials.log),
        "workers": trials.workers, "workers_asked": trials.asked,
        # the search's own cost, resumes included: its trials' compress time plus the sensitivity table's
        "trial_seconds": round(sum(row.get("seconds", 0.0) for row in rows), 1),
    }
    if table is not None:
        summary["sensitivity"] = {"candidates": table["candidates"], "chosen": table["chosen"], "note": table["note"],
                                  "spearman": table["spearman"], "harm_from": "measured",
                                  "seconds": table.get("seconds")}
        summary["blocking"] = _blocking(table, goal, goal.objective)  # what keeps a cheaper mix from the target
        summary["no_saving"] = _no_saving(table, goal.objective)
    return summary


def _no_saving(table: dict, objective: str) -> list[str]:
    """Layers on which no candidate saved anything as measured (for latency: none was at most ``SAVES_TIME`` of
    the float layer's time with its kernel here), so no mix makes them cheaper."""
    saving: dict[str, bool] = {}
    for row in table["rows"]:
        saves = _saves(row, objective)
        saving[row["group"]] = saving.get(row["group"], False) or saves
    return [group for group, saves in saving.items() if not saves]


def tune(model: str | Path, target: str, objective: str = "latency", out: str | Path = "tune",
         space: list[str] | None = None, calib=None, calib_samples: int = 128, repeats: int = 5, *,
         strategy: str = "pareto", mix: bool = True, mix_candidates: list[str] | None = None, mix_rounds: int = 5,
         greedy_trials: int = 40, workers: int = 1, layers: str | None = None, group: str = "layer",
         mix_base: str | None = None, eval_limit: int | None = None, seed: int = 0, save_model: bool = True,
         progress=None) -> dict:
    """Search (module docstring); writes ``out/trials.jsonl``, ``out/tune.json``, ``out/sensitivity.json`` (with
    mixes) and, when a trial meets the target, ``out/recipe.yaml`` and ``out/model`` (the best one's)."""
    goal = _Goal(target, objective)
    if strategy not in STRATEGIES:
        raise BitsmithError(f"--strategy must be {' or '.join(STRATEGIES)}, not {strategy!r}")
    names = list(DEFAULT_SPACE if space is None else space)
    recipes = {name: load_recipe(name) for name in names}  # an unknown recipe fails before any trial
    base = load_recipe(mix_base) if mix_base else None
    for flag, value in (("--mix-rounds", mix_rounds), ("greedy_trials", greedy_trials)):
        if type(value) is not int or value < 1:
            raise BitsmithError(f"{flag} must be a whole number of at least 1, got {value!r}")
    if base is not None and any(not isinstance(stage, QuantizeConfig) for stage in base.stages):
        raise BitsmithError(f"--mix-base {mix_base} has stages other than quantize; give a quantize-only recipe")
    candidates = list(mix_candidates or DEFAULT_MIX[objective])
    loaded = load_model(model)
    if loaded.compressed:
        raise BitsmithError(f"{model} is already compressed; tune its float original")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BitsmithError(f"--out {out} is a file; give a directory for the trial log")
    task = task_for(loaded.source, loaded.tokenizer, None, model=loaded.model)
    if task.target_metric != goal.metric:
        raise BitsmithError(f"{model} is evaluated by {task.metric}: its target is {task.target_metric}, not {goal.metric}")
    header = {"model": str(model), "fingerprint": fingerprint(loaded.model.state_dict()), "calib_samples": calib_samples,
              "seed": seed}
    del loaded, task
    settings = {"model": str(model), "calib": str(calib) if calib else None, "calib_samples": calib_samples,
                "repeats": repeats}
    trials = _Trials(out, header, settings, workers, progress)
    table = None
    try:
        rows = trials.run([(name, recipes[name], {"phase": "recipe"}) for name in names])
        if mix_candidates is None:  # a default candidate whose whole-model recipe could not run here is left out
            failed = {row["name"] for row in rows if "error" in row}
            candidates = [name for name in candidates if name not in failed] or candidates
        if mix or strategy == "greedy":
            table = _sensitivity(out, str(model), candidates, settings, objective, header,
                                 {"layers": layers, "eval_limit": eval_limit, "seed": seed, "group": group})
            if strategy == "greedy":
                _greedy_phase(trials, goal, table, greedy_trials, base)
            else:
                _mix_phase(trials, goal, table, str(model), mix_rounds, base)
    finally:
        trials.close()
    summary = _summary(str(model), target, goal, trials, table)
    if summary["met"]:
        best = trials.done[summary["best"]]
        (out / "recipe.yaml").write_text(Recipe.model_validate(best["recipe"]).to_yaml())  # what ran
        summary["recipe_file"] = str(out / "recipe.yaml")
        if save_model:
            summary["model_dir"] = _save_best(out, str(model), best, settings)
    else:  # a former search's choice: this one chose nothing
        shutil.rmtree(out / "model", ignore_errors=True)
        (out / "recipe.yaml").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(summary, indent=2))
    return summary
