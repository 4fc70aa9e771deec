"""Prefill attention throughput: the C++ kernel against the torch flash path it replaces, on mini's shapes.

Both run `flash_attn_varlen` over packed causal sequences: the torch side is common/kernels/flash_attention.py
(tiled, online softmax, float32 arithmetic), the C++ side common/kernels/cpu_attention.py (on a CPU with AMX,
bfloat16 runs on the tiles). Two forms of MLA's prefill, 8 heads as in mini:

* naive: per-head keys of d_nope + d_R = 96 and values of 64, the chunk's own prompts;
* absorbed: every head reads the same latent rows (d_c + d_R = 160, values the first 128), as a short chunk
  after a long cached prefix runs (64 requests of 16 new tokens after 1,024 cached ones).

    python tests/bench/bench_prefill_attention.py [--dtype float32] [--output-json FILE] [--threads N]

Times are the best of a few runs (the machine may be shared); not a timed test.
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable as a script from any directory

from common.kernels import cpu_attention, cpu_extension, flash_attention  # noqa: E402
from tests.bench.results import write_results  # noqa: E402
from tests.bench.timing import best_time  # noqa: E402

HEADS, NOPE, ROPE, V_DIM, KV_RANK = 8, 64, 32, 64, 128
SCALE = (NOPE + ROPE) ** -0.5
# (form, sequences, queries each, keys each)
CASES = [
    ("naive", 32, 64, 64),
    ("naive", 4, 512, 512),
    ("naive", 1, 2048, 2048),
    ("absorbed", 64, 16, 1040),
    ("absorbed", 4, 512, 512),
]


def make_case(form: str, seqs: int, q_len: int, k_len: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """q, k, v as MLA's forward hands them to flash_attn_varlen, and the cumulative lengths."""
    g = torch.Generator().manual_seed(seqs * q_len + k_len)
    if form == "naive":
        q = torch.randn(seqs * q_len, HEADS, NOPE + ROPE, generator=g).to(dtype)
        kv = torch.randn(seqs * k_len, HEADS, NOPE + V_DIM, generator=g).to(dtype)
        k_pe = torch.randn(seqs * k_len, ROPE, generator=g).to(dtype)
        k = torch.cat([kv[..., :NOPE], k_pe[:, None, :].expand(-1, HEADS, -1)], dim=-1)
        v = kv[..., NOPE:]
    else:
        q = torch.randn(seqs * q_len, HEADS, KV_RANK + ROPE, generator=g).to(dtype)
        latents = torch.randn(seqs * k_len, KV_RANK + ROPE, generator=g).to(dtype)
        k = latents[:, None, :].expand(-1, HEADS, -1)
        v = latents[:, None, :KV_RANK].expand(-1, HEADS, -1)
    cu_q = torch.arange(0, seqs * q_len + 1, q_len, dtype=torch.int32)
    cu_k = torch.arange(0, seqs * k_len + 1, k_len, dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--output-json", help="also write the results here")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if not cpu_extension.available():
        sys.exit("the C++ kernels do not build on this machine: nothing to compare")

    print(f"prefill attention, {args.dtype}, {HEADS} heads, causal, {torch.get_num_threads()} threads")
    header = (
        f"{'form':>8} {'seqs':>5} {'queries':>8} {'keys':>6} {'torch ms':>9} {'kernel ms':>10} "
        f"{'speed-up':>9} {'GFLOP/s':>8} {'max rel err':>12}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for form, seqs, q_len, k_len in CASES:
        q, k, v, cu_q, cu_k = make_case(form, seqs, q_len, k_len, dtype)
        inputs = (q, k, v, cu_q, cu_k, q_len, k_len, SCALE)
        torch_s = best_time(partial(flash_attention.flash_attn_varlen, *inputs))
        kernel_s = best_time(partial(cpu_attention.flash_attn_varlen, *inputs))
        ref = flash_attention.flash_attn_varlen(q.float(), k.float(), v.float(), *inputs[3:])
        out = cpu_attention.flash_attn_varlen(*inputs).float()
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        # the causal query-key pairs, each a product over q's width and one over v's
        pairs = seqs * HEADS * sum(min(k_len, k_len - q_len + i + 1) for i in range(q_len))
        gflops = 2 * pairs * (q.shape[-1] + v.shape[-1]) / kernel_s / 1e9
        rows.append(
            {
                "form": form,
                "sequences": seqs,
                "queries": q_len,
                "keys": k_len,
                "torch_ms": torch_s * 1e3,
                "kernel_ms": kernel_s * 1e3,
                "speedup": torch_s / kernel_s,
                "kernel_gflops": gflops,
                "max_rel_err": err,
            }
        )
        print(
            f"{form:>8} {seqs:>5} {q_len:>8} {k_len:>6} {torch_s * 1e3:>9.2f} {kernel_s * 1e3:>10.2f} "
            f"{torch_s / kernel_s:>8.2f}x {gflops:>8.0f} {err:>12.1e}",
            flush=True,
        )

    if args.output_json:
        write_results(
            args.output_json,
            args,
            {"heads": HEADS, "threads": torch.get_num_threads(), "torch": torch.__version__, "cases": rows},
        )


if __name__ == "__main__":
    main()
