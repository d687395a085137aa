"""all-MiniLM-L6-v2 in ONNX Runtime: bitsmith's exported models next to ORT's own fp32 / quantize_dynamic / quantize_static.

All variants embed the same padded batch of 64 evaluation sentences (max 128 tokens) in ONNX Runtime's CPU
provider (intra-op threads as given, no spinning between runs); latency is timed in interleaved rounds
(median) and given as a ratio to ORT fp32 and to torch fp32; fidelity is the cosine of mean-pooled,
normalized embeddings to torch fp32's. ORT's static model and bitsmith's w8a8-static calibrate on the same
128 calibration sentences (8 batches of 16).

    .venv/bin/python bench/bench_onnx.py --repeats 7 --threads 2 --json bench/out/onnx.json
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import bitsmith
from _common import bench_parser, finish, machine_line, minilm_batch, parse
from bitsmith.api.compress import machine_summary
from bitsmith.evaluation.measure import cosine_fidelity
from bitsmith.export import export_onnx
from bitsmith.zoo.minilm import encode_batch, sentence_embeddings
from bitsmith.zoo.text import doc_sentences

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
ORT_FP32, ORT_DYNAMIC = "ORT fp32 export", "ORT quantize_dynamic per-channel"
ORT_STATIC_ALL, ORT_STATIC_MATMUL = "ORT quantize_static QDQ (default op types)", "ORT quantize_static QDQ (weight MatMuls)"
# (variant label, recipe, export_onnx keyword arguments)
BITSMITH = [
    ("bitsmith w8a8-static", "w8a8-static", {}),
    ("bitsmith w8a8-dynamic (per-token)", "w8a8-dynamic", {"dynamic_activations": "token"}),
    ("bitsmith w8a8-dynamic (per-tensor)", "w8a8-dynamic", {"dynamic_activations": "tensor"}),
    ("bitsmith w8a8-dynamic (MatMulNBits 8-bit)", "w8a8-dynamic", {"dynamic_activations": "block"}),
    ("bitsmith w4a16 (accuracy_level 4)", "w4a16", {"accuracy_level": 4}),
    ("bitsmith w4a16 (accuracy_level 0)", "w4a16", {"accuracy_level": 0}),
    ("bitsmith w8a16 (DequantizeLinear + MatMul)", "w8a16", {}),
]


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    # spinning worker threads would steal the cores from whichever variant is timed next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_fn(path: Path, batch, threads: int):
    session = ort_session(path, threads)
    feeds = {n: batch[n].numpy() for n in INPUTS}
    mask = feeds["attention_mask"][..., None].astype(np.float32)

    def run():
        hidden = session.run(None, feeds)[0]
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
        return torch.from_numpy(pooled / np.linalg.norm(pooled, axis=-1, keepdims=True))

    return run


class _Batches:
    """onnxruntime.quantization.CalibrationDataReader over tokenized batches (a class is made lazily)."""

    def __init__(self, batches):
        self.items = iter([{n: b[n].numpy() for n in INPUTS} for b in batches])

    def get_next(self):
        return next(self.items, None)


def ort_own(fp32_path: Path, calibration, tmp: Path, notes: dict) -> dict[str, Path]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_dynamic,
        quantize_static,
    )

    pre = tmp / "minilm-pre.onnx"
    try:
        quant_pre_process(str(fp32_path), str(pre), auto_merge=True)
        notes["ort_preprocess"] = "quant_pre_process(auto_merge=True)"
    except Exception as err:  # noqa: BLE001 - quantize the raw export instead, and say so
        notes["ort_preprocess"] = f"none (quant_pre_process failed: {type(err).__name__})"
        pre = fp32_path
    paths = {ORT_DYNAMIC: tmp / "ort-dynamic.onnx"}
    quantize_dynamic(str(pre), str(paths[ORT_DYNAMIC]), per_channel=True, weight_type=QuantType.QInt8)
    graph = onnx.load(str(pre)).graph
    weights = {i.name for i in graph.initializer}
    # activation x activation MatMuls (attention scores, context) stay float, as in bitsmith's recipes
    attention = [n.name for n in graph.node if n.op_type == "MatMul" and not set(n.input) & weights]
    for label, extra in ((ORT_STATIC_ALL, {}), (ORT_STATIC_MATMUL, {"op_types_to_quantize": ["MatMul"],
                                                                     "nodes_to_exclude": attention})):
        paths[label] = tmp / f"ort-static-{len(paths)}.onnx"
        reader = type("Reader", (_Batches, CalibrationDataReader), {})(calibration)
        quantize_static(
            str(pre), str(paths[label]), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            **extra,
        )
    return paths


def interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall s, process CPU s) of each callable, run in turn after one warm-up each. CPU seconds
    (summed over threads) vary less than wall time when other tenants load the machine."""
    for fn in fns.values():
        fn()
    wall, cpu = {n: [] for n in fns}, {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in fns}


