"""Distributed on loopback against in-process, side by side in one run, through the same Router gRPC API.

    python -m tests.bench.bench_distributed --model checkpoints/mini --output-json out.json

Runs `latentmoe serve` (every component in one process) and then `latentmoe up` (KV-cache service, attention
workers, router with expert actors on a local Ray, each a process; 1 attention worker and 2 expert actors
unless told otherwise) three ways: with one micro-batch, with the default (ping-pong only on steps large
enough for micro-batches of --micro-batch-min-tokens: prefill, on CPU cores), and with ping-pong on every
step. It sends the same concurrent requests to each, over --rounds interleaved rounds that keep each setup's
best, and prints output tokens per second (best, every round, and each round against the in-process run of
the same round), how many cores the setup's processes kept busy meanwhile (their CPU time over the wall
time, from /proc: the load's own client is not counted), and, for the distributed runs, how the remote
calls' time splits between the workers' compute and the transport (gRPC, serialisation, queueing). Not a
timed test: the machine is shared and noisy; read the ratios.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from latentmoe.v1 import router_pb2, router_pb2_grpc
from services.bench import random_prompts
from tests.bench.results import write_results
from tests.processes import cpu_seconds, process_tree, start_until_ready, stop

OUT_DIR = Path("bench-results")


def run_load(
    address: str, prompts: list[list[int]], output_len: int, root_pid: int
) -> tuple[float, int, float]:
    """All prompts at once, one stream each; returns (seconds, output tokens, CPU seconds of root_pid and of
    every process under it meanwhile)."""
    channel = grpc.insecure_channel(address)
    stub = router_pb2_grpc.RouterStub(channel)

    def one(prompt: list[int], max_tokens: int = output_len) -> int:
        params = router_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), params=params)
        return sum(len(c.delta_token_ids) for r in stub.Generate(request, timeout=900) for c in r.completions)

    one(prompts[0], 4)  # warm-up
    processes = process_tree(root_pid)
    cpu = cpu_seconds(*processes)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        tokens = sum(pool.map(one, prompts))
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(*processes) - cpu
    channel.close()
    return elapsed, tokens, cpu


def scrape(url: str) -> dict[str, float]:
    """Sum of each `latentmoe_*_worker_*` sample over its worker label, by metric name."""
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    sums: dict[str, float] = {}
    for name, value in re.findall(r"^(latentmoe_\w+_worker_\w+)\{[^}]*\} (\S+)$", text, re.M):
        sums[name] = sums.get(name, 0.0) + float(value)
    return sums


def split(before: dict[str, float], after: dict[str, float], component: str) -> dict[str, float]:
    """Per-call latency seen by the router vs compute reported by the workers, over the measured run."""

    def delta(name: str) -> float:
        key = f"latentmoe_{component}_worker_{name}"
        return after.get(key, 0.0) - before.get(key, 0.0)

    calls = delta("latency_seconds_count")
    latency, compute = delta("latency_seconds_sum"), delta("compute_seconds_total")
    per = 1e3 / calls if calls else 0.0
    return {
        "calls": calls,
        "latency_ms": latency * per,
        "compute_ms": compute * per,
        "transport_ms": (latency - compute) * per,
        "transport_share": (latency - compute) / latency if latency else 0.0,
    }


def measure(argv: list[str], prompts: list[list[int]], output_len: int) -> dict:
    proc, ready = start_until_ready(argv, timeout=600)
    try:
        before = scrape(ready.group(2))
        elapsed, tokens, cpu = run_load(ready.group(1), prompts, output_len, proc.pid)
        after = scrape(ready.group(2))
    finally:
        stop(proc)
    return {
        "elapsed_s": elapsed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed,
        "cores_busy": cpu / elapsed,
        "split": {c: split(before, after, c) for c in ("attention", "expert")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/mini")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        help="the benchmark dtype, as in bench_throughput (float32 and auto also work)",
    )
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--expert-workers", type=int, default=2)
    p.add_argument(
        "--attention-workers",
        type=int,
        default=1,
        help="one suits a machine of few cores: a decode batch's attention is small, and a second worker "
        "adds a hop per layer and a process competing for the cores (the topology tests use two)",
    )
    p.add_argument("--rounds", type=int, default=2, help="runs of every setup; each keeps its best")
    p.add_argument("--output-json", default=str(OUT_DIR / "distributed.json"))
    args = p.parse_args()
    if not Path(args.model, "config.json").exists():
        from common.checkpoint import write_random_checkpoint

        write_random_checkpoint(args.model, "mini")
    vocab = json.loads(Path(args.model, "config.json").read_text())["vocab_size"]
    prompts = random_prompts(args.concurrency, args.input_len, vocab)

    cli = [sys.executable, "-m", "services.cli"]
    flags = ["--model", args.model, "--dtype", args.dtype, "--port", "0", "--metrics-port", "0"]
    setups = {"in-process (latentmoe serve)": [*cli, "serve", *flags]}
    up = [
        *cli, "up", *flags, "--kv-cache-port", "0", "--attention-port", "0",
        "--expert-workers", str(args.expert_workers), "--attention-workers", str(args.attention_workers),
    ]  # fmt: skip
    setups["distributed, 1 micro-batch"] = [*up, "--micro-batches", "1"]
    setups["distributed, ping-pong on large steps (default)"] = up
    setups["distributed, ping-pong on every step"] = [*up, "--micro-batch-min-tokens", "0"]
    # Rounds interleave the setups, so a slow spell of the shared machine hits all of them; each keeps its
    # best round (noise only ever slows a run down).
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    for round_ in range(1, args.rounds + 1):
        for name, argv in setups.items():
            print(f"round {round_}/{args.rounds}: {name} ...", flush=True)
            runs[name].append(measure(argv, prompts, args.output_len))
    base_rounds = [r["output_tokens_per_s"] for r in next(iter(runs.values()))]
    results = {}
    for name, measured in runs.items():
        best = max(measured, key=lambda r: r["output_tokens_per_s"])
        rounds = [r["output_tokens_per_s"] for r in measured]
        # Each round against the in-process run of the same round, the nearest in time.
        paired = [t / b for t, b in zip(rounds, base_rounds, strict=True)]
        results[name] = {**best, "rounds_tokens_per_s": rounds, "rounds_vs_in_process": paired}

    base = next(iter(results.values()))["output_tokens_per_s"]
    print(
        f"\n{args.concurrency} concurrent requests, prompt {args.input_len} / output {args.output_len} "
        f"tokens; {args.expert_workers} expert actors + {args.attention_workers} attention workers\n"
    )
    print(
        f"| {'setup':<48} | output tok/s | vs in-process | every round     | each round vs in-process "
        f"| cores busy |"
    )
    print(f"|{'-' * 50}|--------------|---------------|-----------------|{'-' * 26}|------------|")
    for name, r in results.items():
        tps = r["output_tokens_per_s"]
        every = " / ".join(f"{t:.0f}" for t in r["rounds_tokens_per_s"])
        paired = " / ".join(f"{x:.2f}" for x in r["rounds_vs_in_process"])
        print(
            f"| {name:<48} | {tps:12.1f} | {tps / base:12.2f}x | {every:<15} | {paired:<24} "
            f"| {r['cores_busy']:10.2f} |"
        )
    print("\nremote calls (distributed runs): router-side latency vs worker compute, per call\n")
    print(f"| {'setup':<48} | component | calls | latency ms | compute ms | transport ms | transport |")
    print(f"|{'-' * 50}|-----------|-------|------------|------------|--------------|-----------|")
    for name, r in list(results.items())[1:]:
        for component, s in r["split"].items():
            print(
                f"| {name:<48} | {component:<9} | {s['calls']:5.0f} | {s['latency_ms']:10.2f} | "
                f"{s['compute_ms']:10.2f} | {s['transport_ms']:12.2f} | {s['transport_share']:8.0%} |"
            )
    write_results(args.output_json, args, results)


if __name__ == "__main__":
    main()
