"""bitsmith tune against its peers and against Intel Neural Compressor's greedy fallback, on this machine.

Part ``minilm`` (one run, one machine):
- the peers on MiniLM's 64-sentence evaluation batch: torch fp32 (reference), bf16 autocast, torch
  ``quantize_dynamic`` int8 per-channel, ONNX Runtime ``quantize_dynamic`` per-channel (bench_minilm's builders);
- ``tune minilm --target cosine>=0.999 --objective latency`` (whole-model recipes, then per-layer mixes by
  bisection) and, by the same code, the greedy fallback (every layer by the cheapest candidate, the most harmful
  returned to float one at a time until the target holds): front found, wall time of the search;
- the best model of the search timed beside the peers in the same interleaved loop: target, at most 0.8x the
  fastest peer's latency;
- ``tune minilm --target cosine>=0.99 --objective size`` (the embedding tables are layers of the mix like the
  Linears; part ``minilm-size`` runs this alone): target, saved file at most 0.15x fp32 ``model.safetensors``;
  and the mix at uniform w4a16's bytes against uniform w4a16 (target: at most 0.8x its cosine loss, at no more
  bytes).

Part ``smollm2``: a per-block mix at 4.5 bits per weight (scales included) chosen from GPTQ W4 g128, GPTQ W4 g64
and W8 by their measured perplexity harm, against uniform GPTQ W4 g128 and W4 g64: targets, lower perplexity than
g128 and no larger file than g64.

Each part writes its tune directories and ``report.html`` under ``--out``; exit status 1 if a target failed.

    .venv/bin/python bench/bench_tune.py --part minilm --out bench/out/tune
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_parser, finish, machine_line, minilm_batch, parse  # noqa: E402

PEERS = ("torch bf16 autocast", "torch quantize_dynamic int8 per-channel", "ORT quantize_dynamic int8 per-channel")


def timed_tune(label: str, *args, **kwargs) -> tuple[dict, float]:
    from bitsmith.api.tune import tune

    start = time.perf_counter()
    result = tune(*args, **kwargs)
    seconds = time.perf_counter() - start
    print(f"{label}: {len(result['trials'])} trials in {seconds:.0f} s; best {result['best']}")
    return result, seconds


def front_lines(label: str, result: dict, seconds: float, cost: str) -> list[str]:
    key = result["metric"]
    front = set(result[f"front_{'size' if cost == 'bytes' else 'latency'}"])
    spent = result.get("trial_seconds", 0) + (result.get("sensitivity", {}).get("seconds") or 0)
    lines = [f"{label}: {len(result['trials'])} trials, {seconds:.0f} s wall in this call (trials' and table's own"
             f" time, resumes included: {spent:.0f} s); best {result['best']} (met: {result['met']})", f"| trial | {key} | file MB | latency vs fp32 | on the {cost} front |",
             "|---|---|---|---|---|"]
    for t in result["trials"]:
        mark = "yes" if t["name"] in front else ""
        best = " (best)" if t["name"] == result["best"] else ""
        lines.append(f"| {t['name']}{best} | {t[key]:.6f} | {t['bytes'] / 1e6:.2f} | {t['latency_ratio']:.3f} | {mark} |")
    return lines


def peers_and_best(best_dir: Path, repeats: int, threads: int, tmp: Path) -> list[dict]:
    """The peers and the search's best model, built on the same batch and timed in one interleaved loop."""
    import bench_minilm as bm
    import bitsmith

    model, tokenizer, batch, notes = minilm_batch(repeats)
    builders = {"torch fp32": bm.torch_fp32, "torch bf16 autocast": bm.torch_bf16, PEERS[1]: bm.torch_qdynamic}
    onnx_path = tmp / "minilm.onnx"
    notes["onnx_export"] = bm.export_onnx(model, batch, onnx_path)
    builders[PEERS[2]] = lambda m, b, t: bm.ort_int8(onnx_path, b, t, threads, notes)
    best = bitsmith.load(best_dir).eval()
    builders["bitsmith tune best"] = lambda m, b, t: (bm.torch_fn(best, b), sum(
        f.stat().st_size for f in best_dir.glob("*.safetensors")))
    return bm.measure(*bm.build_variants(builders, model, batch, tmp), repeats)


