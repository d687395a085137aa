"""Time the CPU matmul kernels bitsmith chooses between, per batch size, side by side in one run.

    python bench/bench_kernels.py [--rows 1 8 64 128 512 4096] [--repeats 7]

Each cell is the median time of one (M x K) @ (K x N) product in ms; the weight-only choice in
``bitsmith.nn.kernels`` (packed kernel up to WEIGHT_ONLY_MAX_M rows, bf16 dequant above) comes from this.
"""

from __future__ import annotations

import statistics
import time

import torch

from _common import bench_parser, parse

from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.nn.kernels import WEIGHT_ONLY_MAX_M
from bitsmith.nn.linear import Int8DynamicLinear, IntxWeightOnlyLinear


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def candidates(linear: torch.nn.Linear) -> dict:
    w8 = quantize_weight_rtn(linear.weight, 8, "channel", True)
    w4 = IntxWeightOnlyLinear.from_quantized(quantize_weight_rtn(linear.weight, 4, 128, False), None)
    w4._runtime_int4pack()
    packed4, scales_and_zeros = w4._int4pack
    w8_codes, w8_scale = w8.codes, w8.scale[:, 0]
    weight_bf16 = linear.weight.detach().bfloat16()
    w8a8 = Int8DynamicLinear.from_quantized(w8, None)
    fbgemm = torch.ao.quantization.quantize_dynamic(
        torch.nn.Sequential(torch.nn.Linear(linear.in_features, linear.out_features, bias=False)),
        {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
    )
    return {
        "fp32": lambda x: torch.nn.functional.linear(x, linear.weight),
        "bf16": lambda x: torch.nn.functional.linear(x.bfloat16(), weight_bf16),
        "int8pack(bf16 x)": lambda x: torch._weight_int8pack_mm(x.bfloat16(), w8_codes, w8_scale.bfloat16()),
        "int8pack(fp32 x)": lambda x: torch._weight_int8pack_mm(x, w8_codes, w8_scale),
        "int8->bf16 dequant+mm": lambda x: torch.nn.functional.linear(
            x.bfloat16(), w8_codes.bfloat16() * w8_scale.bfloat16()[:, None]
        ),
        "int4pack(bf16 x)": lambda x: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), packed4, 128, scales_and_zeros),
        "bitsmith w8a8 (oneDNN, per-token)": w8a8,
        "torch dynamic int8 (fbgemm, per-tensor act)": fbgemm,
    }


def main() -> None:
    parser = bench_parser(__doc__, json_option=False)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 128, 512, 4096])
    parser.add_argument("--shapes", nargs="+", default=["384x1536", "1536x384", "4096x4096"])
    args = parse(parser)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads; weight-only switch at M > {WEIGHT_ONLY_MAX_M}")
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        kernels = candidates(torch.nn.Linear(k, n, bias=False))
        print(f"\nK={k} N={n}: median ms per call\n")
        print("| kernel | " + " | ".join(f"M={m}" for m in args.rows) + " |")
        print("|---|" + "---|" * len(args.rows))
        for name, fn in kernels.items():
            cells = []
            for m in args.rows:
                if name == "int8pack(fp32 x)" and m * k * n > 64 * 4096 * 4096 // 8:
                    cells.append("(skipped: scalar path)")
                    continue
                x = torch.randn(m, k)
                with torch.inference_mode():
                    cells.append(f"{median_ms(lambda: fn(x), args.repeats):.3f}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
