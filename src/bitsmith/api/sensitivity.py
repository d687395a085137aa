"""Per-layer sensitivity: the task metric with only one layer (or one block's layers) changed, beside cheap proxies.

For each Linear and embedding table (or group) and each candidate (a one-stage built-in recipe or YAML: a weight
scheme by round-to-nearest or GPTQ, or a pruning method and ratio), the layer is swapped for what the candidate
makes of it, the model is judged by its task (MiniLM-like embeddings: 1 - mean cosine; language models: perplexity
increase; classifiers: accuracy drop), and swapped back. Beside the measured harm, three proxies from one
calibration pass (``algorithms.sensitivity``): the layer's output SQNR, its mean squared output change, and
a random-probe Fisher estimate of the change at the model's output. Spearman's rank correlation of each
proxy against the measured harm says which proxy ranks well enough (>= 0.8) to stand in for the metric; if
none does, the result says to use the measured values.

An embedding table gets the candidate's Linear scheme where the quantize stage can give it to a table (integer
round-to-nearest per row or per group of a row, fp16/bf16); a GPTQ, activation or pruning candidate does not
apply to a lookup, and its row is left out (``not_applicable`` says why) rather than done another way. A table
and an output head that share their matrix (tied weights) are left out too (``skipped``): changing one alone would
untie them.

Rows are cached on disk (``$BITSMITH_CACHE/sensitivity``, or ``cache=``), keyed by the model's weights, the
calibration and evaluation data and the candidate's stage, so a second analysis (or a search) measures only
what is new.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitsmith.algorithms._modules import replace_module
from bitsmith.algorithms.gptq import accumulate_hessian, gptq_quantize
from bitsmith.algorithms.imatrix import importance_from_hessian, quantize_weight_imatrix
from bitsmith.algorithms.prune import keep_mask, sparsegpt_prune, wanda_scores
from bitsmith.algorithms.sensitivity import (
    PROXIES, fisher_error, lookup_energy, output_energy, spearman, sqnr_db,
)
from bitsmith.errors import BitsmithError
from bitsmith.evaluation.tasks import task_for
from bitsmith.io.models import load_model
from bitsmith.pipeline.blocks import find_blocks
from bitsmith.recipe import QuantizeConfig, load_recipe
from bitsmith.recipe.stages import PruneConfig
from bitsmith.stages.quantize import cannot_quantize
from bitsmith.stages.weights import group_size, module_for, quantize_embedding, quantize_linear

__all__ = ["Candidate", "candidate", "analyze_sensitivity", "layer_costs", "GOOD_RANKING", "DEFAULT_CANDIDATES",
           "SAVES_TIME"]

SAVES_TIME = 0.95  # a candidate counts as faster than float only where it measured at most this fraction of its time
NO_SPARSE_KERNEL = "the float layer's dense matmul (no sparse kernel: sparsity saves storage, not time)"
GOOD_RANKING = 0.8  # a proxy whose Spearman against the measured harm reaches this may stand in for it
DEFAULT_CANDIDATES = ("w8a16", "w4a16", "nf4")
_VERSION = 1  # of the cached rows' meaning: bump when a row is computed differently
TABLE_VERSION = 2  # of what a table covers (2: embedding tables beside the Linears): a stored table of another is stale


@dataclass(frozen=True)
class Candidate:
    """One thing a layer can become: ``stage`` is a QuantizeConfig (``scheme`` the one its Linear rule gives) or a
    PruneConfig (``rule`` its Linear rule)."""

    name: str
    stage: QuantizeConfig | PruneConfig
    scheme: object = None
    rule: object = None

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.stage.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _linear_rule(rules, name: str):
    for rule in rules:
        if "Linear" in rule.targets:
            return rule
    raise BitsmithError(f"candidate '{name}' has no rule targeting Linear layers: sensitivity changes Linears")


def candidate(name: str) -> Candidate:
    """The candidate a one-stage recipe (built-in name or YAML path) makes of a Linear; refused with why otherwise."""
    recipe = load_recipe(name)
    if len(recipe.stages) != 1:
        raise BitsmithError(f"candidate '{name}' has {len(recipe.stages)} stages; sensitivity takes one-stage"
                            " quantize or prune recipes")
    stage = recipe.stages[0]
    if isinstance(stage, QuantizeConfig):
        rule = _linear_rule(stage.rules, name)
        scheme = rule.scheme
        if scheme is None:
            raise BitsmithError(f"candidate '{name}' keeps Linear layers in float: nothing to measure")
        if scheme.is_static:
            raise BitsmithError(f"candidate '{name}' has static activations, whose ranges come from the whole model's"
                                " calibration: not a one-layer change; use a weight-only or dynamic scheme")
        if scheme.weights.algorithm == "awq":
            raise BitsmithError(f"candidate '{name}' uses awq, whose scales span a block: not a one-layer change")
        return Candidate(name, stage, scheme=scheme)
    if isinstance(stage, PruneConfig):
        rule = _linear_rule(stage.rules, name)
        if rule.fraction is None:
            raise BitsmithError(f"candidate '{name}' keeps Linear layers dense: nothing to measure")
        return Candidate(name, stage, rule=rule)
    raise BitsmithError(f"candidate '{name}' is a {stage.stage} stage; sensitivity takes quantize or prune stages")


# ---------------------------------------------------------------------------------------------- one layer


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The float32 (N, K) weight a module computes with."""
    if hasattr(module, "dequantize"):
        return module.dequantize().float()
    return module.weight.detach().float()


