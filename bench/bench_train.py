"""Post-training quantization against quantization-aware training, on the same data and seeds, on this machine.

Part ``digits`` (digits-cnn, the issue's scheme): int4 per-channel symmetric weights with static int8
activations (int4 codes held as int8 on the W8A8 kernels), BatchNorm folded first.
- PTQ: the ``quantize`` stage on the first ``--calib-samples`` train images (min-max input ranges);
- QAT: the ``qat`` stage on the same images, ``--steps`` AdamW steps of KL to the float model's logits,
  ranges starting where PTQ's are.
Each runs in a process of its own: wall time, time per training step and peak memory (VmHWM) are that
process's. Test-split accuracy of each against float; the loss curve goes to ``--plot``.
Target: QAT recovers at least 90% of PTQ's accuracy drop (the issue's; the drop must be at least a point,
else a harsher scheme is due).

Part ``minilm-distill``: MiniLM with 50% of every FFN's channels removed (``prune_structured``, activations
importance, down projection refit), alone and followed by ``distill`` (the built-in ``distill-structured-ffn-50``:
every float parameter trained to the unpruned model's mean-pooled sentence embeddings, cosine, plus ``--match``
layers by MSE). Both calibrate (and distill trains) on ``--calib-samples`` pieces of up to 400 characters of
docs-lm's training text (the stdlib's module docstrings, written to a ``--calib`` file; the zoo's own calibration
split has only 544 paragraphs, which full-parameter training overfits); mean cosine to fp32 on MiniLM's 64
evaluation paragraphs (Python's reference topics: text not used for training). Target: distillation recovers at
least half of the cosine pruning alone loses.

Part ``smollm2-qlora``: SmolLM2-135M, every Linear but lm_head NF4 (groups of 64, double-quantized absmax):
untuned (the ``quantize`` stage) against QLoRA (the built-in ``qlora-nf4``: rank-16 adapters trained on the
next tokens of docs-lm's training text, ``--steps`` steps of ``--batch-size`` windows of 256 tokens), and full
fine-tuning of the float model on the same text (``distill`` with ``loss: text``: every parameter, AdamW;
``--ft-steps`` steps, run for its peak memory and time per step). Held-out perplexity on docs-lm's held-out
split (Python documentation text not used for training). Targets: QLoRA's perplexity below the untuned NF4
model's; the peak memory of its training steps at most 60% of full fine-tuning's (VmHWM reset after the first
step; the whole process's peak, which includes ``compress``'s evaluation of the float model and the result on
8 windows of 256 tokens over a 49152-token vocabulary, is printed beside it).

Part ``smollm2-student``: SmolLM2-135M cut to 15 of its 30 blocks (every other one, the teacher's weights):
before training, distilled from the full model (KL on the logits), and trained on the text alone (``loss:
text``), the same steps, data and seed. Target: the distilled student's held-out perplexity below both.

Part ``smollm2-qat``: SmolLM2-135M at int3 asymmetric weights in groups of 128 (lm_head kept): round-to-nearest
(MSE ranges), GPTQ, and QAT with distillation started from GPTQ's result (a ``quantize`` stage with GPTQ, then
``qat`` with the same scheme: KL to the float model's logits, ``--steps`` steps). Targets (the issue's): QAT
recovers at least half of the held-out perplexity increase round-to-nearest leaves, and ends below GPTQ.

Part ``smollm2-memory``: QLoRA's and full fine-tuning's memory in training alone, as a user's script runs it
(``run_stages`` on the loaded model: no evaluation and no float original beside it, which ``compress`` keeps
and the smollm2-qlora part's peaks include). QLoRA runs as its recipe (``qlora-nf4``) says, with gradient
checkpointing; full fine-tuning runs without it, as transformers' Trainer does by default, and once with it.
Target: QLoRA's training-steps peak at most 60% of full fine-tuning's (the first).

    .venv/bin/python bench/bench_train.py --part digits
    .venv/bin/python bench/bench_train.py --part minilm-distill
    .venv/bin/python bench/bench_train.py --part smollm2-qlora --steps 100 --calib-samples 256
    .venv/bin/python bench/bench_train.py --part smollm2-student --steps 100 --calib-samples 256
    .venv/bin/python bench/bench_train.py --part smollm2-qat --steps 100 --calib-samples 128 --lr 1e-5
    .venv/bin/python bench/bench_train.py --part smollm2-memory --steps 10 --ft-steps 10 --calib-samples 256
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_parser, finish, machine_line, parse, peak_rss, run_child  # noqa: E402

W4A8_STATIC = {"weights": {"dtype": "int4", "granularity": "channel", "symmetric": True},
               "activations": {"dtype": "int8", "granularity": "tensor", "dynamic": False, "observer": "minmax"}}


def digits_recipe(stage: str, args) -> dict:
    body = {"rules": [{"targets": ["Linear", "Conv2d"], "scheme": W4A8_STATIC}]}
    if stage == "qat":
        body.update(steps=args.steps, lr=args.lr, seed=args.seed)
    return {"version": 2, "name": f"{stage}-w4a8-static", "stages": ["fold_batchnorm", {stage: body}]}


def minilm_recipes(args) -> dict[str, dict]:
    import bitsmith

    distill = bitsmith.load_recipe("distill-structured-ffn-50").to_dict()
    distill["stages"][1]["distill"].update(steps=args.steps, lr=args.lr, seed=args.seed, match=args.match or [])
    return {"prune": dict(distill, name="structured-ffn-50", stages=distill["stages"][:1]), "distill": distill}


def minilm_worker(args) -> int:
    import bitsmith
    from bitsmith.api.compress import compress

    recipe = bitsmith.Recipe.model_validate(minilm_recipes(args)[args.worker.split(":")[1]])
    start = time.perf_counter()
    result = compress("minilm", recipe, out=None, calib=args.calib, calib_samples=args.calib_samples, repeats=1)
    summary = result["stages"][-1]["summary"]
    row = {"seconds": time.perf_counter() - start, "peak_bytes": peak_rss(), "summary": summary,
           "mean_cosine": result["metrics"]["mean_cosine"], "min_cosine": result["metrics"]["min_cosine"]}
    if summary.get("steps"):
        row["step_seconds"] = summary["seconds"] / summary["steps"]
    print(json.dumps(row))
    return 0


def minilm_calibration(args) -> Path:
    """A text file of docs-lm training pieces, one per line (never MiniLM's evaluation paragraphs)."""
    from bitsmith.zoo.docs_lm import calibration_texts

    path = Path("bench/out/train/minilm-calib.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(t.split()) for t in calibration_texts(args.calib_samples, max_chars=400)) + "\n")
    return path


def part_minilm(args) -> tuple[list[str], list[tuple[str, bool]]]:
    args.calib = args.calib or minilm_calibration(args)
    common = [sys.executable, __file__, "--threads", str(args.threads), "--calib-samples", str(args.calib_samples),
              "--calib", str(args.calib),
              "--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(args.seed), "--part", "minilm-distill"]
    common += [item for layer in args.match or [] for item in ("--match", layer)]
    rows = {name: run_child([*common, "--worker", f"minilm:{name}"]) for name in ("prune", "distill")}
    pruned, distilled = rows["prune"], rows["distill"]
    lost, left = 1 - pruned["mean_cosine"], 1 - distilled["mean_cosine"]
    recovered = (lost - left) / lost
    plot({"distill (structured ffn 50%)": distilled["summary"]["loss_curve"]}, args.plot, "training loss")
    s = distilled["summary"]
    lines = [f"MiniLM, 50% of the FFN channels removed; {s['train_batches']} batches of 16 pieces of {args.calib}"
             f" for training, {s['held_out_batches']} held out; distill: {args.steps} steps, lr {args.lr}, seed"
             f" {args.seed}, match {args.match or 'none'}",
             "| recipe | mean cosine | min cosine | wall s | s / step | peak memory MB |", "|---|---|---|---|---|---|"]
    for name, row in (("prune alone", pruned), ("prune + distill", distilled)):
        lines.append(f"| {name} | {row['mean_cosine']:.6f} | {row['min_cosine']:.6f} | {row['seconds']:.1f} |"
                     f" {row.get('step_seconds', 0):.3f} | {row['peak_bytes'] / 2**20:.0f} |")
    lines.append(f"held-out loss {s['held_out_loss_before']} -> {s['held_out_loss_after']}; training loss"
                 f" {s['train_loss_first']} -> {s['train_loss_last']}; recovered {100 * recovered:.1f}% of the cosine"
                 f" pruning lost; loss curve: {args.plot}")
    return lines, [("MiniLM FFN 50%: distillation recovers at least half of the cosine lost by pruning alone",
                    recovered >= 0.5)]


NF4_DQ = {"weights": {"dtype": "nf4", "granularity": 64, "double_quant": True}}


def smollm2_recipes(args) -> dict[str, dict]:
    import bitsmith

    train = {"steps": args.steps, "lr": args.lr, "seed": args.seed, "batch_size": args.batch_size}
    qlora = bitsmith.load_recipe("qlora-nf4").to_dict()
    qlora["stages"][0]["qlora"].update(train)
    nf4 = {"version": 2, "name": "nf4-dq", "stages": [{"quantize": {
        "rules": [{"targets": ["Linear"], "scheme": NF4_DQ}], "ignore": ["lm_head"]}}]}

    def distill(name, **options):
        return {"version": 2, "name": name, "stages": [{"distill": {**train, **options}}]}

    w3 = {"weights": {"dtype": "int3", "granularity": 128, "symmetric": False, "clip": "mse"}}
    gptq = {"quantize": {"rules": [{"targets": ["Linear"], "scheme": {"weights": {**w3["weights"], "clip": "minmax",
                                                                                  "algorithm": "gptq"}}}],
                         "ignore": ["lm_head"]}}
    rtn = {"version": 2, "name": "rtn-w3-g128", "stages": [{"quantize": {
        "rules": [{"targets": ["Linear"], "scheme": w3}], "ignore": ["lm_head"]}}]}
    qat = {"qat": {"rules": [{"targets": ["Linear"], "scheme": {"weights": {**w3["weights"], "clip": "minmax"}}}],
                   "ignore": ["lm_head"], "loss": "kl", **train}}
    return {"rtn-w3": rtn, "gptq-w3": {"version": 2, "name": "gptq-w3-g128", "stages": [gptq]},
            "qat-w3": {"version": 2, "name": "gptq-qat-w3-g128", "stages": [gptq, qat]},
            "nf4": nf4, "qlora": qlora, "full-ft": distill("full-ft", loss="text", steps=args.ft_steps),
            "full-ft-ckpt": distill("full-ft-ckpt", loss="text", steps=args.ft_steps, gradient_checkpointing=True),
            "cut": distill("cut-15", keep_blocks=15, steps=0),
            "student-distill": distill("student-15-distill", keep_blocks=15, loss="kl"),
            "student-text": distill("student-15-text", keep_blocks=15, loss="text")}


def _reset_peak() -> None:
    """Start VmHWM again from the current resident size (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _training_peak(training: dict):
    """A progress callback keeping in ``training["peak"]`` the peak of the training steps alone: from after the
    first step (the model and its training state in place) to the last."""
    def progress(message) -> None:
        if isinstance(message, str) and " step " in message:
            if not training:
                _reset_peak()
            training["peak"] = peak_rss()

    return progress


def smollm2_worker(args) -> int:
    import bitsmith
    from bitsmith.api.compress import compress

    recipe = bitsmith.Recipe.model_validate(smollm2_recipes(args)[args.worker.split(":")[1]])
    training = {}
    start = time.perf_counter()
    # the process's peak also counts compress's float original and its evaluation of both models
    result = compress("smollm2", recipe, out=None, calib_samples=args.calib_samples, repeats=1,
                      progress=_training_peak(training))
    summary = result["stages"][-1]["summary"]
    m = result["metrics"]
    row = {"seconds": time.perf_counter() - start, "peak_bytes": peak_rss(), "summary": summary,
           "training_peak_bytes": training.get("peak"),
           "perplexity": m["perplexity"], "float_perplexity": m["float_perplexity"], "bytes": m["bytes"]}
    if summary.get("steps"):
        row["step_seconds"] = summary["seconds"] / summary["steps"]
    print(json.dumps(row))
    return 0


def smollm2_memory_worker(args) -> int:
    """Fine-tuning alone, as a user's training script runs it: smollm2 loaded, the recipe's training stage run on
    the calibration text (``run_stages``), nothing evaluated and no float original kept beside it."""
    import bitsmith
    from bitsmith.evaluation.tasks import task_for
    from bitsmith.io.models import load_model

    recipe = bitsmith.Recipe.model_validate(smollm2_recipes(args)[args.worker.split(":")[1]])
    loaded = load_model("smollm2")
    task = task_for(loaded.source, loaded.tokenizer, None, model=loaded.model)
    calibration = task.calibration(None, args.calib_samples)
    training = {}
    start = time.perf_counter()
    report = bitsmith.run_stages(loaded.model, recipe, calibration, progress=_training_peak(training))
    summary = report.stages[-1].summary
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_bytes": peak_rss(), "summary": summary,
                      "training_peak_bytes": training.get("peak"), "step_seconds": summary["seconds"] / summary["steps"]}))
    return 0


def _smollm2_rows(args, names, kind: str = "smollm2") -> dict[str, dict]:
    common = [sys.executable, __file__, "--threads", str(args.threads), "--calib-samples", str(args.calib_samples),
              "--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(args.seed), "--part", args.part,
              "--batch-size", str(args.batch_size), "--ft-steps", str(args.ft_steps)]
    rows = {}
    for name in names:
        rows[name] = run_child([*common, "--worker", f"{kind}:{name}"])
        print(f"{name}: {rows[name]['seconds']:.0f} s, perplexity {rows[name].get('perplexity')}", flush=True)
    return rows


def _smollm2_table(rows: dict[str, dict], labels: dict[str, str]) -> list[str]:
    lines = ["| model | held-out perplexity | wall s | s / step | process peak MB | training-steps peak MB |",
             "|---|---|---|---|---|---|"]
    first = next(iter(rows.values()))
    lines.append(f"| float | {first['float_perplexity']} | | | | |")
    for name, label in labels.items():
        row = rows[name]
        steps_peak = row.get("training_peak_bytes")
        lines.append(f"| {label} | {row['perplexity']} | {row['seconds']:.0f} | {row.get('step_seconds', 0):.2f} |"
                     f" {row['peak_bytes'] / 2**20:.0f} | {steps_peak / 2**20 if steps_peak else 0:.0f} |")
    return lines


def part_smollm2_qlora(args) -> tuple[list[str], list[tuple[str, bool]]]:
    rows = _smollm2_rows(args, ("nf4", "qlora", "full-ft"))
    s = rows["qlora"]["summary"]
    ratio = rows["qlora"]["training_peak_bytes"] / rows["full-ft"]["training_peak_bytes"]
    plot({"qlora nf4 (adapters)": s["loss_curve"]}, args.plot, "training loss (next-token cross-entropy)")
    lines = [f"SmolLM2-135M; {s['train_batches']} batches of {args.batch_size} windows of 256 tokens of docs-lm's"
             f" training text, {s['held_out_batches']} held out; qlora: {args.steps} steps, lr {args.lr}, seed"
             f" {args.seed}, {s['adapter_parameters']} adapter parameters; full fine-tuning: {args.ft_steps} steps",
             *_smollm2_table(rows, {"nf4": "NF4 dq g64, untuned", "qlora": "NF4 dq g64 + QLoRA r16",
                                    "full-ft": "float, full fine-tuning"}),
             f"qlora held-out loss {s['held_out_loss_before']} -> {s['held_out_loss_after']}; training loss"
             f" {s['train_loss_first']} -> {s['train_loss_last']}; training-steps peak qlora / full fine-tuning"
             f" {ratio:.2f} (whole process: {rows['qlora']['peak_bytes'] / rows['full-ft']['peak_bytes']:.2f});"
             f" loss curve: {args.plot}"]
    checks = [("smollm2 QLoRA: held-out perplexity below the untuned NF4 model's",
               rows["qlora"]["perplexity"] < rows["nf4"]["perplexity"]),
              ("smollm2 QLoRA: peak memory of the training steps at most 60% of full fine-tuning's", ratio <= 0.6)]
    return lines, checks


def part_smollm2_memory(args) -> tuple[list[str], list[tuple[str, bool]]]:
    rows = _smollm2_rows(args, ("qlora", "full-ft", "full-ft-ckpt"), kind="memory")
    peak = {name: row["training_peak_bytes"] for name, row in rows.items()}
    ratio = peak["qlora"] / peak["full-ft"]
    lines = [f"SmolLM2-135M, training alone (loaded, then the stage: no evaluation, no float original kept);"
             f" qlora (the qlora-nf4 recipe: gradient checkpointing on) {args.steps} steps, full fine-tuning (AdamW"
             f" on every parameter) {args.ft_steps} steps, batches of {args.batch_size} windows of 256 tokens",
             "| run | s / step | process peak MB | training-steps peak MB |", "|---|---|---|---|"]
    for name, label in (("qlora", "NF4 dq g64 + QLoRA r16, gradient checkpointing"),
                        ("full-ft", "float, full fine-tuning"),
                        ("full-ft-ckpt", "float, full fine-tuning, gradient checkpointing")):
        row = rows[name]
        lines.append(f"| {label} | {row['step_seconds']:.2f} | {row['peak_bytes'] / 2**20:.0f} |"
                     f" {peak[name] / 2**20:.0f} |")
    lines.append(f"training-steps peak qlora / full fine-tuning {ratio:.2f} (whole process:"
                 f" {rows['qlora']['peak_bytes'] / rows['full-ft']['peak_bytes']:.2f}); qlora / full fine-tuning"
                 f" with gradient checkpointing too {peak['qlora'] / peak['full-ft-ckpt']:.2f}")
    return lines, [("smollm2 QLoRA, training alone: training-steps peak at most 60% of full fine-tuning's",
                    ratio <= 0.6)]


def part_smollm2_qat(args) -> tuple[list[str], list[tuple[str, bool]]]:
    rows = _smollm2_rows(args, ("rtn-w3", "gptq-w3", "qat-w3"))
    s = rows["qat-w3"]["summary"]
    plot({"qat w3 g128 from gptq": s["loss_curve"]}, args.plot, "training loss (KL to float)")
    base = rows["rtn-w3"]["float_perplexity"]
    increase = {name: row["perplexity"] - base for name, row in rows.items()}
    recovered = (increase["rtn-w3"] - increase["qat-w3"]) / increase["rtn-w3"]
    lines = [f"SmolLM2-135M, int3 asymmetric g128 (lm_head kept); {s['train_batches']} batches of {args.batch_size}"
             f" windows of 256 tokens, {s['held_out_batches']} held out; qat: {args.steps} steps, lr {args.lr},"
             f" seed {args.seed}, from GPTQ's result",
             *_smollm2_table(rows, {"rtn-w3": "RTN (MSE ranges)", "gptq-w3": "GPTQ", "qat-w3": "GPTQ + QAT (KL)"}),
             f"qat held-out KL {s['held_out_loss_before']} -> {s['held_out_loss_after']}; recovered"
             f" {100 * recovered:.1f}% of RTN's perplexity increase; loss curve: {args.plot}"]
    checks = [("smollm2 W3 g128: QAT recovers at least half of RTN's perplexity increase", recovered >= 0.5),
              ("smollm2 W3 g128: QAT ends below GPTQ", rows["qat-w3"]["perplexity"] < rows["gptq-w3"]["perplexity"])]
    return lines, checks


def part_smollm2_student(args) -> tuple[list[str], list[tuple[str, bool]]]:
    rows = _smollm2_rows(args, ("cut", "student-distill", "student-text"))
    s, t = rows["student-distill"]["summary"], rows["student-text"]["summary"]
    plot({"distilled (KL to the full model)": s["loss_curve"]}, args.plot, "training loss (KL)")
    lines = [f"SmolLM2-135M cut to 15 of 30 blocks (indices {s['kept_blocks']['indices']}); {s['train_batches']}"
             f" batches of {args.batch_size} windows of 256 tokens, {s['held_out_batches']} held out; {args.steps}"
             f" steps, lr {args.lr}, seed {args.seed}",
             *_smollm2_table(rows, {"cut": "15 blocks, before training", "student-distill": "15 blocks, distilled",
                                    "student-text": "15 blocks, trained on the text alone"}),
             f"distill held-out KL {s['held_out_loss_before']} -> {s['held_out_loss_after']}; text-only held-out"
             f" cross-entropy {t['held_out_loss_before']} -> {t['held_out_loss_after']}; loss curve: {args.plot}"]
    distilled = rows["student-distill"]["perplexity"]
    checks = [("smollm2 half-blocks student: distilled perplexity below the student's before training",
               distilled < rows["cut"]["perplexity"]),
              ("smollm2 half-blocks student: distilled perplexity below training on the text alone",
               distilled < rows["student-text"]["perplexity"])]
    return lines, checks


def worker(args) -> int:
    import torch

    import bitsmith
    from bitsmith.evaluation.tasks import ImageClassificationTask
    from bitsmith.io.models import load_model
    from bitsmith.zoo.digits import calibration_data

    torch.manual_seed(args.seed)
    model = load_model("digits-cnn").model
    task = ImageClassificationTask()
    float_model = load_model("digits-cnn").model
    calibration = list(calibration_data(args.calib_samples).split(32))
    recipe = bitsmith.Recipe.model_validate(digits_recipe(args.worker, args))
    start = time.perf_counter()
    report = bitsmith.quantize_(model, recipe, calibration=calibration)
    seconds = time.perf_counter() - start
    summary = report.stages[-1].summary
    result = {"seconds": seconds, "peak_bytes": peak_rss(), **task.fidelity(float_model, model),
              "summary": summary, "done": report.quantized}
    if summary.get("steps"):
        result["step_seconds"] = summary["seconds"] / summary["steps"]
    print(json.dumps(result))
    return 0


def plot(curves: dict[str, list], path: Path, label: str = "training loss (KL to float)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name, curve in curves.items():
        axis.plot([c[0] for c in curve], [c[1] for c in curve], label=name)
    axis.set_xlabel("step")
    axis.set_ylabel(label)
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def part_digits(args) -> tuple[list[str], list[tuple[str, bool]]]:
    common = [sys.executable, __file__, "--threads", str(args.threads), "--calib-samples", str(args.calib_samples),
              "--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(args.seed), "--part", "digits"]
    rows = {name: run_child([*common, "--worker", name]) for name in ("quantize", "qat")}
    ptq, qat = rows["quantize"], rows["qat"]
    drop, left = ptq["accuracy_drop_points"], qat["accuracy_drop_points"]
    recovered = (drop - left) / drop if drop > 0 else float("nan")
    plot({"qat w4a8 static": qat["summary"]["loss_curve"]}, args.plot)
    s = qat["summary"]
    lines = [f"digits-cnn, int4 per-channel weights + static int8 activations; {args.calib_samples} train images"
             f" ({s['train_batches']} batches of 32 for training, {s['held_out_batches']} held out); qat: {args.steps}"
             f" steps, lr {args.lr}, seed {args.seed}",
             "| method | test accuracy | drop (points) | wall s | s / step | peak memory MB |", "|---|---|---|---|---|---|",
             f"| float | {ptq['float_accuracy']:.5f} | | | | |"]
    for name, row in (("PTQ", ptq), ("QAT", qat)):
        lines.append(f"| {name} | {row['accuracy']:.5f} | {row['accuracy_drop_points']:.3f} | {row['seconds']:.1f} |"
                     f" {row.get('step_seconds', 0):.3f} | {row['peak_bytes'] / 2**20:.0f} |")
    lines.append(f"qat held-out KL {s['held_out_loss_before']} -> {s['held_out_loss_after']}; training KL"
                 f" {s['train_loss_first']} -> {s['train_loss_last']}; recovered {100 * recovered:.1f}% of PTQ's drop;"
                 f" loss curve: {args.plot}")
    checks = [("digits-cnn: PTQ's drop at this scheme is at least a point (else a harsher scheme is due)", drop >= 1.0),
              ("digits-cnn: QAT recovers at least 90% of PTQ's accuracy drop", recovered >= 0.9)]
    return lines, checks


PARTS = {"digits": part_digits, "minilm-distill": part_minilm, "smollm2-qlora": part_smollm2_qlora,
         "smollm2-student": part_smollm2_student, "smollm2-qat": part_smollm2_qat,
         "smollm2-memory": part_smollm2_memory}


def main(argv=None) -> int:
    parser = bench_parser(__doc__, json_option=False)
    parser.add_argument("--part", choices=tuple(PARTS), default="digits")
    parser.add_argument("--calib-samples", type=int, default=1024, help="training samples (images or paragraphs)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, help="default: 1e-4 (digits), 5e-5 (minilm-distill)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", type=Path, help="minilm-distill: a text file, one sample per line (default: written)")
    parser.add_argument("--match", action="append", help="minilm-distill: a layer whose output is matched (repeat)")
    parser.add_argument("--plot", type=Path, help="the loss curve (default bench/plots/train-PART-loss.png)")
    parser.add_argument("--batch-size", type=int, default=2, help="smollm2: windows of 256 tokens per step")
    parser.add_argument("--ft-steps", type=int, default=10, help="smollm2-qlora: steps of full fine-tuning")
    parser.add_argument("--worker", help=argparse_hidden())
    args = parse(parser, argv)
    if args.lr is None:
        args.lr = {"digits": 1e-4, "smollm2-qlora": 2e-4, "smollm2-memory": 2e-4}.get(args.part, 5e-5)
    if args.worker:
        kind = args.worker.split(":")[0]
        return {"minilm": minilm_worker, "smollm2": smollm2_worker, "memory": smollm2_memory_worker}.get(
            kind, worker)(args)
    args.plot = args.plot or Path(f"bench/plots/train-{args.part}-loss.png")
    print(machine_line())
    lines, checks = PARTS[args.part](args)
    print("\n".join(["", f"## {args.part}", *lines]))
    return finish(checks)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