def add_peers(tune_dir: Path, rows: list[dict]) -> None:
    """The peers measured beside the search's best go into its tune.json, for ``bitsmith report``."""
    summary = json.loads((tune_dir / "tune.json").read_text())
    summary["peers"] = [{"name": r["variant"], "latency_ratio": round(r["latency_ratio"], 4),
                         summary["metric"]: round(r["mean_cosine"], 6), "bytes": r["bytes"]}
                        for r in rows if r["variant"] in PEERS and not r.get("error")]
    (tune_dir / "tune.json").write_text(json.dumps(summary, indent=2))


def write_report(tune_dir: Path) -> str:
    from bitsmith.api.report import report

    return report(tune_dir, tune_dir / "report.html")["path"]


def equal_bytes_mix(size_dir: Path, calib_samples: int, repeats: int) -> dict:
    """The mix the size search's table chooses within uniform w4a16's bytes on the analyzed layers (the tables with
    w4a16's int8 rows in that sum, as uniform w4a16 has them), with w4a16's rules for the rest, compressed and
    measured like a trial."""
    from bitsmith.api.mixed import mix_recipe, mix_table
    import torch

    from bitsmith.api.tune import run_trial
    from bitsmith.recipe import load_recipe

    table = json.loads((size_dir / "sensitivity.json").read_text())
    mix = mix_table(table, "bytes")
    from bitsmith.io.models import load_model

    modules = dict(load_model("minilm").model.named_modules())
    # w4a16's Embedding rule is w8a16's Linear scheme, int8 rows: a table costs what w8a16 costs it
    column, table_column = mix.options.index("w4a16"), mix.options.index("w8a16")
    limit = sum(row[table_column if isinstance(modules[mix.members[group][0]], torch.nn.Embedding) else column]
                for group, row in zip(mix.layers, mix.cost))
    choice = mix.choose(limit)
    recipe = mix_recipe("mix-at-w4a16-bytes", choice, "per-layer mix within uniform w4a16's bytes", mix.members,
                        load_recipe("w4a16"))
    row = run_trial("minilm", recipe.name, recipe.to_dict(), None, calib_samples, repeats)
    counts = {o: sum(1 for c in choice.values() if c == o) for o in mix.options}
    return {**row, "counts": {o: n for o, n in counts.items() if n}, "predicted": mix.predicted(choice)}


def _minilm_dirs(out: Path) -> dict[str, Path]:
    return {name: out / f"minilm-{name}" for name in ("latency", "latency-greedy", "size", "size-greedy")}


def part_minilm(args, out: Path) -> tuple[list[str], list[tuple[str, bool]]]:
    lines, checks = part_minilm_latency(args, out)
    more, more_checks = part_minilm_size(args, out)
    return [*lines, "", *more], [*checks, *more_checks]


