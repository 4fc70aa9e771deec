"""Grouped SwiGLU expert computation: (token, expert) pairs sorted by expert, one GEMM pair per active expert.

One argsort groups the pairs; the inputs are gathered once in expert order, each expert that received pairs
runs its gate/up GEMM on a contiguous slice, one SiLU-and-multiply covers every expert's rows at once (at
decode an expert gets a few rows, and per-expert elementwise ops cost more in dispatch than in arithmetic),
each runs its down GEMM, and one index_add scatters the weighted results back. Experts nobody chose are never
read, which is what makes fine-grained MoE decode cheap. (A padded all-experts batched GEMM was measured as
no faster on CPU, so the simpler schedule stays.)
"""

import itertools

import torch
import torch.nn.functional as F

from common.kernels import bf16_gemm
from common.model.linear import multiply_dtype


def grouped_swiglu(
    x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) over the experts of this shard.

    x [T, h]; expert_ids [T, k] local expert index or -1 (routed to another shard); weights [T, k] float32;
    w13 [E, h, 2I] (gate columns then up columns); w2 [E, I, h]: input-major, so each GEMM is a plain
    `rows @ weight` (see common/model/linear.py). Returns [T, h] in x.dtype, accumulated in float32; the
    GEMMs run in the bfloat16 kernel at a few rows per expert where it runs (common/kernels/bf16_gemm.py),
    otherwise in multiply_dtype (float32 for half types on CPUs without units for them).
    """
    num_experts, k, inter = w13.shape[0], expert_ids.shape[1], w2.shape[1]
    flat = expert_ids.flatten()
    counts = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()  # bin 0: pairs of other shards
    order = torch.argsort(flat, stable=True)[counts[0] :]
    tokens = order // k
    per_expert = counts[1:]
    spans = [  # (expert, its rows in expert order) for every expert that got pairs
        (e, slice(end - n, end))
        for e, (n, end) in enumerate(zip(per_expert, itertools.accumulate(per_expert)))
        if n
    ]
    rows_per_expert = len(tokens) / max(len(spans), 1)
    if bf16_gemm.suits(x, w13, rows_per_expert):
        dtype, product = torch.float32, bf16_gemm.mm
    else:
        dtype = multiply_dtype(x, rows_per_expert)

        def product(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            return torch.mm(a, w.to(dtype), out=out)

    xs = x[tokens].to(dtype)
    gate_up = xs.new_empty(xs.shape[0], 2 * inter)
    for e, rows in spans:
        product(xs[rows], w13[e], out=gate_up[rows])
    act = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])  # one activation over every expert's rows
    ys = torch.empty_like(xs)
    for e, rows in spans:
        product(act[rows], w2[e], out=ys[rows])
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, tokens, ys.float() * weights.flatten()[order, None]).to(x.dtype)