def not_applicable(module: nn.Module, cand: Candidate) -> str | None:
    """Why ``cand`` cannot change ``module`` (a Linear or an embedding table) as its recipe says, or None."""
    if isinstance(module, nn.Linear):
        return None
    if cand.scheme is None:
        return f"{cand.stage.method} prunes Linear layers, not a lookup table"
    return cannot_quantize(module, cand.scheme)


def changed(layer: nn.Module, cand: Candidate, hessian: torch.Tensor | None) -> nn.Module:
    """What ``cand`` makes of a Linear ``layer`` alone (``hessian``: H = 2/n X^T X of its float inputs), or of an
    embedding table (``not_applicable`` first: its Linear scheme by round-to-nearest, no Hessian)."""
    if isinstance(layer, nn.Embedding):
        return quantize_embedding(layer, cand.scheme)
    if cand.scheme is not None:
        w = cand.scheme.weights
        if w.algorithm == "gptq":
            options = cand.stage.gptq
            qweight, _ = gptq_quantize(layer.weight.detach(), hessian, w.bits, group_size(layer, cand.scheme),
                                       w.symmetric, act_order=options.act_order, static_groups=True,
                                       damp_percent=options.damp_percent, block_size=options.block_size, clip=w.clip)
            return module_for(qweight, layer.bias, cand.scheme)
        if w.algorithm == "imatrix" and hessian is not None:
            qweight = quantize_weight_imatrix(layer.weight.detach(), w.bits, group_size(layer, cand.scheme),
                                              w.symmetric, importance_from_hessian(hessian))
            return module_for(qweight, layer.bias, cand.scheme)
        return quantize_linear(layer, cand.scheme)
    rule, method = cand.rule, cand.stage.method
    weight = layer.weight.detach().float()
    if method == "sparsegpt":
        options = cand.stage.sparsegpt
        pruned, _ = sparsegpt_prune(weight, hessian, rule.fraction, rule.nm, options.block_size, options.damp_percent)
    else:
        scores = weight.abs() if method == "magnitude" else wanda_scores(weight, hessian)
        pruned = weight * keep_mask(scores, rule.fraction, rule.nm, per_row=method == "wanda")
    new = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
    new.weight.data = pruned.to(layer.weight.dtype)
    if layer.bias is not None:
        new.bias.data = layer.bias.detach().clone()
    return new.eval().requires_grad_(False)


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


# ---------------------------------------------------------------------------------------------- statistics