def part_minilm_latency(args, out: Path) -> tuple[list[str], list[tuple[str, bool]]]:
    common = dict(calib_samples=args.calib_samples, repeats=args.trial_repeats, layers=args.layers)
    space = args.space.split(",") if args.space else None
    dirs = _minilm_dirs(out)
    lat, lat_s = timed_tune("pareto, latency", "minilm", "cosine>=0.999", "latency", dirs["latency"], space, **common)
    dirs["latency-greedy"].mkdir(parents=True, exist_ok=True)  # the same measured table, measured once
    shutil.copy(dirs["latency"] / "sensitivity.json", dirs["latency-greedy"])
    greedy, greedy_s = timed_tune("greedy, latency", "minilm", "cosine>=0.999", "latency", dirs["latency-greedy"],
                                  [], strategy="greedy", **common)
    lines = [*front_lines("pareto search, objective latency", lat, lat_s, "latency"),
             f"(sensitivity table: {lat['sensitivity']['seconds']} s of that; {lat['sensitivity']['note']})", "",
             *front_lines("INC-style greedy fallback on the same table, objective latency", greedy, greedy_s,
                          "latency"), ""]
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        rows = peers_and_best(dirs["latency"] / "model", args.repeats, args.threads, Path(tmp)) if lat["met"] else []
    if rows:
        lines += ["Peers and the search's best, one interleaved loop (latency vs torch fp32, mean cosine):",
                  *(f"- {r['variant']}: {r['latency_ratio']:.3f}x, cosine {r.get('mean_cosine', float('nan')):.5f},"
                    f" {r['bytes'] / 1e6:.2f} MB" if not r.get("error") else f"- {r['variant']}: {r['error']}"
                    for r in rows), ""]
        add_peers(dirs["latency"], rows)
        peers = [r for r in rows if r["variant"] in PEERS and not r.get("error")]
        fastest = min(peers, key=lambda r: r["latency_ratio"])
        best = next(r for r in rows if r["variant"] == "bitsmith tune best")
        checks.append((f"tune best latency {best['latency_ratio']:.3f}x <= 0.8 x fastest peer ({fastest['variant']}"
                       f" {fastest['latency_ratio']:.3f}x) at cosine {best['mean_cosine']:.5f} >= 0.999",
                       best["latency_ratio"] <= 0.8 * fastest["latency_ratio"] and best["mean_cosine"] >= 0.999))
    else:
        checks.append(("tune best latency <= 0.8 x fastest peer: no trial met cosine>=0.999", False))
    blocking = ", ".join(f"{b['layer']} ({b['least_harm']:.2g})" for b in lat.get("blocking", [])[:8])
    lines.append(f"layers whose every time-saving candidate alone costs more than the target allows: {blocking or 'none'}")
    lines.append(f"layers on which no candidate measured a time saving here: {len(lat.get('no_saving', []))} of"
                 f" {len({r['group'] for r in json.loads((dirs['latency'] / 'sensitivity.json').read_text())['rows']})}")
    lines.append(f"report: {write_report(dirs['latency'])}")
    return lines, checks


def part_minilm_size(args, out: Path) -> tuple[list[str], list[tuple[str, bool]]]:
    """The issue's command, ``tune minilm --target cosine>=0.99 --objective size``: no base recipe, the embedding
    tables are layers of the table like the Linears."""
    from bitsmith.zoo.minilm import model_dir

    common = dict(calib_samples=args.calib_samples, repeats=args.trial_repeats, layers=args.layers)
    space = args.space.split(",") if args.space else None
    dirs = _minilm_dirs(out)
    dirs["size"].mkdir(parents=True, exist_ok=True)
    if (dirs["latency"] / "trials.jsonl").exists() and not (dirs["size"] / "trials.jsonl").exists():
        shutil.copy(dirs["latency"] / "trials.jsonl", dirs["size"] / "trials.jsonl")  # its whole-model trials
    size, size_s = timed_tune("pareto, size", "minilm", "cosine>=0.99", "size", dirs["size"], space, **common)
    fp32_file = (model_dir() / "model.safetensors").stat().st_size
    checks = []
    lines = [*front_lines("pareto search, objective size", size, size_s, "bytes"),
             f"(sensitivity table: {size['sensitivity']['seconds']} s of that)", ""]
    if args.skip_greedy:
        lines.append("INC-style greedy fallback, objective size: not run (--skip-greedy)")
    else:
        dirs["size-greedy"].mkdir(parents=True, exist_ok=True)
        shutil.copy(dirs["size"] / "sensitivity.json", dirs["size-greedy"])
        sgreedy, sgreedy_s = timed_tune("greedy, size", "minilm", "cosine>=0.99", "size", dirs["size-greedy"], [],
                                        strategy="greedy", **common)
        lines += front_lines("INC-style greedy fallback on the same table, objective size", sgreedy, sgreedy_s,
                             "bytes")
    smallest = min((t for t in size["trials"] if t["mean_cosine"] >= 0.99), key=lambda t: t["bytes"], default=None)
    ratio = smallest["bytes"] / fp32_file if smallest else float("nan")
    checks.append((f"size search: smallest file meeting cosine>=0.99 is {ratio:.3f}x fp32 model.safetensors"
                   f" ({smallest['name'] if smallest else 'none'}) <= 0.15x", smallest is not None and ratio <= 0.15))
    mixed = equal_bytes_mix(dirs["size"], args.calib_samples, args.trial_repeats)
    uniform = next(t for t in size["trials"] if t["name"] == "w4a16")
    loss_mix, loss_uniform = 1 - mixed["metrics"]["mean_cosine"], 1 - uniform["mean_cosine"]
    lines += ["", f"mix at uniform w4a16's bytes ({mixed['counts']}): cosine {mixed['metrics']['mean_cosine']:.5f},"
              f" file {mixed['bytes'] / 1e6:.2f} MB; uniform w4a16: cosine {uniform['mean_cosine']:.5f}, file"
              f" {uniform['bytes'] / 1e6:.2f} MB"]
    checks.append((f"mix at w4a16's bytes: cosine loss {loss_mix:.5f} <= 0.8 x w4a16's {loss_uniform:.5f}, file"
                   f" {mixed['bytes'] / 1e6:.2f} MB <= {uniform['bytes'] / 1e6:.2f} MB",
                   loss_mix <= 0.8 * loss_uniform and mixed["bytes"] <= uniform["bytes"] * 1.001))
    lines.append(f"report: {write_report(dirs['size'])}")
    return lines, checks


