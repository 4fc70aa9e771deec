"""MLA attention in one C++ call per layer, for CPU tensors: the prefill over packed sequences
(csrc/varlen_attention.cpp) and the absorbed decode over the paged latents (csrc/paged_decode.cpp).

The torch versions (common/kernels/flash_attention.py) run a dozen operators per sequence and tile (the
prefill) or about forty per layer (the decode), whose dispatch costs more than their arithmetic at a prefill
chunk of short prompts or at decode's sizes. These kernels run the same online softmax in float32, their
products in register tiles: the prefill of 32 prompts of 64 tokens (mini's shapes, bfloat16) takes 3.3
against 13.1 ms, 2 x 1,024 tokens 24 against 60 ms. On a CPU with AMX, bfloat16 in whole tiles runs both
products of either on the tiles, with the queries in the vectors' lanes: that prefill (8 heads of 96 / 64
wide) 0.63 against the torch path's 8.9 ms, 1 x 2,048 tokens 5.7 against 36 ms (tests/bench/
bench_prefill_attention.py). The decode reads each latent row once for every head and finds its pages from
the block tables itself, so it needs no DecodePlan.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.kernels import cpu_extension


def paged_latent_decode(
    q: Tensor,
    pages: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    value_dim: int,
    num_splits: int | None = None,
) -> Tensor:
    """Same contract as common.kernels.paged_latent_decode; num_splits (None: the kernel's own split of
    long contexts) fixes how many pieces the longest context is cut into."""
    tables, lens = (t if t.dtype == torch.int32 else t.int() for t in (block_tables, context_lens))
    return cpu_extension.module().paged_latent_decode(
        q.contiguous(), pages, tables.contiguous(), lens.contiguous(), scale, value_dim, num_splits or 0
    )


def flash_attn_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool = True,
) -> Tensor:
    """Same contract as common.kernels.flash_attn_varlen (max_seqlen_* are not needed)."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cu_q, cu_k = (t.to(torch.int32).contiguous() for t in (cu_seqlens_q, cu_seqlens_k))
    return cpu_extension.module().flash_attn_varlen(q, k, v, cu_q, cu_k, scale, causal)
