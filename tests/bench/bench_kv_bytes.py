"""Bytes of KV cache per token: MLA's latent cache against the MHA cache of the same heads, and what the
paged pool really allocates, for the published DeepSeek-V2-Lite, V2 and V3 configs.

    python tests/bench/bench_kv_bytes.py [--dtype bfloat16] [--output-json FILE]

MLA caches (kv_lora_rank + qk_rope_head_dim) elements per token and layer; MHA with the same heads would
cache K (qk_nope + qk_rope per head) and V (v_head_dim per head) for every head.
"""

from __future__ import annotations

import argparse
import json

import torch

from common.config import ModelConfig
from common.kvcache import BlockPool
from tests.published_configs import PUBLISHED


def measure(name: str, raw: dict, dtype: torch.dtype, block_size: int = 64, num_blocks: int = 4) -> dict:
    cfg = ModelConfig.from_dict(raw)
    elem = torch.empty(0, dtype=dtype).element_size()
    formula = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * elem
    mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * elem
    pool = BlockPool(cfg.num_hidden_layers, num_blocks, block_size, cfg.latent_dim, dtype=dtype)
    allocated = pool.nbytes / pool.capacity_tokens
    return {
        "model": name,
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "latent_dim": cfg.latent_dim,
        "mla_bytes_per_token": formula,
        "mha_bytes_per_token": mha,
        "pool_bytes_per_token": allocated,
        "mha_over_mla": mha / formula,
        "pool_matches_formula": allocated == formula,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = [measure(name, raw, dtype) for name, raw in PUBLISHED.items()]
    print(f"KV cache bytes per token ({args.dtype})")
    print(
        f"{'model':>17} | {'layers':>6} | {'(d_c+d_R)':>9} | {'MLA latent':>10} | {'pool alloc':>10} | "
        f"{'MHA same heads':>14} | {'MHA/MLA':>7}"
    )
    for r in rows:
        print(
            f"{r['model']:>17} | {r['layers']:>6} | {r['latent_dim']:>9} | "
            f"{r['mla_bytes_per_token']:>10,} | {r['pool_bytes_per_token']:>10,.0f} | "
            f"{r['mha_bytes_per_token']:>14,} | {r['mha_over_mla']:>6.1f}x"
        )
    ok = all(r["pool_matches_formula"] for r in rows)
    print(
        "check: pool bytes/token == (d_c + d_R) x layers x bytes/element for every model: "
        + ("PASS" if ok else "FAIL")
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=2)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
