"""digits-cnn: fp32 vs bitsmith w8a8-static on the torch path and through ONNX Runtime, in one run.

    python bench/bench_digits.py [--repeats 15] [--threads 2] [--json PATH]

Same 64-image batch for every variant, timed in interleaved rounds (median); accuracy on the whole
test split; sizes are the files on disk.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bitsmith
from _common import bench_parser, finish, machine_line, parse
from bitsmith.io.models import load_model
from bitsmith.evaluation.tasks import ImageClassificationTask
from bitsmith.export.onnx import export_onnx


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no spinning into the next variant
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_runner(session):
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def torch_runner(model):
    def run(x):
        with torch.inference_mode():
            return model(x)

    return run


def accuracy(run, x, y) -> float:
    predictions = torch.cat([run(chunk).argmax(-1) for chunk in x.split(64)])
    return (predictions == y).float().mean().item()


def main() -> None:
    args = parse(bench_parser(__doc__, repeats=15))
    work = Path(tempfile.mkdtemp(prefix="bench-digits-"))
    try:
        float_model = load_model("digits-cnn").model
        task = ImageClassificationTask()
        quantized = copy.deepcopy(float_model)
        bitsmith.quantize_(quantized, bitsmith.load_recipe("w8a8-static"), calibration=task.calibration(None))
        bitsmith.save(float_model, work / "fp32")
        bitsmith.save(quantized, work / "int8")
        example = task.batch[:2]
        export_onnx(float_model, example, work / "fp32.onnx", output_names=["logits"])
        export_onnx(quantized, example, work / "int8.onnx", output_names=["logits"])
        variants = {
            "torch fp32": (torch_runner(float_model), work / "fp32" / "model.safetensors"),
            "bitsmith w8a8-static (torch, oneDNN)": (torch_runner(quantized), work / "int8" / "model.safetensors"),
            "ORT fp32": (ort_runner(ort_session(work / "fp32.onnx", args.threads)), work / "fp32.onnx"),
            "bitsmith w8a8-static (ORT, QDQ export)": (
                ort_runner(ort_session(work / "int8.onnx", args.threads)), work / "int8.onnx"),
        }
        times = {name: [] for name in variants}
        for run, _ in variants.values():
            run(task.batch)
        for _ in range(args.repeats):
            for name, (run, _) in variants.items():
                start = time.perf_counter()
                run(task.batch)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["torch fp32"])
        rows = []
        for name, (run, file) in variants.items():
            rows.append({
                "variant": name, "latency_ratio": statistics.median(times[name]) / base,
                "median_ms": statistics.median(times[name]) * 1e3, "size_mb": file.stat().st_size / 1e6,
                "accuracy": accuracy(run, task.x_test, task.y_test),
            })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(machine_line())
    print(f"batch {list(task.batch.shape)}, {args.repeats} interleaved rounds (median); accuracy on"
          f" {len(task.y_test)} test images\n")
    print("| variant | latency vs torch fp32 | median ms | size MB | test accuracy |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['latency_ratio']:.2f} | {r['median_ms']:.1f} | {r['size_mb']:.3f} | {100 * r['accuracy']:.2f}% |")
    fp32, int8 = rows[0], rows[1]
    print()
    code = finish([
        (f"w8a8-static accuracy within 0.5 points of fp32 ({100 * fp32['accuracy']:.2f}% ->"
         f" {100 * int8['accuracy']:.2f}%)", fp32["accuracy"] - int8["accuracy"] <= 0.005),
        (f"w8a8-static faster than fp32 ({int8['latency_ratio']:.2f}x)", int8["latency_ratio"] < 1),
    ])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_line(), "rows": rows}, indent=2))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