def gptq_g64(tmp: Path) -> str:
    """gptq-w4a16 with groups of 64, as a recipe file (candidates and trials take names or files)."""
    from bitsmith.recipe import load_recipe

    data = load_recipe("gptq-w4a16").to_dict()
    data["name"] = "gptq-w4a16-g64"
    for rule in data["stages"][0]["quantize"]["rules"]:
        if "Linear" in rule["targets"]:
            rule["scheme"]["weights"]["granularity"] = 64
    path = tmp / "gptq-w4a16-g64.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def part_smollm2(args, out: Path) -> tuple[list[str], list[tuple[str, bool]]]:
    from bitsmith.api.mixed import mix_recipe, mix_table
    from bitsmith.api.sensitivity import analyze_sensitivity
    from bitsmith.api.tune import run_trial
    from bitsmith.io.models import load_model
    from bitsmith.recipe import load_recipe

    out.mkdir(parents=True, exist_ok=True)
    g64 = gptq_g64(out)
    candidates = ["gptq-w4a16", g64, "w8a16"]
    start = time.perf_counter()
    table = analyze_sensitivity("smollm2", candidates, None, args.calib_samples, group="block",
                                eval_limit=args.eval_windows, latency=False, cache=out / "cache")
    table_s = time.perf_counter() - start
    (out / "smollm2-sensitivity.json").write_text(json.dumps(table, indent=1, allow_nan=True))
    mix = mix_table(table, "bytes")
    modules = dict(load_model("smollm2").model.named_modules())
    weights = sum(modules[layer].weight.numel() for group in mix.layers for layer in mix.members[group])
    # The 4.5 bits counts scales as its author did (fp16 scale and zero per group of 64 is 4.5 bits); in
    # bitsmith's storage (uint8 zero) g64 is 4.375 bits, so the budget is 4.5 bits or g64's bytes, whichever is less.
    g64_column = mix.options.index(g64)
    g64_bytes = sum(row[g64_column] for row in mix.cost)
    budget = min(4.5 * weights / 8, g64_bytes)
    choice = mix.choose(budget)
    recipe = mix_recipe("mix-4.5bits", choice, "per-block mix within 4.5 bits per weight and g64's bytes",
                        mix.members, load_recipe("gptq-w4a16"))
    (out / "mix-4.5bits.yaml").write_text(recipe.to_yaml())
    rows, stored = {}, out / "smollm2-trials.json"  # a rerun reuses a trial of the same recipe and settings
    kept = json.loads(stored.read_text()) if stored.exists() else {}
    for name, data in (("gptq-w4a16", load_recipe("gptq-w4a16").to_dict()), ("gptq-w4a16-g64", load_recipe(g64).to_dict()),
                       ("mix-4.5bits", recipe.to_dict())):
        key = json.dumps([data, args.calib_samples], sort_keys=True)
        if key in kept and "error" not in kept[key]:
            rows[name] = kept[key]
            print(f"{name}: stored trial ({rows[name]['seconds']:.0f} s); {rows[name]['metrics'].get('perplexity')}")
            continue
        t0 = time.perf_counter()
        rows[name] = kept[key] = run_trial("smollm2", name, data, None, args.calib_samples, args.trial_repeats)
        stored.write_text(json.dumps(kept, indent=1))
        print(f"{name}: {time.perf_counter() - t0:.0f} s; {rows[name].get('metrics', {}).get('perplexity')}")
    counts = {o: sum(1 for c in choice.values() if c == o) for o in mix.options}
    lines = [f"smollm2 per-block sensitivity ({len(mix.layers)} blocks x {len(candidates)} candidates, first"
             f" {args.eval_windows} held-out windows): {table_s:.0f} s; {table['note']}",
             f"budget: {budget / 1e6:.2f} MB over the blocks' Linears (4.5 bits: {4.5 * weights / 8e6:.2f} MB,"
             f" g64: {g64_bytes / 1e6:.2f} MB); predicted harm {mix.predicted(choice)[0]:.3f}"
             f" (uniform g64 {sum(h[g64_column] for h in mix.harm):.3f})",
             f"mix: {({Path(o).stem: n for o, n in counts.items() if n})}",
             "| recipe | perplexity | increase % | file MB |", "|---|---|---|---|"]
    for name, row in rows.items():
        m = row.get("metrics", {})
        lines.append(f"| {name} | {m.get('perplexity')} | {m.get('perplexity_increase_pct')} | "
                     f"{row.get('bytes', 0) / 1e6:.2f} |" if "error" not in row else f"| {name} | {row['error']} | | |")
    mixed, g128, g64row = rows["mix-4.5bits"], rows["gptq-w4a16"], rows["gptq-w4a16-g64"]
    ok = all("error" not in r for r in rows.values())
    checks = [(f"smollm2 mix at 4.5 bits: perplexity below uniform GPTQ W4 g128's",
               ok and mixed["metrics"]["perplexity"] < g128["metrics"]["perplexity"]),
              (f"smollm2 mix at 4.5 bits: file no larger than GPTQ W4 g64's", ok and mixed["bytes"] <= g64row["bytes"])]
    return lines, checks


