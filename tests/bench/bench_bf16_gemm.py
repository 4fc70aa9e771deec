"""The bfloat16 GEMM kernel (common/kernels/bf16_gemm.py) against torch's bfloat16 matmul and against the
upcast-to-float32 product, for the mini model's matmul shapes at decode row counts (float32 weights for
reference: what a float32 model reads, twice the bytes). The kernel runs on [in, out] weights and on the
order Linear.pack keeps them in ("packed": strip order, or tile order for AMX's tiles).

    python -m tests.bench.bench_bf16_gemm [--rows 1,2,4,8,16,32,64,128,256] [--output-json FILE]

Each shape is timed over 8 copies of its weight, as in bench_weight_layout; the best of at least 5 runs, in
microseconds per matmul. The kernel's MAX_ROWS is where its column stops winning.
"""

from __future__ import annotations

import argparse

import torch

from common.kernels import bf16_gemm
from tests.bench.bench_weight_layout import COPIES, SHAPES
from tests.bench.results import write_results
from tests.bench.timing import best_time

WAYS = ("kernel", "packed", "torch bf16", "upcast", "fp32 weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if not bf16_gemm.available():
        raise SystemExit("the bfloat16 GEMM kernel does not run here (see common/kernels/bf16_gemm.py)")
    rows = [int(r) for r in args.rows.split(",")]
    threads = torch.get_num_threads()
    print(f"us per matmul, {threads} threads: {' / '.join(WAYS)}; kernel's MAX_ROWS = {bf16_gemm.MAX_ROWS}")
    print(f"{'weight [in, out]':>32} | " + " | ".join(f"{f'{m} rows':>30}" for m in rows))
    results = []
    for name, (out_dim, in_dim) in SHAPES.items():
        weights = [torch.randn(in_dim, out_dim).bfloat16() for _ in range(COPIES)]
        fp32 = [w.float() for w in weights]
        packed = [bf16_gemm.kernel_order(w[None]) for w in weights]
        cells = []
        for m in rows:
            x = torch.randn(m, in_dim).bfloat16()
            ways = {
                "kernel": lambda: [bf16_gemm.mm(x, w).bfloat16() for w in weights],  # noqa: B023
                "packed": lambda: [bf16_gemm.mm(x, w) for w in packed],  # noqa: B023
                "torch bf16": lambda: [x @ w for w in weights],  # noqa: B023
                "upcast": lambda: [(x.float() @ w.float()).bfloat16() for w in weights],  # noqa: B023
                "fp32 weights": lambda: [x.float() @ w for w in fp32],  # noqa: B023
            }
            us = {way: best_time(fn, min_runs=5) / COPIES * 1e6 for way, fn in ways.items()}
            results.append({"weight": name, "shape": [in_dim, out_dim], "rows": m, "us": us})
            cells.append(" / ".join(f"{us[w]:.0f}" for w in WAYS))
        print(f"{f'{name} [{in_dim}, {out_dim}]':>32} | " + " | ".join(f"{c:>30}" for c in cells))
    if args.output_json:
        write_results(args.output_json, args, {"threads": threads, "rows": results})


if __name__ == "__main__":
    main()
