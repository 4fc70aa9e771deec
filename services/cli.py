"""The `latentmoe` command: the single entry point for every job.

latentmoe init-checkpoint --preset mini --out checkpoints/mini
latentmoe generate --model checkpoints/mini --prompt "Hello" --max-tokens 32 --temperature 0 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from common.config import ConfigError


class _OrderedPrompts(argparse.Action):
    """Keeps --prompt and --prompt-ids in command-line order in one list."""

    def __call__(self, parser, namespace, value, option_string=None):  # type: ignore[no-untyped-def]
        prompts = getattr(namespace, "prompts", None) or []
        if option_string == "--prompt-ids":
            try:
                value = [int(t) for t in value.split(",") if t.strip()]
            except ValueError:
                parser.error(f"--prompt-ids takes comma-separated integers, got {value!r}")
        prompts.append(value)
        namespace.prompts = prompts


def add_engine_args(
    p: argparse.ArgumentParser, model_help: str = "checkpoint directory (Hub layout)"
) -> None:
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on GPUs and CPUs with bfloat16 units, float32 otherwise",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--block-size", type=int, default=64, help="tokens per KV page (power of two, 1..256)")
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        default=float(1 << 30),
        help="KV cache budget: bytes, or a fraction (<= 1) of free device memory",
    )
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")


def engine_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from common.config import EngineConfig

    return EngineConfig(
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
    )


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    import torch

    from common.checkpoint import write_random_checkpoint

    out = write_random_checkpoint(
        args.out,
        args.preset,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        max_shard_bytes=args.max_shard_bytes,
    )
    print(f"wrote a random '{args.preset}' checkpoint to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from common.engine.engine import LLMEngine
    from common.engine.sampling_params import SamplingParams

    prompts = getattr(args, "prompts", None)
    if not prompts:
        raise SystemExit("error: give at least one --prompt or --prompt-ids")
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
    )
    engine = LLMEngine.from_checkpoint(args.model, engine_config(args))
    for i, out in enumerate(engine.generate(prompts, params)):
        completion = out.outputs[0]
        if args.json:
            record = {
                "index": i,
                "prompt_token_ids": out.prompt_token_ids,
                "token_ids": completion.token_ids,
                "text": completion.text,
                "finish_reason": completion.finish_reason,
            }
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            print(completion.text, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentmoe", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="INFO", help="level of latentmoe's own log lines (stderr)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-checkpoint", help="write a random checkpoint in the Hub layout")
    p.add_argument("--preset", required=True, choices=["tiny", "mini"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--max-shard-bytes", type=int, default=None, help="shard the weights above this size")
    p.set_defaults(func=cmd_init_checkpoint)

    p = sub.add_parser("generate", help="generate from prompts with the in-process engine")
    add_engine_args(p)
    p.add_argument("--prompt", action=_OrderedPrompts, help="a text prompt (repeatable)")
    p.add_argument(
        "--prompt-ids", action=_OrderedPrompts, help="comma-separated prompt token ids (repeatable)"
    )
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line, in prompt order")
    p.set_defaults(func=cmd_generate)

    from services.bench import add_parser as add_bench_parser
    from services.client import add_parser as add_client_parser
    from services.health import add_parser as add_health_parser
    from services.router.main import add_parser as add_serve_parser

    add_serve_parser(sub)
    add_client_parser(sub)
    add_bench_parser(sub)
    add_health_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from common.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
