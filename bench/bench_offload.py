"""A model larger than the memory it is allowed: GPTQ block by block from disk under a hard limit.

1. Writes a Llama-architecture checkpoint with random weights (default 28 layers, hidden 2048,
   SwiGLU 5632, vocab 32000: 1.57 B parameters, 6.3 GB in float32), one safetensors shard per
   block plus an index, tensor by tensor (never the whole model in memory).
2. Runs ``bitsmith.api.offload.quantize_offloaded`` (GPTQ W4 g128) in a child process inside a
   cgroup whose memory limit (default 3 GiB) is below the checkpoint's size; reports the child's
   peak resident memory (VmHWM), the cgroup's peak usage (which also counts page cache) and
   how often the limit was hit, and the wall time.
3. Control: loading the same checkpoint with transformers' from_pretrained under the same limit,
   which is expected to be killed.

Needs root for the cgroup (v1 memory controller or v2). Usage:
    python bench/bench_offload.py --dir /some/scratch --limit-gb 3 [--layers 28] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_checkpoint(path: Path, layers: int, hidden: int, intermediate: int, vocab: int, heads: int) -> int:
    """Random Llama checkpoint, one shard per block; returns its size in bytes."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    config.save_pretrained(path)
    with torch.device("meta"):
        block = LlamaDecoderLayer(config, 0)
    shapes = {name: tuple(p.shape) for name, p in block.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def tensor(name, shape):
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        return torch.randn(shape, generator=generator) * 0.02

    for index in range(layers):
        shard = f"block-{index:05d}.safetensors"
        tensors = {f"model.layers.{index}.{n}": tensor(n, s) for n, s in shapes.items()}
        save_file(tensors, path / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())
        del tensors
    rest = {"model.embed_tokens.weight": tensor("embed", (vocab, hidden)), "model.norm.weight": torch.ones(hidden),
            "lm_head.weight": tensor("lm_head", (vocab, hidden))}
    save_file(rest, path / "rest.safetensors", metadata={"format": "pt"})
    weight_map.update({n: "rest.safetensors" for n in rest})
    total += sum(t.numel() * 4 for t in rest.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


class MemoryCgroup:
    """A memory-limited cgroup (v1 memory controller, else v2) that child processes are moved into."""

    def __init__(self, name: str, limit_bytes: int):
        v1 = Path("/sys/fs/cgroup/memory")
        if v1.is_dir():
            self.path, self.v1 = v1 / name, True
        else:
            self.path, self.v1 = Path("/sys/fs/cgroup") / name, False
        self.path.mkdir(exist_ok=True)
        if self.v1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit_bytes))
            (self.path / "memory.max_usage_in_bytes").write_text("0")
        else:
            (self.path / "memory.max").write_text(str(limit_bytes))
            (self.path / "memory.swap.max").write_text("0")

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        file = self.path / name
        return int(file.read_text()) if file.exists() else None

    def limit_hits(self) -> int | None:
        file = self.path / ("memory.failcnt" if self.v1 else "memory.events")
        if not file.exists():
            return None
        if self.v1:
            return int(file.read_text())
        events = dict(line.split() for line in file.read_text().splitlines())
        return int(events.get("max", 0))

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
mode, source, out = sys.argv[1], sys.argv[2], sys.argv[3]
start = time.perf_counter()
if mode == "bitsmith":
    import bitsmith
    from bitsmith.api.offload import quantize_offloaded
    g = torch.Generator().manual_seed(0)
    vocab = json.load(open(source + "/config.json"))["vocab_size"]
    calibration = [{"input_ids": torch.randint(0, vocab, (4, 128), generator=g)} for _ in range(4)]
    def rss():
        return [l for l in open("/proc/self/status") if l.startswith(("VmRSS", "VmHWM"))]
    def progress(message):
        if "written" in message:
            print(message, " ".join(x.split()[1] for x in rss()), flush=True)
    result = quantize_offloaded(source, bitsmith.load_recipe("gptq-w4a16"), out, calibration, progress=progress)
    info = {"blocks": result["blocks"], "quantized_layers": len(result["quantized"])}
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    info = {"parameters": sum(p.numel() for p in model.parameters())}
info["seconds"] = round(time.perf_counter() - start, 1)
# VmHWM: this process image's peak resident set (ru_maxrss would include the forked parent's pages)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
info["peak_rss_bytes"] = int(hwm) * 1024
print("RESULT " + json.dumps(info), flush=True)
"""


def run_limited(mode: str, source: Path, out: Path, limit: int, threads: int) -> dict:
    group = MemoryCgroup(f"bitsmith-bench-{mode}", limit)
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(source), str(out), str(threads)],
                              preexec_fn=group.enter, capture_output=True, text=True)
        result = {"exit_code": proc.returncode, "cgroup_peak_bytes": group.peak(), "limit_hits": group.limit_hits()}
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                result.update(json.loads(line[7:]))
        result["progress"] = [line for line in proc.stdout.splitlines() if "written" in line][-3:]
        if proc.returncode != 0:
            result["stderr_tail"] = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
        return result
    finally:
        group.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="scratch directory for the checkpoint and the output")
    parser.add_argument("--limit-gb", type=float, default=3.0)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-control", action="store_true", help="do not run the from_pretrained control")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint and output")
    args = parser.parse_args()

    scratch = Path(args.dir)
    source, out = scratch / "random-llama", scratch / "random-llama-gptq-w4a16"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if not (source / "model.safetensors.index.json").exists():
        size = make_checkpoint(source, args.layers, args.hidden, args.intermediate, args.vocab, args.heads)
    else:
        size = json.loads((source / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    made = time.perf_counter() - start
    limit = int(args.limit_gb * 2**30)
    report = {"checkpoint_bytes": size, "limit_bytes": limit, "make_seconds": round(made, 1),
              "bitsmith_gptq_w4a16": run_limited("bitsmith", source, out, limit, args.threads)}
    if out.exists():
        report["output_bytes"] = sum(f.stat().st_size for f in out.iterdir())
    if not args.skip_control:
        report["transformers_from_pretrained"] = run_limited("transformers", source, out, limit, args.threads)
    report["parent_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
