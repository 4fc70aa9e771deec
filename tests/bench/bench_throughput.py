"""Engine throughput against Hugging Face transformers' generate(), side by side in one process.

    python tests/bench/bench_throughput.py --model checkpoints/mini --dtype bfloat16 --output-json out.json

Sections (each prints a table; all figures go to the JSON):
  concurrency  decode-heavy runs, prompt 64 / output 64, at 1..64 concurrent sequences, plus a PNG plot;
  mixed        seeded requests with prompts 16-512 and outputs 16-256 submitted at once, against
               transformers in static batches of 16;
  prefix       requests sharing a 1024-token system prompt: time to first token with and without prefix
               caching;
  floor        decode step time against the memory-bandwidth floor (weight bytes a step touches / copy
               bandwidth).
Not a timed test: the machine is shared and noisy; ratios measured in the same run are what to read.

Both sides allocate with glibc's defaults, as transformers runs for its users and as the targets' anchors for
it were measured: under the settings latentmoe's services give malloc (--reuse-freed-memory, common/rpc/
allocator.py) transformers' generate() of 64 sequences runs 1.6-2x faster and the engine the same (README,
"transformers and malloc").
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import write_random_checkpoint
from common.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.rpc.allocator import reuse_freed_memory
from services.bench import random_prompts

OUT_DIR = Path("bench-results")


def ours_generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> tuple[float, int]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)


def hf_generate(model, prompts: list[list[int]], max_tokens: list[int], batch: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Static batches, left-padded; a batch runs until its longest request is done (asked tokens count)."""
    start, useful = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        chunk, budgets = prompts[i : i + batch], max_tokens[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        model.generate(ids, attention_mask=mask, max_new_tokens=max(budgets), do_sample=False, pad_token_id=0)
        useful += sum(budgets)
    return time.perf_counter() - start, useful


def section_concurrency(engine, hf, vocab: int, levels: list[int], results: dict) -> None:  # type: ignore[no-untyped-def]
    print("\n== decode-heavy: prompt 64, output 64 (output tokens/s) ==")
    print(f"{'concurrent':>10} | {'latentmoe':>10} | {'transformers':>12} | {'ratio':>6}")
    rows = []
    for n in levels:
        prompts = random_prompts(n, 64, vocab, seed=n)
        t_ours, tok_ours = ours_generate(engine, prompts, [64] * n)
        t_hf, tok_hf = hf_generate(hf, prompts, [64] * n, batch=n)
        row = {"concurrency": n, "latentmoe_tok_s": tok_ours / t_ours, "transformers_tok_s": tok_hf / t_hf}
        row["ratio"] = row["latentmoe_tok_s"] / row["transformers_tok_s"]
        rows.append(row)
        print(
            f"{n:>10} | {row['latentmoe_tok_s']:>10.1f} | {row['transformers_tok_s']:>12.1f} | "
            f"{row['ratio']:>5.2f}x"
        )
    results["concurrency"] = rows
    plot_concurrency(rows, results["dtype"], OUT_DIR / f"throughput-{results['dtype']}.png")


def plot_concurrency(rows: list[dict], dtype: str, path: Path) -> None:
    """Output tokens/s against concurrent sequences, ours and transformers'."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["concurrency"] for r in rows]
    ax.plot(x, [r["latentmoe_tok_s"] for r in rows], "o-", label="latentmoe")
    ax.plot(x, [r["transformers_tok_s"] for r in rows], "s--", label="transformers generate()")
    ax.set(
        xscale="log",
        xlabel="concurrent sequences",
        ylabel="output tokens/s",
        title=f"mini, {dtype}, prompt 64 / output 64",
    )
    ax.set_xticks(x, [str(v) for v in x])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def section_mixed(engine, hf, vocab: int, num: int, results: dict) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    lens = [(rng.randint(16, 512), rng.randint(16, 256)) for _ in range(num)]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, vocab, (p,), generator=gen).tolist() for p, _ in lens]
    budgets = [o for _, o in lens]
    t_ours, tok_ours = ours_generate(engine, prompts, budgets)
    t_hf, tok_hf = hf_generate(hf, prompts, budgets, batch=16)
    row = {
        "requests": num,
        "latentmoe_tok_s": tok_ours / t_ours,
        "transformers_tok_s": tok_hf / t_hf,
        "latentmoe_s": t_ours,
        "transformers_s": t_hf,
    }
    row["ratio"] = row["latentmoe_tok_s"] / row["transformers_tok_s"]
    results["mixed"] = row
    print(f"\n== mixed: {num} requests, prompts 16-512, outputs 16-256, submitted at once ==")
    print(
        f"latentmoe {row['latentmoe_tok_s']:.1f} tok/s ({t_ours:.1f} s) | transformers static batches of 16 "
        f"{row['transformers_tok_s']:.1f} tok/s ({t_hf:.1f} s) | ratio {row['ratio']:.2f}x"
    )


def section_prefix(model_dir: str, config: EngineConfig, vocab: int, num: int, results: dict) -> None:
    gen = torch.Generator().manual_seed(1)
    system = torch.randint(2, vocab, (1024,), generator=gen).tolist()
    prompts = [system + torch.randint(2, vocab, (16,), generator=gen).tolist() for _ in range(num)]
    row = {"requests": num}
    for caching in (True, False):
        engine = LLMEngine.from_checkpoint(
            model_dir, EngineConfig(**{**vars(config), "enable_prefix_caching": caching})
        )
        ttfts = []
        start = time.perf_counter()
        ids = [
            engine.add_request(p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            for p in prompts
        ]
        pending = set(ids)
        while pending:
            for out in engine.step():
                if out.request_id in pending and out.outputs[0].token_ids:
                    ttfts.append(time.perf_counter() - start)
                    pending.discard(out.request_id)
        key = "with_cache" if caching else "without_cache"
        row[f"{key}_mean_ttft_s"] = statistics.mean(ttfts)
        row[f"{key}_p50_ttft_s"] = statistics.median(ttfts)
        if caching:
            row["prefix_hit_rate"] = engine.blocks.prefix_hits / max(1, engine.blocks.prefix_queries)
    row["ttft_ratio"] = row["without_cache_mean_ttft_s"] / row["with_cache_mean_ttft_s"]
    results["prefix"] = row
    print(f"\n== prefix caching: {num} requests sharing a 1024-token system prompt (+16 own tokens) ==")
    print(
        f"mean TTFT with cache {row['with_cache_mean_ttft_s'] * 1e3:.0f} ms, "
        f"without {row['without_cache_mean_ttft_s'] * 1e3:.0f} ms "
        f"-> {row['ttft_ratio']:.1f}x lower (token hit rate {row['prefix_hit_rate']:.0%})"
    )


def copy_bandwidth() -> float:
    """Bandwidth of a large tensor copy, counted like STREAM's Copy: bytes read + bytes written, best of 5."""
    src = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() / best


def section_floor(engine: LLMEngine, vocab: int, levels: list[int], results: dict) -> None:
    """Per decode step: the bytes of every weight the step reads (all dense weights, shared experts and the
    routed experts actually chosen, as the gates counted them) over the measured copy bandwidth, against the
    measured step time; beside it the step through the modules (--enforce-eager), where a captured decode
    step replays their kernel calls (common/engine/decode_graph.py)."""
    from common.model.moe import MoE

    model = engine.runner.model
    experts = [layer.mlp.experts for layer in model.layers if isinstance(layer.mlp, MoE)]
    per_expert = [e.w13[0].nbytes + e.w2[0].nbytes for e in experts]  # a row of the step's expert load each
    shared = sum(e.num_shared * size for e, size in zip(experts, per_expert))  # packed with the routed ones
    routed = sum(p.nbytes for n, p in model.named_parameters() if ".experts." in n)
    dense = sum(p.nbytes for p in model.parameters()) - routed - model.embed_tokens.weight.nbytes + shared

    def decode_steps(n: int) -> tuple[float, float]:
        """Median step time and mean weight bytes touched over the decode steps of n sequences."""
        for p in random_prompts(n, 64, vocab, seed=100 + n):
            engine.add_request(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        while any(s.is_prefilling for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        times, touched = [], []
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
            load = engine.expert_load.window[-1]  # the step's choices, [MoE layer, expert]
            chosen = sum(int(np.count_nonzero(row)) * size for row, size in zip(load, per_expert))
            touched.append(dense + chosen)
        return statistics.median(times), statistics.mean(touched)

    bandwidth = copy_bandwidth()
    graph, rows = engine.runner.decode_graph, []
    print(f"\n== decode step vs memory-bandwidth floor (copy bandwidth {bandwidth / 1e9:.1f} GB/s) ==")
    print(
        f"{'batch':>6} | {'step ms':>8} | {'eager ms':>8} | {'bytes MB':>8} | {'floor ms':>8} | "
        f"{'step/floor':>10}"
    )
    for n in levels:
        step, nbytes = decode_steps(n)
        engine.runner.decode_graph = None
        try:
            eager, _ = decode_steps(n)
        finally:
            engine.runner.decode_graph = graph
        row = {"batch": n, "step_ms": step * 1e3, "eager_step_ms": eager * 1e3, "bytes": nbytes}
        row["floor_ms"] = nbytes / bandwidth * 1e3
        row["step_over_floor"] = row["step_ms"] / row["floor_ms"]
        rows.append(row)
        print(
            f"{n:>6} | {row['step_ms']:>8.2f} | {row['eager_step_ms']:>8.2f} | {nbytes / 1e6:>8.1f} | "
            f"{row['floor_ms']:>8.2f} | {row['step_over_floor']:>9.2f}x"
        )
    results["floor"] = {"copy_bandwidth_bytes_s": bandwidth, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: a random mini checkpoint)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--concurrency", default="1,4,16,32,64")
    parser.add_argument("--mixed-requests", type=int, default=200)
    parser.add_argument("--prefix-requests", type=int, default=64)
    parser.add_argument("--sections", default="concurrency,mixed,prefix,floor")
    parser.add_argument("--output-json", default=None)
    parser.add_argument(
        "--reuse-freed-memory",
        action="store_true",
        help="both sides allocate as latentmoe's services do (common/rpc/allocator.py), not as glibc does",
    )
    args = parser.parse_args()
    if args.reuse_freed_memory:
        reuse_freed_memory()  # before any thread starts

    from transformers import AutoModelForCausalLM

    OUT_DIR.mkdir(exist_ok=True)
    model_dir = args.model or str(OUT_DIR / "mini")
    if not (Path(model_dir) / "config.json").exists():
        write_random_checkpoint(model_dir, "mini")
    dtype = getattr(torch, args.dtype)
    config = EngineConfig(
        dtype=args.dtype, device="cpu", max_num_batched_tokens=2048, kv_cache_memory=2 << 30
    )
    engine = LLMEngine.from_checkpoint(model_dir, config)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    vocab = engine.model_config.vocab_size
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict = {
        "model": model_dir,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "reuse_freed_memory": args.reuse_freed_memory,
    }
    sections = args.sections.split(",")
    ours_generate(engine, random_prompts(2, 16, vocab), [4, 4])  # warm-up
    if "concurrency" in sections:
        section_concurrency(engine, hf, vocab, levels, results)
    if "mixed" in sections:
        section_mixed(engine, hf, vocab, args.mixed_requests, results)
    if "prefix" in sections:
        section_prefix(model_dir, config, vocab, args.prefix_requests, results)
    if "floor" in sections:
        section_floor(engine, vocab, [1, 16, 64], results)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.output_json}")


if __name__ == "__main__":
    main()
