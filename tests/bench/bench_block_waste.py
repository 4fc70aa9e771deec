"""How much paged KV memory is allocated but holds no token, per block size.

Paging wastes only the unfilled tail of each sequence's last block, so the waste should be about
(block_size / 2) / mean sequence length: small at 16, large at 256. The same seeded workload of mixed-length
requests runs against a BlockManager for each block size: FCFS admission while the pool can hold a request
to completion (no preemption), prefill on admission, decode one token per step, free on finish. Every step
samples the fraction of allocated slots holding no token. "Steady state" is the steps during which requests
are waiting, i.e. the pool is the bottleneck; the 4% check at block size 16 applies to every steady-state
step (while the last few requests drain, one short request's partial block is a large fraction of a nearly
empty pool, which costs no capacity). Not a timed benchmark.

    python tests/bench/bench_block_waste.py [--output-json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from common.kvcache.block_manager import BlockManager  # noqa: E402

BLOCK_SIZES = (1, 16, 64, 256)
CHECK_BLOCK_SIZE, CHECK_MAX_WASTE_PCT = 16, 4.0
COLUMNS = (  # (title, Result field, format)
    ("block size", "block_size", "d"),
    ("steps", "steps", "d"),
    ("mean waste %", "mean_waste_pct", ".2f"),
    ("max waste %", "max_waste_pct", ".2f"),
    ("steady mean %", "steady_mean_waste_pct", ".2f"),
    ("steady max %", "steady_max_waste_pct", ".2f"),
    ("steady batch", "steady_mean_running", ".1f"),
)


@dataclass
class Request:
    prompt: list[int]
    output_len: int


@dataclass
class Result:
    block_size: int
    steps: int
    mean_waste_pct: float
    max_waste_pct: float
    steady_mean_waste_pct: float
    steady_max_waste_pct: float
    steady_mean_running: float


def make_workload(num_seqs: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [
        Request([rng.randrange(1 << 31) for _ in range(rng.randint(16, 512))], rng.randint(16, 256))
        for _ in range(num_seqs)
    ]


def simulate(workload: list[Request], block_size: int, capacity_tokens: int) -> Result:
    mgr = BlockManager(capacity_tokens // block_size, block_size, enable_prefix_caching=False)

    def blocks(num_tokens: int) -> int:
        return -(-num_tokens // block_size)

    waiting = deque(enumerate(workload))
    running: dict[int, Request] = {}
    generated: dict[int, int] = {}
    reserved = 0  # blocks running requests will still grow into
    waste, steady, steady_running = [], [], []
    while waiting or running:
        while waiting:  # FCFS admission: only if the request fits to completion
            sid, req = waiting[0]
            if blocks(len(req.prompt) + req.output_len) > mgr.num_free_blocks() - reserved:
                break
            waiting.popleft()
            mgr.allocate(sid, req.prompt)
            mgr.mark_computed(sid, len(req.prompt))  # prefill
            running[sid], generated[sid] = req, 0
            reserved += blocks(len(req.prompt) + req.output_len) - blocks(len(req.prompt))
        for sid in running:  # decode: one new token each
            before = len(mgr.block_table(sid))
            mgr.append_slots(sid, [generated[sid]])
            reserved -= len(mgr.block_table(sid)) - before
            generated[sid] += 1
            mgr.mark_computed(sid, mgr.num_tokens(sid))
        slots = mgr.num_used_blocks * block_size
        sample = 100.0 * (1.0 - sum(mgr.num_tokens(sid) for sid in running) / slots)
        waste.append(sample)
        if waiting:
            steady.append(sample)
            steady_running.append(len(running))
        for sid in [sid for sid, req in running.items() if generated[sid] == req.output_len]:
            mgr.free(sid)
            del running[sid], generated[sid]
    assert mgr.num_used_blocks == 0 and reserved == 0
    return Result(
        block_size=block_size,
        steps=len(waste),
        mean_waste_pct=sum(waste) / len(waste),
        max_waste_pct=max(waste),
        steady_mean_waste_pct=sum(steady) / len(steady) if steady else float("nan"),
        steady_max_waste_pct=max(steady) if steady else float("nan"),
        steady_mean_running=sum(steady_running) / len(steady_running) if steady_running else float("nan"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-seqs", type=int, default=400)
    parser.add_argument("--capacity-tokens", type=int, default=32768, help="KV pool size in token slots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    workload = make_workload(args.num_seqs, args.seed)
    results = [simulate(workload, bs, args.capacity_tokens) for bs in BLOCK_SIZES]

    print(f"{args.num_seqs} requests (prompt 16-512, output 16-256 tokens), {args.capacity_tokens} KV slots")
    print(" | ".join(title for title, _, _ in COLUMNS))
    for r in results:
        print(" | ".join(f"{getattr(r, field):>{len(title)}{fmt}}" for title, field, fmt in COLUMNS))
    checked = next(r for r in results if r.block_size == CHECK_BLOCK_SIZE)
    passed = checked.steady_max_waste_pct < CHECK_MAX_WASTE_PCT
    print(
        f"check: block size {CHECK_BLOCK_SIZE}, waste < {CHECK_MAX_WASTE_PCT}% at every steady-state step: "
        f"{'PASS' if passed else 'FAIL'} (steady max {checked.steady_max_waste_pct:.2f}%, "
        f"whole-run max {checked.max_waste_pct:.2f}%)"
    )
    if args.output_json:
        report = {
            "benchmark": "block_waste",
            "config": {k: v for k, v in vars(args).items() if k != "output_json"},
            "results": [asdict(r) for r in results],
            "check": {
                "block_size": CHECK_BLOCK_SIZE,
                "steady_max_waste_pct_limit": CHECK_MAX_WASTE_PCT,
                "steady_max_waste_pct": checked.steady_max_waste_pct,
                "passed": passed,
            },
        }
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
