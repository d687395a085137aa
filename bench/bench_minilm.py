"""all-MiniLM-L6-v2 on this CPU: torch fp32 / bf16 / quantize_dynamic, ONNX Runtime fp32 / int8, and every
built-in bitsmith recipe that applies to it.

All variants embed the same padded batch of 64 evaluation sentences; latency is timed in interleaved rounds
(median), fidelity is the cosine of mean-pooled normalized embeddings to torch fp32's. The targets: every
bitsmith recipe at or below fp32 latency (within 5%), each recipe's fidelity floor, and W8A8 faster than torch's
own int8 where one-pass int8 is exact (VNNI / AMX). The exit status is 1 if any target fails.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import bitsmith
from _common import bench_parser, finish, machine_line, minilm_batch, parse
from bitsmith.api.compress import machine_summary
from bitsmith.evaluation.measure import cosine_fidelity, interleaved_latency
from bitsmith.zoo.minilm import model_dir, sentence_embeddings

TORCH_QDYNAMIC = "torch quantize_dynamic int8 per-channel"
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
# every built-in recipe that applies to an encoder, with its mean-cosine floor
RECIPES = {
    "w8a8-dynamic": 0.995, "w8a8-static": 0.99, "smoothquant-w8a8": 0.995, "w8a16": 0.999, "w4a16": 0.95,
    "gptq-w4a16": 0.98, "gptq-w3a16": 0.93, "awq-w4a16": 0.96, "bf16": 0.9999, "fp16": 0.9999,
}
# (label, variant, metric, op, bound); a bound given as a variant name means "that variant's value"
TARGETS = [
    *[(f"{r} mean cosine", f"bitsmith {r}", "mean_cosine", ">=", floor) for r, floor in RECIPES.items()],
    *[(f"{r} latency at most fp32's (+5%)", f"bitsmith {r}", "latency_ratio", "<=", 1.05) for r in RECIPES],
    ("w4a16 size vs fp32", "bitsmith w4a16", "size_ratio", "<=", 0.22),
]
# where one pass of oneDNN int8 is exact (VNNI / AMX), W8A8 is to beat torch's own int8 too
EXACT_INT8_TARGETS = [
    ("w8a8-dynamic latency vs fp32 (one-pass int8 here)", "bitsmith w8a8-dynamic", "latency_ratio", "<=", 0.65),
    ("w8a8-dynamic latency vs torch qdynamic", "bitsmith w8a8-dynamic", "latency_ratio", "<=", TORCH_QDYNAMIC),
]


def torch_fn(model, batch, autocast=False):
    def run():
        if not autocast:
            return sentence_embeddings(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sentence_embeddings(model, batch)

    return run


def torch_fp32(model, batch, tmp):
    return torch_fn(model, batch), (model_dir() / "model.safetensors").stat().st_size


def torch_bf16(model, batch, tmp):  # weights stay fp32 on disk
    return torch_fn(model, batch, autocast=True), (model_dir() / "model.safetensors").stat().st_size


def torch_qdynamic(model, batch, tmp):
    spec = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
    qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)
    torch.save(qmodel.state_dict(), tmp / "qdynamic.pt")
    return torch_fn(qmodel, batch), (tmp / "qdynamic.pt").stat().st_size


def bitsmith_variant(recipe, tokenizer):
    def build(model, batch, tmp):
        from bitsmith.evaluation.tasks import TextEmbeddingTask

        loaded = bitsmith.load_recipe(recipe)
        calibration = TextEmbeddingTask(tokenizer).calibration(None) if loaded.needs_calibration else None
        qmodel = copy.deepcopy(model)
        bitsmith.quantize_(qmodel, loaded, calibration=calibration)
        bitsmith.save(qmodel, tmp / recipe)
        return torch_fn(qmodel, batch), (tmp / recipe / "model.safetensors").stat().st_size

    return build


class _LastHidden(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state


def export_onnx(model, batch, path: Path) -> str:
    """Export to ``path`` (legacy TorchScript exporter, else dynamo); returns which path worked."""
    wrapper = _LastHidden(copy.deepcopy(model)).eval()  # export restores the wrapper's mode recursively
    args = tuple(batch[n] for n in INPUTS)
    axes = {n: {0: "batch", 1: "seq"} for n in INPUTS + ["last_hidden_state"]}
    common = dict(input_names=INPUTS, output_names=["last_hidden_state"], dynamic_axes=axes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(wrapper, args, str(path), opset_version=17, dynamo=False, **common)
            used = "legacy TorchScript exporter (dynamo=False), opset 17"
        except Exception as err:  # noqa: BLE001 - fall back to the dynamo exporter
            print(f"legacy ONNX export failed ({type(err).__name__}: {err}); trying dynamo=True")
            torch.onnx.export(wrapper, args, str(path), dynamo=True, external_data=False, **common)
            used = f"dynamo exporter (legacy failed: {type(err).__name__})"
    kinds = sorted({w.category.__name__ for w in caught})
    return f"{used}; {len(caught)} warnings during export ({', '.join(kinds) or 'none'})"


def ort_fn(path: Path, batch, threads: int):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    # ORT's worker threads spin after each run by default; in an interleaved run that spinning
    # steals the 2 cores from whichever variant is timed next, so it is turned off here
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {n: batch[n].numpy() for n in INPUTS}
    mask = feeds["attention_mask"][..., None].astype(np.float32)

    def run():
        hidden = session.run(None, feeds)[0]
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
        return torch.from_numpy(pooled / np.linalg.norm(pooled, axis=-1, keepdims=True))

    return run


def preprocess_onnx(src: Path, dst: Path) -> tuple[Path, str]:
    """ORT's quant_pre_process; symbolic shape inference needs auto_merge on this graph."""
    from onnxruntime.quantization import quant_pre_process

    for kwargs in ({"auto_merge": True}, {"skip_symbolic_shape": True}):
        try:
            quant_pre_process(str(src), str(dst), **kwargs)
            return dst, f"quant_pre_process({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
        except Exception as err:  # noqa: BLE001 - try the next setting, else quantize the raw export
            print(f"quant_pre_process{kwargs} failed: {type(err).__name__}: {err}")
    return src, "none (quant_pre_process failed)"