def build_all(model, tokenizer, batch, tmp: Path, threads: int, notes: dict):
    sentences = doc_sentences(128, split="calib")
    calibration = [encode_batch(tokenizer, sentences[i : i + 16]) for i in range(0, 128, 16)]
    # a small padded trace input (the attention mask must reach the graph); the axes are dynamic
    example = encode_batch(tokenizer, ["A short one.", doc_sentences(1)[0]], max_length=16)
    fns, sizes, own, info = {"torch fp32": lambda: sentence_embeddings(model, batch)}, {}, {}, {}
    fp32_path = tmp / "minilm-fp32.onnx"
    info[ORT_FP32] = export_onnx(model, example, fp32_path, output_names=["last_hidden_state"])
    paths = {ORT_FP32: fp32_path, **ort_own(fp32_path, calibration, tmp, notes)}
    quantized = {}
    for label, recipe, kwargs in BITSMITH:
        if recipe not in quantized:
            qmodel = copy.deepcopy(model)
            recipe_config = bitsmith.load_recipe(recipe)
            bitsmith.quantize_(qmodel, recipe_config, calibration=calibration if recipe == "w8a8-static" else None)
            quantized[recipe] = qmodel
            own[recipe] = sentence_embeddings(qmodel, batch)  # bitsmith's own torch model, for reference
        paths[label] = tmp / f"{label.split()[1]}-{len(paths)}.onnx"
        info[label] = export_onnx(quantized[recipe], example, paths[label], output_names=["last_hidden_state"],
                                  **kwargs)
    for label, path in paths.items():
        fns[label], sizes[label] = ort_fn(path, batch, threads), path.stat().st_size
    return fns, sizes, own, info


def measure(fns, sizes, own, repeats: int) -> list[dict]:
    outputs = {name: fn() for name, fn in fns.items()}
    times = interleaved(fns, repeats)
    reference = outputs["torch fp32"]
    rows = []
    for name in fns:
        (wall, cpu), (ort_wall, ort_cpu) = times[name], times[ORT_FP32]
        row = {"variant": name, "latency_s": wall, "cpu_s": cpu, "vs_ort_fp32": wall / ort_wall,
               "cpu_vs_ort_fp32": cpu / ort_cpu, "vs_torch_fp32": wall / times["torch fp32"][0],
               "bytes": sizes.get(name)}
        row["size_ratio"] = None if row["bytes"] is None else row["bytes"] / sizes[ORT_FP32]
        row.update(cosine_fidelity(outputs[name], reference))
        recipe = next((r for label, r, _ in BITSMITH if label == name), None)
        if recipe:  # bitsmith's own (torch) model of the same recipe
            row["torch_mean_cosine"] = cosine_fidelity(own[recipe], reference)["mean_cosine"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| variant | latency vs ORT fp32 | CPU time vs ORT fp32 | vs torch fp32 | median s | size MB "
        "| size vs fp32 ONNX | mean cosine | min cosine | bitsmith torch mean cosine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = "" if r["bytes"] is None else f"{r['bytes'] / 1e6:.1f}"
        ratio = "" if r["size_ratio"] is None else f"{r['size_ratio']:.3f}"
        torch_cos = f"{r['torch_mean_cosine']:.5f}" if "torch_mean_cosine" in r else ""
        lines.append(
            f"| {r['variant']} | {r['vs_ort_fp32']:.2f} | {r['cpu_vs_ort_fp32']:.2f} | {r['vs_torch_fp32']:.2f} "
            f"| {r['latency_s']:.3f} | {size} "
            f"| {ratio} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | {torch_cos} |"
        )
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each as (label, measured, bound, pass)."""
    by = {r["variant"]: r for r in rows}
    ort_dyn = by[ORT_DYNAMIC]
    checks = []

    def add(label, value, bound, ok):
        checks.append({"target": label, "value": value, "bound": bound, "pass": bool(ok)})

    for name in ("bitsmith w8a8-static", "bitsmith w8a8-dynamic (per-token)"):
        r = by[name]
        add(f"{name} latency <= ORT quantize_dynamic", r["latency_s"], ort_dyn["latency_s"],
            r["latency_s"] <= ort_dyn["latency_s"])
        add(f"{name} CPU time <= ORT quantize_dynamic", r["cpu_s"], ort_dyn["cpu_s"], r["cpu_s"] <= ort_dyn["cpu_s"])
        add(f"{name} mean cosine > ORT quantize_dynamic", r["mean_cosine"], ort_dyn["mean_cosine"],
            r["mean_cosine"] > ort_dyn["mean_cosine"])
        add(f"{name} file <= 0.3x fp32 ONNX", r["size_ratio"], 0.3, r["size_ratio"] <= 0.3)
    static = by["bitsmith w8a8-static"]
    add("bitsmith w8a8-static mean cosine >= 0.99", static["mean_cosine"], 0.99, static["mean_cosine"] >= 0.99)
    for name in ("bitsmith w4a16 (accuracy_level 4)", "bitsmith w4a16 (accuracy_level 0)"):
        r = by[name]
        gap = r["torch_mean_cosine"] - r["mean_cosine"]
        add(f"{name} mean cosine within 0.002 of bitsmith's torch w4a16", gap, 0.002, gap <= 0.002)
    return checks


def main(argv=None) -> int:
    args = parse(bench_parser(__doc__), argv)
    model, tokenizer, batch, notes = minilm_batch(args.repeats)
    tmp = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    try:
        fns, sizes, own, info = build_all(model, tokenizer, batch, tmp, args.threads, notes)
        rows = measure(fns, sizes, own, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    machine = {**machine_summary(), "onnxruntime": ort.__version__, "threads": args.threads}
    checks = check_targets(rows)
    print(f"\n{machine_line()} | onnxruntime {machine['onnxruntime']}")
    print(f"batch {notes['batch_shape']}, {args.repeats} interleaved rounds (median); MB = 1e6 bytes; "
          f"ORT pre-processing: {notes.get('ort_preprocess')}\n")
    print(markdown(rows) + "\n")
    code = finish([(f"{c['target']}  (measured {c['value']:.4g}, bound {c['bound']:.4g})", c["pass"]) for c in checks])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        exports = {k: {"layers": v["layers"], "ops": v["ops"]} for k, v in info.items()}
        payload = {"machine": machine, "settings": notes, "results": rows, "checks": checks, "exports": exports}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
