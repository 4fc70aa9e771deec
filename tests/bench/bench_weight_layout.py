"""Matmul weight layout: `F.linear(x, W)` with the Hub's [out, in] weight against `x @ W_t` with the weight
kept input-major ([in, out], common/model/linear.py), for the mini model's matmul shapes at decode row counts.

    python -m tests.bench.bench_weight_layout [--dtype float32] [--rows 1,4,16,32,64] [--output-json FILE]

Each shape is timed over 8 copies of its weight (one per layer, as a step reads them), so that no copy stays
in a core's own cache between its uses; the best of at least 5 runs, in microseconds per matmul.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tests.bench.results import write_results
from tests.bench.timing import best_time

# (out, in) of the mini preset's matmuls
SHAPES = {
    "q_proj": (768, 512),
    "kv_a_proj_with_mqa": (160, 512),
    "o_proj": (512, 512),
    "shared gate+up": (1024, 512),
    "shared down": (512, 512),
    "routed expert gate+up": (512, 512),
    "routed expert down": (512, 256),
    "lm_head": (8192, 512),
}
COPIES = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", default="1,4,16,32,64")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = [int(r) for r in args.rows.split(",")]
    threads = torch.get_num_threads()
    print(f"us per matmul, {args.dtype}, {threads} threads: F.linear(x, W) / x @ W_t (speed-up)")
    print(f"{'weight [out, in]':>32} | " + " | ".join(f"{f'{m} rows':>22}" for m in rows))
    results = []
    for name, (out_dim, in_dim) in SHAPES.items():
        hub = [torch.randn(out_dim, in_dim, dtype=dtype) for _ in range(COPIES)]
        input_major = [w.t().contiguous() for w in hub]
        cells = []
        for m in rows:
            x = torch.randn(m, in_dim, dtype=dtype)
            linear = best_time(lambda: [F.linear(x, w) for w in hub], min_runs=5) / COPIES * 1e6  # noqa: B023
            plain = best_time(lambda: [x @ w for w in input_major], min_runs=5) / COPIES * 1e6  # noqa: B023
            results.append({"weight": name, "shape": [out_dim, in_dim], "rows": m, "linear_us": linear,
                            "input_major_us": plain})  # fmt: skip
            cells.append(f"{linear:7.1f} / {plain:6.1f} ({linear / plain:3.1f}x)")
        print(f"{f'{name} [{out_dim}, {in_dim}]':>32} | " + " | ".join(f"{c:>22}" for c in cells))
    if args.output_json:
        write_results(args.output_json, args, {"threads": threads, "rows": results})


if __name__ == "__main__":
    main()