def build_all(model, tokenizer, batch, tmp: Path, threads: int, notes: dict):
    builders = {
        "torch fp32": torch_fp32,
        "torch bf16 autocast": torch_bf16,
        TORCH_QDYNAMIC: torch_qdynamic,
    }
    onnx_path = tmp / "minilm.onnx"
    notes["onnx_export"] = export_onnx(model, batch, onnx_path)
    builders["ORT fp32"] = lambda m, b, t: (ort_fn(onnx_path, b, threads), onnx_path.stat().st_size)
    builders["ORT quantize_dynamic int8 per-channel"] = lambda m, b, t: ort_int8(onnx_path, b, t, threads, notes)
    for recipe in RECIPES:
        builders[f"bitsmith {recipe}"] = bitsmith_variant(recipe, tokenizer)
    return build_variants(builders, model, batch, tmp)


def build_variants(builders: dict, model, batch, tmp: Path):
    """(run functions, sizes, errors) of each builder; one that fails is reported and the rest go on."""
    fns, sizes, errors = {}, {}, {}
    for name, build in builders.items():
        try:
            fns[name], sizes[name] = build(model, batch, tmp)
        except Exception as err:  # noqa: BLE001 - report the failure, keep benchmarking the rest
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"variant {name!r} failed: {errors[name]}")
    return fns, sizes, errors


def ort_int8(onnx_path: Path, batch, tmp: Path, threads: int, notes: dict):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, notes["ort_preprocess"] = preprocess_onnx(onnx_path, tmp / "minilm-pre.onnx")
    out = tmp / "minilm-int8.onnx"
    quantize_dynamic(str(src), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return ort_fn(out, batch, threads), out.stat().st_size


def measure(fns, sizes, errors, repeats: int) -> list[dict]:
    ref_name = "torch fp32"
    outputs = {name: fn() for name, fn in fns.items()}
    latency = interleaved_latency(fns, repeats=repeats)
    rows = []
    for name in list(fns) + list(errors):
        row = {"variant": name, "error": errors.get(name)}
        if name in fns:
            row.update(latency_s=latency[name], latency_ratio=latency[name] / latency[ref_name])
            row.update(bytes=sizes[name], size_ratio=sizes[name] / sizes[ref_name])
            row.update(cosine_fidelity(outputs[name], outputs[ref_name]))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| variant | latency vs fp32 | median s | size MB | size vs fp32 | mean cosine | min cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['latency_ratio']:.2f} | {r['latency_s']:.3f} | {r['bytes'] / 1e6:.1f} "
            f"| {r['size_ratio']:.3f} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} |"
        )
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[dict]:
    from bitsmith.nn import cpu

    by_name = {r["variant"]: r for r in rows if not r["error"]}
    checks = []
    for label, variant, metric, op, bound in TARGETS + (EXACT_INT8_TARGETS if cpu.onednn_int8_exact() else []):
        if isinstance(bound, str):
            bound = by_name[bound][metric] if bound in by_name else None
        value = by_name[variant][metric] if variant in by_name else None
        ok = None not in (value, bound) and (value >= bound if op == ">=" else value <= bound)
        shown = "n/a" if bound is None else f"{bound:.4g}"
        checks.append({"target": f"{label} {op} {shown}", "value": value, "bound": bound, "pass": bool(ok)})
    return checks


def report(machine: dict, notes: dict, rows: list[dict], checks: list[dict]) -> int:
    print(f"\n{machine['line']} | onnxruntime {machine['onnxruntime']}")
    print(f"batch {notes['batch_shape']}, {notes['repeats']} interleaved rounds (median); sizes in MB = 1e6 bytes")
    print(f"ONNX export: {notes.get('onnx_export')}; ORT int8 pre-processing: {notes.get('ort_preprocess')}")
    print(f"kernels that ran (bitsmith): {notes.get('kernels')}\n")
    print(markdown(rows) + "\n")
    return finish([(f"{c['target']}  (measured {'n/a' if c['value'] is None else format(c['value'], '.4f')})",
                    c["pass"]) for c in checks])


def main(argv=None) -> int:
    args = parse(bench_parser(__doc__), argv)
    model, tokenizer, batch, notes = minilm_batch(args.repeats)
    tmp = Path(tempfile.mkdtemp(prefix="bench-minilm-"))
    try:
        fns, sizes, errors = build_all(model, tokenizer, batch, tmp, args.threads, notes)
        rows = measure(fns, sizes, errors, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from bitsmith.nn import dispatch

    notes["kernels"] = ", ".join(sorted({f"{d.family} {d.key}: {d.chosen}" for d in dispatch.decisions()}))
    machine = {**machine_summary(), "line": machine_line(), "onnxruntime": ort.__version__}
    checks = check_targets(rows)
    code = report(machine, notes, rows, checks)
    if args.json:
        payload = {"machine": machine, "settings": notes, "results": rows, "checks": checks}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
