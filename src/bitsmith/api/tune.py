"""``bitsmith tune``: evaluate candidate recipes for real, keep every trial in a resumable log, return the Pareto
front and the best recipe meeting a quality target.

A trial is ``compress`` of the float model by one recipe (quality by the task's own metric, the file's bytes,
latency against the float model timed in turn); it is appended to ``DIR/trials.jsonl`` as soon as it ends, so
an interrupted search resumes without repeating it, and the same log gives the same choice. The log's first
line names the model (a fingerprint of its weights): a log from another model is refused.

    target                          | metric (from the task's fidelity)
    cosine>=0.999                   | mean cosine of the embeddings to float
    perplexity_increase<=1          | % perplexity increase over float
    accuracy_drop<=0.5              | test accuracy points lost

This first version searches whole-model recipes (the built-in quantization recipes that apply to the model, or
``space``); per-layer mixes come from ``bitsmith analyze --sensitivity --budget`` for now.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bitsmith.api.compress import compress
from bitsmith.api.sensitivity import fingerprint
from bitsmith.errors import BitsmithError
from bitsmith.evaluation.tasks import task_for
from bitsmith.io.models import load_model
from bitsmith.recipe import Recipe, load_recipe

__all__ = ["parse_target", "tune", "DEFAULT_SPACE", "TARGETS"]

# metric name -> (the fidelity key, better is "higher" or "lower")
TARGETS = {
    "cosine": ("mean_cosine", "higher"),
    "perplexity_increase": ("perplexity_increase_pct", "lower"),
    "accuracy_drop": ("accuracy_drop_points", "lower"),
}
DEFAULT_SPACE = ("bf16", "fp8-w", "w8a16", "w8a8-dynamic", "w8a8-static", "smoothquant-w8a8", "nf4", "w4a16",
                 "mxfp4", "gptq-w4a16", "awq-w4a16", "gptq-w3a16")
OBJECTIVES = {"size": "bytes", "latency": "latency_ratio"}
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


def _meets(value: float, op: str, limit: float) -> bool:
    return value >= limit if op == ">=" else value <= limit


def _front(trials: list[dict], quality: str, better: str, cost: str) -> list[str]:
    """Names of the trials no other trial beats on both quality and ``cost`` (lower cost, better quality)."""
    sign = -1 if better == "higher" else 1  # to "lower is better"
    points = [(t[cost], sign * t["metrics"][quality], t["name"]) for t in trials]
    front = []
    for c, q, name in points:
        if not any((c2 <= c and q2 <= q) and (c2 < c or q2 < q) for c2, q2, _ in points):
            front.append(name)
    return front


def _read_log(path: Path, header: dict) -> dict[str, dict]:
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        first, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    except (ValueError, IndexError):
        raise BitsmithError(f"tune log {path} is damaged; move it away to start again") from None
    if first.get("fingerprint") != header["fingerprint"]:
        raise BitsmithError(f"tune log {path} was made for another model ({first.get('model')!r}); give another"
                            " --out or the model it was made for")
    return {row["name"]: row for row in rows}


def tune(model: str | Path, target: str, objective: str = "latency", out: str | Path = "tune",
         space: list[str] | None = None, calib=None, calib_samples: int = 128, repeats: int = 5,
         progress=None) -> dict:
    """Search ``space`` (module docstring); writes ``out/trials.jsonl``, ``out/tune.json`` and, when a trial meets
    the target, ``out/recipe.yaml`` (the best one's recipe)."""
    metric, op, limit = parse_target(target)
    if objective not in OBJECTIVES:
        raise BitsmithError(f"--objective must be {' or '.join(OBJECTIVES)}, not {objective!r}")
    names = list(space or DEFAULT_SPACE)
    recipes = {name: load_recipe(name) for name in names}  # an unknown recipe fails before any trial
    loaded = load_model(model)
    if loaded.compressed:
        raise BitsmithError(f"{model} is already compressed; tune its float original")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BitsmithError(f"--out {out} is a file; give a directory for the trial log")
    task = task_for(loaded.source, loaded.tokenizer, None, model=loaded.model)
    if task.target_metric != metric:
        raise BitsmithError(f"{model} is evaluated by {task.metric}: its target is {task.target_metric}, not {metric}")
    header = {"model": str(model), "fingerprint": fingerprint(loaded.model.state_dict()), "calib_samples": calib_samples}
    log = out / LOG
    done = _read_log(log, header)
    del loaded, task
    key, better = TARGETS[metric]
    for index, name in enumerate(names):
        if name not in done:
            try:
                result = compress(model, recipes[name], calib=calib, calib_samples=calib_samples, repeats=repeats)
            except BitsmithError as err:  # this recipe cannot run on this model: a trial that says why
                row = {"name": name, "error": str(err)}
            else:
                metrics = result["metrics"]
                row = {"name": name, "bytes": metrics["bytes"], "latency_ratio": metrics["latency_ratio"],
                       "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
                       "recipe": recipes[name].to_dict()}
            out.mkdir(parents=True, exist_ok=True)
            if not log.exists():
                log.write_text(json.dumps(header) + "\n")
            with log.open("a") as f:  # one line per finished trial: a kill loses at most the running one
                f.write(json.dumps(row) + "\n")
            done[name] = row
        if progress is not None:
            progress(name, index + 1, len(names))
    trials = [done[name] for name in names if "error" not in done[name]]
    failed = {name: done[name]["error"] for name in names if "error" in done[name]}
    if not trials:
        raise BitsmithError("no recipe of the search ran on this model: " + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    meeting = [t for t in trials if _meets(t["metrics"][key], op, limit)]
    cost = OBJECTIVES[objective]
    best = min(meeting, key=lambda t: (t[cost], t["name"])) if meeting else None
    sign = 1 if better == "higher" else -1
    closest = max(trials, key=lambda t: sign * t["metrics"][key])
    summary = {
        "model": str(model), "target": target, "objective": objective, "metric": key,
        "trials": [{k: t[k] for k in ("name", "bytes", "latency_ratio")} | {key: t["metrics"][key]} for t in trials],
        "failed": failed, "front_size": _front(trials, key, better, "bytes"),
        "front_latency": _front(trials, key, better, "latency_ratio"),
        "met": best is not None, "best": best["name"] if best else None,
        "closest": {"name": closest["name"], key: closest["metrics"][key]},
        "log": str(log),
    }
    if best is not None:
        (out / "recipe.yaml").write_text(Recipe.model_validate(best["recipe"]).to_yaml())  # what ran
        summary["recipe_file"] = str(out / "recipe.yaml")
    (out / "tune.json").write_text(json.dumps(summary, indent=2))
    return summary

