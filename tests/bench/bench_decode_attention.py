"""Decode attention throughput: the paged decode in torch and in C++ against the straightforward one.

The naive side gathers each sequence's latents into a contiguous [context, D] tensor with a Python loop and
runs a full softmax over them; the torch paged side (common/kernels/flash_attention.py) is one vectorised
call for the whole batch; the C++ side (common/kernels/cpu_attention.py, where it builds) one kernel call.
Shapes are DeepSeek-V2-like: H=16 heads, latent entries of d_c=512 + d_R=64, block size 64, shuffled
physical blocks.

    python tests/bench/bench_decode_attention.py [--dtype bfloat16] [--output-json FILE] [--quick]
                                                 [--threads N]

Times are the best of a few runs (the machine may be shared); not a timed test.
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable as a script from any directory

from common.kernels import cpu_attention, cpu_extension, flash_attention  # noqa: E402
from tests.bench.timing import best_time  # noqa: E402

HEADS, KV_RANK, ROPE_DIM, BLOCK_SIZE = 16, 512, 64, 64
DIM = KV_RANK + ROPE_DIM
SCALE = (128 + ROPE_DIM) ** -0.5  # DeepSeek-V2 scales by the per-head qk dim (d_nope + d_R)


def naive_decode(q: Tensor, pages: Tensor, block_tables: Tensor, context_lens: Tensor) -> Tensor:
    """Per sequence: gather its blocks into one contiguous tensor, full softmax, weighted sum of c_kv."""
    out = q.new_empty(q.shape[0], HEADS, KV_RANK)
    for b, n in enumerate(context_lens.tolist()):
        blocks = block_tables[b, : -(-n // BLOCK_SIZE)]
        kv = pages[blocks].reshape(-1, DIM)[:n]
        p = torch.softmax((q[b] @ kv.T).float() * SCALE, dim=-1).to(q.dtype)
        out[b] = p @ kv[:, :KV_RANK]
    return out


def make_batch(batch: int, context: int, dtype: torch.dtype, seed: int) -> tuple[Tensor, ...]:
    """q [B, H, D] and a pool holding every sequence's latents in shuffled physical blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-context // BLOCK_SIZE)
    pages = torch.empty(batch * blocks, BLOCK_SIZE, DIM, dtype=dtype)
    for chunk in pages.split(1024):  # fill in pieces: no full-size float32 temporary for bfloat16 pools
        chunk.copy_(torch.randn(chunk.shape, generator=g))
    block_tables = torch.randperm(batch * blocks, generator=g).view(batch, blocks).to(torch.int32)
    context_lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, HEADS, DIM, generator=g).to(dtype)
    return q, pages, block_tables, context_lens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--output-json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="contexts 1k and 4k, batches 1 and 16 only")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    contexts = [1024, 4096] if args.quick else [1024, 4096, 16384]
    batches = [1, 16] if args.quick else [1, 16, 64]

    print(
        f"decode attention, {args.dtype}, H={HEADS}, d_c={KV_RANK}, d_R={ROPE_DIM}, block={BLOCK_SIZE}, "
        f"{torch.get_num_threads()} threads"
    )
    ways = {"paged": flash_attention.paged_latent_decode}
    if cpu_extension.available():
        ways["kernel"] = cpu_attention.paged_latent_decode
    header = f"{'context':>8} {'batch':>6} {'naive ms':>10}" + "".join(
        f" {name + ' ms':>10} {'speed-up':>9} {'max rel err':>12}" for name in ways
    )
    print(header)
    print("-" * len(header))
    rows = []
    for context in contexts:
        for batch in batches:
            q, pages, tables, lens = make_batch(batch, context, dtype, seed=context + batch)
            naive_s = best_time(partial(naive_decode, q, pages, tables, lens))
            ref = naive_decode(q.float(), pages.float(), tables, lens)
            row = {"context": context, "batch": batch, "naive_ms": naive_s * 1e3}
            line = f"{context:>8} {batch:>6} {naive_s * 1e3:>10.2f}"
            for name, decode in ways.items():
                seconds = best_time(partial(decode, q, pages, tables, lens, SCALE, KV_RANK))
                out = decode(q, pages, tables, lens, SCALE, KV_RANK).float()
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                row |= {
                    f"{name}_ms": seconds * 1e3,
                    f"{name}_speedup": naive_s / seconds,
                    f"{name}_tokens_per_s": batch / seconds,
                    f"{name}_max_rel_err": err,
                }
                line += f" {seconds * 1e3:>10.2f} {naive_s / seconds:>8.2f}x {err:>12.1e}"
            rows.append(row)
            print(line, flush=True)
            del q, pages, tables, lens, ref

    if args.output_json:
        args.output_json.write_text(
            json.dumps(
                {
                    "benchmark": "decode_attention",
                    "dtype": args.dtype,
                    "heads": HEADS,
                    "kv_lora_rank": KV_RANK,
                    "qk_rope_head_dim": ROPE_DIM,
                    "block_size": BLOCK_SIZE,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "ways": ["naive", *ways],
                    "tokens_per_s": "decode tokens per second of one attention layer",
                    "results": rows,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
