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
from common.rpc.allocator import reuse_freed_memory


class OrderedPrompts(argparse.Action):
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
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run every step through the model's modules (no captured decode step on CPU)",
    )


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
        enforce_eager=args.enforce_eager,
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


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Prompts and sampling flags, shared by `latentmoe generate` and the Ray job entry."""
    p.add_argument("--prompt", action=OrderedPrompts, help="a text prompt (repeatable)")
    p.add_argument(
        "--prompt-ids", action=OrderedPrompts, help="comma-separated prompt token ids (repeatable)"
    )
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from common.engine.sampling_params import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
    )


def completion_record(index: int, out) -> dict:  # type: ignore[no-untyped-def]
    """The JSON line `generate --json` prints per prompt (a contract other tools parse)."""
    completion = out.outputs[0]
    return {
        "index": index,
        "prompt_token_ids": out.prompt_token_ids,
        "token_ids": completion.token_ids,
        "text": completion.text,
        "finish_reason": completion.finish_reason,
    }


def cmd_generate(args: argparse.Namespace) -> int:
    from common.engine.engine import LLMEngine

    prompts = getattr(args, "prompts", None)
    if not prompts:
        raise SystemExit("error: give at least one --prompt or --prompt-ids")
    engine = LLMEngine.from_checkpoint(args.model, engine_config(args))
    for i, out in enumerate(engine.generate(prompts, sampling_params(args))):
        if args.json:
            print(json.dumps(completion_record(i, out), ensure_ascii=False), flush=True)
        else:
            print(out.outputs[0].text, flush=True)
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
    add_generation_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line, in prompt order")
    p.set_defaults(func=cmd_generate)

    from services.bench import add_parser as add_bench_parser
    from services.client import add_parser as add_client_parser
    from services.health import add_parser as add_health_parser
    from services.router.main import add_parser as add_serve_parser
    from services.up import add_parser as add_up_parser

    add_serve_parser(sub)
    add_up_parser(sub)
    add_client_parser(sub)
    add_bench_parser(sub)
    add_health_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    reuse_freed_memory()  # before any thread starts
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("common", "services"):  # our own log lines at --log-level; libraries stay at WARNING
        logging.getLogger(name).setLevel(args.log_level.upper())
    from common.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
