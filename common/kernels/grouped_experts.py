"""Grouped SwiGLU expert computation: (token, expert) pairs sorted by expert, one GEMM pair per active expert.

One argsort groups the pairs; the inputs are gathered once in expert order, each expert that received pairs
runs its two GEMMs on a contiguous slice, and one index_add scatters the weighted results back. Experts
nobody chose are never read, which is what makes fine-grained MoE decode cheap. (A padded all-experts
batched GEMM was measured as no faster on CPU, so the simpler schedule stays.)
"""

import torch
import torch.nn.functional as F


def grouped_swiglu(
    x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) over the experts of this shard.

    x [T, h]; expert_ids [T, k] local expert index or -1 (routed to another shard); weights [T, k] float32;
    w13 [E, h, 2I] (gate columns then up columns); w2 [E, I, h]: input-major, so each GEMM is a plain
    `rows @ weight` (see common/model/linear.py). Returns [T, h] in x.dtype, accumulated in float32.
    """
    num_experts, k = w13.shape[0], expert_ids.shape[1]
    flat = expert_ids.flatten()
    counts = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()  # bin 0: pairs of other shards
    order = torch.argsort(flat, stable=True)[counts[0] :]
    tokens = order // k
    xs = x[tokens]
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts[1:]):
        if n:
            gate, up = torch.mm(xs[start : start + n], w13[e]).chunk(2, dim=-1)
            torch.mm(F.silu(gate) * up, w2[e], out=ys[start : start + n])
            start += n
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, tokens, ys.float() * weights.flatten()[order, None]).to(x.dtype)