def _forward(model: nn.Module, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _main_output(out) -> torch.Tensor:
    """The tensor a task reads: logits, else the last hidden state, else the first output."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out if isinstance(out, torch.Tensor) else out[0]


def input_hessians(model: nn.Module, layers: dict[str, nn.Module], batches: list) -> dict[str, tuple]:
    """name -> (H = 2/n X^T X, n) of each Linear's inputs over the calibration batches, one float pass; of an
    embedding table, (f, n) with f (V,) each row's share of the n looked-up ids (the diagonal of its H, halved)."""
    stats: dict[str, tuple] = {name: (None, 0) for name in layers}

    def hook(name):
        def record(module, args):
            seen, count = stats[name]
            if isinstance(module, nn.Embedding):
                ids = args[0].reshape(-1)
                counts = torch.bincount(ids, minlength=module.num_embeddings).double()
                total = count + ids.numel()
                stats[name] = (counts / total if seen is None else seen * (count / total) + counts / total, total)
            else:
                stats[name] = accumulate_hessian(seen, args[0], count)
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.inference_mode():
            for batch in batches:
                _forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def probe_fisher(model: nn.Module, layers: dict[str, nn.Linear], batches: list, seed: int = 0) -> dict[str, torch.Tensor]:
    """name -> E[g^2] with g the gradient of r . output for a standard normal probe r (one per batch): the diagonal of
    J^T J, J the Jacobian of the model's output by the weight, so sum(F * dW^2) estimates |output change|^2."""
    generator = torch.Generator().manual_seed(seed)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
        layer.weight.grad = None
    fisher = {name: torch.zeros_like(layer.weight, dtype=torch.float32) for name, layer in layers.items()}
    try:
        for batch in batches:
            with torch.enable_grad():
                out = _main_output(_forward(model, batch)).float()
                probe = torch.randn(out.shape, generator=generator)
                (out * probe).sum().backward()
            for name, layer in layers.items():
                if layer.weight.grad is not None:
                    fisher[name] += layer.weight.grad.float().pow(2) / len(batches)
                    layer.weight.grad = None
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
    return fisher


def input_shapes(model: nn.Module, layers: dict[str, nn.Linear], run) -> dict[str, tuple]:
    """name -> the shape of each layer's input when ``run()`` runs the model on the task's timed batch."""
    shapes: dict[str, tuple] = {}

    def hook(name):
        def record(_module, args):
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: a pre-hook's value would replace the input
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def layer_costs(model: nn.Module, layers: dict[str, nn.Linear], cands: list[Candidate], hessians: dict, run,
                repeats: int = 5) -> dict[tuple[str, str], dict]:
    """(candidate, layer) -> {"latency_s", "float_latency_s", "kernel", "saves_time"}: each candidate's module and
    the float layer timed in turn (``interleaved_latency``) on an input of the layer's real shape on the task's
    timed batch, with the kernel the module chose for it. Not cached: it is this machine's, and this moment's."""
    from bitsmith.evaluation.measure import interleaved_latency

    shapes = input_shapes(model, layers, run)
    costs = {}
    generator = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        if name not in shapes:
            continue  # the timed batch never reaches it
        if isinstance(layer, nn.Embedding):
            x = torch.randint(layer.num_embeddings, shapes[name], generator=generator)
        else:
            x = torch.randn(shapes[name], generator=generator)
        built = {c.name: changed(layer, c, hessians[name][0]) for c in cands if not not_applicable(layer, c)}
        # a pruned layer is a float Linear again: the same dense matmul as the float one, so the same time by
        # construction (timing two identical calls would only time the machine's noise)
        timed = {label: m for label, m in built.items() if type(m) is not nn.Linear}
        with torch.inference_mode():
            times = interleaved_latency({label: (lambda m=m: m(x)) for label, m in {"float": layer, **timed}.items()},
                                        repeats)
        for cand in cands:
            if cand.name not in built:
                continue
            if cand.name not in timed:
                costs[(cand.name, name)] = {"latency_s": times["float"], "float_latency_s": times["float"],
                                            "kernel": NO_SPARSE_KERNEL, "saves_time": False}
                continue
            module = timed[cand.name]
            kernel = module.last_kernel[0] if hasattr(module, "last_kernel") else module.kernel()
            costs[(cand.name, name)] = {
                "latency_s": times[cand.name], "float_latency_s": times["float"], "kernel": kernel,
                "saves_time": times[cand.name] <= SAVES_TIME * times["float"],
            }
    return costs


# ---------------------------------------------------------------------------------------------- the analysis


def _digest(value, h) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous().cpu().reshape(-1)
        h.update(f"{t.dtype}{list(value.shape)}".encode())
        h.update((t.view(torch.uint8) if t.numel() else t).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            h.update(str(key).encode())
            _digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _digest(item, h)
    elif isinstance(value, (str, int, float, bool)) or value is None:
        h.update(repr(value).encode())


def fingerprint(*values) -> str:
    h = hashlib.sha256()
    for value in values:
        _digest(value, h)
    return h.hexdigest()


def _cache_dir(cache: str | Path | None) -> Path:
    if cache is not None:
        return Path(cache)
    root = os.environ.get("BITSMITH_CACHE") or Path.home() / ".cache" / "bitsmith"
    return Path(root) / "sensitivity"


def _groups(model: nn.Module, names: list[str], by: str) -> dict[str, list[str]]:
    if by == "layer":
        return {name: [name] for name in names}
    if by != "block":
        raise BitsmithError(f"--group must be layer or block, not {by!r}")
    prefix, _ = find_blocks(model, names, "grouping by block")
    groups: dict[str, list[str]] = {}
    for name in names:
        match = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
        groups.setdefault(f"{prefix}.{match.group(1)}" if match else name, []).append(name)
    return groups


def _store(cache_file: Path, model: str, rows: dict) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": model, "rows": rows}, allow_nan=True))
    tmp.replace(cache_file)


def _tied_layers(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    """Layers whose matrix another module shares (an embedding table and its tied output head), with why they are
    left out."""
    tied = {}
    for name, layer in layers.items():
        sharers = [n for n, m in model.named_modules()
                   if m is not layer and any(p is layer.weight for p in m.parameters(recurse=False))]
        if sharers:
            tied[name] = (f"shares its matrix with {', '.join(sharers)}: changed alone it would be untied and stored"
                          " twice; quantize both together with a recipe rule")
    return tied


def _energy(module: nn.Module, weight: torch.Tensor, stats: torch.Tensor) -> float:
    """``output_energy`` of a Linear's weight (or its change) on its H; ``lookup_energy`` of a table's."""
    if isinstance(module, nn.Embedding):
        return lookup_energy(weight, stats)
    return output_energy(weight, stats)


def _ranking(rows: list[dict], proxy: str) -> float | None:
    usable = [r for r in rows if math.isfinite(r["measured"])]
    predicted = [(-r[proxy] if proxy == "sqnr_db" else r[proxy]) for r in usable]
    predicted = [p if math.isfinite(p) else math.copysign(1e300, p) for p in predicted]
    return spearman(predicted, [r["measured"] for r in usable])


def analyze_sensitivity(
    model: str | Path, candidates: list[str] | None = None, calib: str | Path | None = None,
    calib_samples: int = 32, group: str = "layer", layers: str | None = None, eval_limit: int | None = None,
    fisher_batches: int = 4, cache: str | Path | None = None, seed: int = 0, latency: bool = True,
    repeats: int = 9, progress: Callable[[str, int], None] | None = None,
) -> dict:
    """The sensitivity table of ``model`` (module docstring); ``layers`` a regex over Linear and embedding names
    (default all),
    ``eval_limit`` the held-out windows a language model is judged on (default all); ``latency`` adds each row's
    measured time beside the float layer's (``layer_costs``)."""
    cands = [candidate(name) for name in (candidates or DEFAULT_CANDIDATES)]
    if not cands:
        raise BitsmithError("give at least one candidate scheme (--schemes)")
    loaded = load_model(model)
    if loaded.compressed:
        raise BitsmithError(f"{model} is already compressed; analyze its float original")
    net = loaded.model.eval()
    pattern = None
    if layers:
        try:
            pattern = re.compile(layers)
        except re.error as err:
            raise BitsmithError(f"--layers {layers!r} is not a regular expression: {err}") from None
    matched = {name: m for name, m in net.named_modules()
               if type(m) in (nn.Linear, nn.Embedding) and (pattern is None or pattern.search(name))}
    tied = _tied_layers(net, matched)
    targets = {name: m for name, m in matched.items() if name not in tied}
    if not any(isinstance(m, nn.Linear) for m in targets.values()):
        raise BitsmithError(f"no Linear layer of {model} matches --layers {layers!r}" if layers
                            else f"{model} has no Linear layers to analyze")
    task = task_for(loaded.source, loaded.tokenizer, None, model=net)
    calibration = task.calibration(calib, calib_samples)
    groups = _groups(net, list(targets), group)

    data_key = fingerprint(_VERSION, task.name, calibration, {k: v for k, v in vars(task).items()
                                                              if k not in ("tokenizer",)}, eval_limit, seed)
    model_key = fingerprint(net.state_dict())
    cache_file = _cache_dir(cache) / f"{model_key[:20]}-{data_key[:20]}.json"
    try:
        stored = json.loads(cache_file.read_text())["rows"] if cache_file.exists() else {}
    except (OSError, ValueError, KeyError):
        stored = {}  # an unreadable cache is measured again, never trusted
    why_not = {(c.name, g): reason for c in cands for g, members in groups.items()
               for reason in [next(filter(None, (not_applicable(targets[n], c) for n in members)), None)] if reason}
    # a table's rows are keyed apart ("|table2": per-group tables keep fp16 scales), so no older row answers for them
    tag = {g: "|table2" if any(isinstance(targets[n], nn.Embedding) for n in members) else ""
           for g, members in groups.items()}
    keys = {(c.name, g): f"{c.digest}|{group}|{g}{tag[g]}" for c in cands for g in groups if (c.name, g) not in why_not}
    todo = [key for key in keys.values() if key not in stored]

    if todo or latency:
        hessians = input_hessians(net, targets, calibration)
    if todo:
        fisher = probe_fisher(net, targets, calibration[:fisher_batches], seed)
        judge = task.judge(net, eval_limit)
        signal = {name: _energy(targets[name], targets[name].weight, h) for name, (h, _) in hessians.items()}
    done = 0
    for cand in cands:
        for label, members in groups.items():
            key = keys.get((cand.name, label))
            if key is None or key in stored:
                continue
            originals = {name: targets[name] for name in members}
            noise = fisher_sum = size = float_size = 0.0
            try:
                for name in members:
                    hessian = hessians[name][0]
                    new = changed(originals[name], cand, hessian)
                    delta = _effective_weight(new) - originals[name].weight.detach().float()
                    noise += _energy(originals[name], delta, hessian)
                    fisher_sum += fisher_error(fisher[name], delta)
                    size += _bytes(new)
                    float_size += _bytes(originals[name])
                    replace_module(net, name, new)
                measured = judge(net)
            finally:
                for name, original in originals.items():
                    replace_module(net, name, original)
            stored[key] = {
                "measured": float(measured), "sqnr_db": sqnr_db(sum(signal[n] for n in members), noise),
                "output_error": noise, "fisher": fisher_sum, "bytes": int(size), "float_bytes": int(float_size),
            }
            done += 1
            _store(cache_file, str(model), stored)  # after every row: a killed analysis resumes where it stopped
            if progress is not None:
                progress(f"{cand.name} {label}", done)

    rows = [{"group": g, "layers": groups[g], "candidate": c.name, **stored[keys[(c.name, g)]]}
            for c in cands for g in groups if (c.name, g) in keys]
    if latency:
        costs = layer_costs(net, targets, cands, hessians, task.runner(net), repeats)
        for row in rows:
            timed = [costs[(row["candidate"], name)] for name in row["layers"] if (row["candidate"], name) in costs]
            if timed:
                row["latency_s"] = sum(t["latency_s"] for t in timed)
                row["float_latency_s"] = sum(t["float_latency_s"] for t in timed)
                row["kernel"] = " + ".join(sorted({t["kernel"] for t in timed}))
                row["saves_time"] = row["latency_s"] <= SAVES_TIME * row["float_latency_s"]
    overall = {proxy: _ranking(rows, proxy) for proxy in PROXIES}
    per_candidate = {c.name: {p: _ranking([r for r in rows if r["candidate"] == c.name], p) for p in PROXIES}
                     for c in cands}
    ranked = [(value, proxy) for proxy, value in overall.items() if value is not None]
    best_value, best = max(ranked) if ranked else (None, None)
    if best_value is not None and best_value >= GOOD_RANKING:
        chosen, note = best, f"{best} ranks the measured {task.metric} with Spearman {best_value:.3f} (>= {GOOD_RANKING})"
    else:
        chosen = "measured"
        shown = "no proxy could be ranked" if best is None else f"the best proxy, {best}, reaches {best_value:.3f}"
        note = f"{shown} (< {GOOD_RANKING}): use the measured {task.metric}"
    return {
        "version": TABLE_VERSION, "model": str(model), "task": task.name, "metric": task.metric, "group": group,
        "candidates": [c.name for c in cands], "calibration_batches": len(calibration), "rows": rows,
        "spearman": overall, "spearman_per_candidate": per_candidate, "chosen": chosen, "note": note,
        "cache": str(cache_file), "measured_now": len(todo), "from_cache": len(keys) - len(todo),
        "not_applicable": [{"group": g, "candidate": c, "why": why} for (c, g), why in why_not.items()],
        "skipped": tied,
    }
