"""`latentmoe bench throughput`: offline throughput of the in-process engine, flags as in vLLM's benchmark.

    latentmoe bench throughput --model checkpoints/mini --input-len 64 --output-len 64 --num-prompts 64 \
        --dtype bfloat16 --output-json results.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def random_prompts(num: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random token ids (never the special ids 0 and 1), the same for every run with the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab_size, (num, input_len), generator=gen).tolist()


def throughput(engine, prompts: list[list[int]], output_len: int) -> dict:  # type: ignore[no-untyped-def]
    """Submit every prompt at once and run to completion; vLLM's offline throughput measure."""
    from common.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=output_len, ignore_eos=True)
    engine.generate([prompts[0]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "elapsed_time": elapsed,
        "num_requests": len(prompts),
        "total_num_tokens": prompt_tokens + output_tokens,
        "num_output_tokens": output_tokens,
        "requests_per_second": len(prompts) / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
    }


def cmd_throughput(args: argparse.Namespace) -> int:
    from common.engine.engine import LLMEngine
    from services.cli import engine_config

    engine = LLMEngine.from_checkpoint(args.model, engine_config(args))
    prompts = random_prompts(args.num_prompts, args.input_len, engine.model_config.vocab_size, args.seed)
    result = throughput(engine, prompts, args.output_len)
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s, "
        f"{result['output_tokens_per_second']:.2f} output tokens/s"
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({**result, "input_len": args.input_len, "output_len": args.output_len}, f, indent=2)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from services.cli import add_engine_args

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("throughput", help="offline throughput (prompts submitted at once)")
    add_engine_args(p)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_throughput)