def main(argv=None) -> int:
    parser = bench_parser(__doc__, repeats=7, json_option=False)
    parser.add_argument("--part", choices=("minilm", "minilm-size", "smollm2", "all"), default="minilm")
    parser.add_argument("--out", type=Path, default=Path("bench/out/tune"), help="tune directories and reports")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--trial-repeats", type=int, default=3, help="timed rounds inside each trial")
    parser.add_argument("--layers", help="minilm: regex of the Linear layers the mixes may change (default all)")
    parser.add_argument("--space", help="minilm: whole-model recipes, comma-separated (default tune's)")
    parser.add_argument("--skip-greedy", action="store_true", help="minilm-size: leave out the greedy fallback")
    parser.add_argument("--eval-windows", type=int, default=8, help="smollm2: held-out windows per sensitivity row")
    args = parse(parser, argv)
    print(machine_line())
    lines, checks = [], []
    for part, run in (("minilm", part_minilm), ("minilm-size", part_minilm_size), ("smollm2", part_smollm2)):
        if args.part == part or args.part == "all" and part != "minilm-size":
            more, more_checks = run(args, args.out)
            lines += ["", f"## {part}", *more]
            checks += more_checks
    print("\n".join(lines))
    return finish(checks)


if __name__ == "__main__":
    sys.exit(main())
