"""Time every kernel bitsmith's modules can run here, per shape and batch size, side by side in one run.

    python bench/bench_kernels.py [--rows 1 8 64 512 4096] [--shapes 384x1536 1536x384 4096x4096] [--repeats 7]

Each cell is the median ms of one (M x K) @ (K x N) product through the module's own candidate (the same calls
``bitsmith.nn.dispatch`` times at the first call of a shape), with fp32 and torch's own dynamic int8 (fbgemm,
per-tensor activations) beside them; ``*`` marks what the dispatcher would choose in each row's family. The
no-VNNI exact W8A8 path is timed too (``BITSMITH_INT8=exact``), so its cost is seen on any CPU.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from _common import bench_parser, machine_line, parse

from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.nn.linear import HalfLinear, Int8DynamicLinear, Int8WeightOnlyLinear, IntxWeightOnlyLinear


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def modules(linear: torch.nn.Linear) -> dict:
    w8 = quantize_weight_rtn(linear.weight, 8, "channel", True)
    return {
        "w8a8-dynamic": Int8DynamicLinear.from_quantized(w8, None),
        "w8a16": Int8WeightOnlyLinear.from_quantized(w8, None),
        "w4a16 g128": IntxWeightOnlyLinear.from_quantized(quantize_weight_rtn(linear.weight, 4, 128, False), None),
        "bf16": HalfLinear.from_float(linear, "bf16"),
    }


def rows_for(linear, module_set, x, repeats) -> list[tuple[str, float, bool]]:
    """(label, ms, whether it is the fastest of its family) for every candidate of every module."""
    rows = [("fp32", median_ms(lambda: torch.nn.functional.linear(x, linear.weight), repeats), False)]
    fbgemm = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear),
                                                    {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig})
    rows.append(("torch dynamic int8 (fbgemm)", median_ms(lambda: fbgemm(x), repeats), False))
    for family, module in module_set.items():
        timings = {name: median_ms(call, repeats) for name, call in module.candidates(x).items()}
        if family == "w8a8-dynamic":
            os.environ["BITSMITH_INT8"] = "exact"
            try:
                timings.update({f"{n} (exact path forced)": median_ms(c, repeats)
                                for n, c in module.candidates(x).items() if "split" in n})
            finally:
                del os.environ["BITSMITH_INT8"]
        best = min(timings, key=timings.get)
        rows += [(f"{family}: {name}", ms, name == best) for name, ms in timings.items()]
    return rows


def main() -> int:
    parser = bench_parser(__doc__, json_option=False)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    parser.add_argument("--shapes", nargs="+", default=["384x1536", "1536x384", "4096x4096"])
    args = parse(parser)
    torch.manual_seed(0)
    print(machine_line())
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        linear = torch.nn.Linear(k, n, bias=False)
        module_set = modules(linear)
        table: dict[str, list[str]] = {}
        for m in args.rows:
            x = torch.randn(m, k)
            with torch.inference_mode():
                for label, ms, best in rows_for(linear, module_set, x, args.repeats):
                    table.setdefault(label, []).append(f"{ms:.3f}{' *' if best else ''}")
        print(f"\nK={k} N={n}: median ms per call (* fastest of its kind)\n")
        print("| kernel | " + " | ".join(f"M={m}" for m in args.rows) + " |")
        print("|---|" + "---|" * len(args.rows))
        for label, cells in table.items():
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
