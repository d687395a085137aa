"""What the bench scripts share: the --repeats / --threads / --json options and MiniLM's evaluation batch."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def bench_parser(doc: str, repeats: int = 7, json_option: bool = True) -> argparse.ArgumentParser:
    """A parser with the options every bench script takes; scripts add their own before ``parse``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds per variant (median); one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch (and ORT) intra-op threads")
    if json_option:
        parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse and pin torch's thread count to --threads."""
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def minilm_batch(repeats: int, sentences: int = 64):
    """(model, tokenizer, padded batch of the evaluation sentences, notes for the report)."""
    from bitsmith.zoo.minilm import encode_batch, load_minilm
    from bitsmith.zoo.text import doc_sentences

    model, tokenizer = load_minilm()
    batch = encode_batch(tokenizer, doc_sentences(sentences), max_length=128)
    notes = {"sentences": sentences, "batch_shape": list(batch["input_ids"].shape), "repeats": repeats}
    return model, tokenizer, batch, notes


def machine_line() -> str:
    """The CPU and the facts that decide its kernels (flags read from the machine), for every report."""
    from bitsmith.nn import cpu, native

    facts = cpu.summary()
    caps = ", ".join(f"{k}={v}" for k, v in facts["library_caps"].items())
    return (f"CPU: {facts['cpu']} | flags: {' '.join(facts['flags'])} | int8: {facts['int8_dot_product']}"
            f" ({facts['onednn_int8']}) | bf16: {facts['bf16']}{' | caps: ' + caps if caps else ''}"
            f" | native: {native.status()} | torch {torch.__version__} | threads {torch.get_num_threads()}")


def finish(checks: list[tuple[str, bool]]) -> int:
    """Print each (target, passed) as PASS/FAIL; the exit status is 1 if any target failed."""
    for target, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {target}")
    failed = sum(not passed for _, passed in checks)
    print(f"\n{len(checks) - failed} of {len(checks)} targets met" + (f"; {failed} FAILED" if failed else ""))
    return 1 if failed else 0


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def run_child(command: list[str]) -> dict:
    """Run a worker process; its last stdout line is its JSON result (a failure: RuntimeError, its last line)."""
    import json
    import subprocess

    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[1]).name} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def zoo_worker(args, run) -> dict:
    """A worker's common part: the zoo model ``args.model`` and the calibration windows ``args.calib`` (batches
    of 8), ``run(model, calibration)`` timed (it returns its report), the result saved to ``args.out``; returns
    the seconds, this process's peak memory and the report's note count."""
    import time

    import bitsmith
    from bitsmith.io.models import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model).model
    calibration = [{"input_ids": chunk} for chunk in torch.load(args.calib).split(8)]
    start = time.perf_counter()
    report = run(model, calibration)
    seconds = time.perf_counter() - start
    model.bitsmith_source = {"kind": "zoo", "name": args.model}
    bitsmith.save(model, args.out)
    return {"seconds": round(seconds, 2), "peak_rss_bytes": peak_rss(), "notes": len(report.notes)}
