"""Grouped SwiGLU expert computation: (token, expert) pairs sorted by expert, one GEMM pair per active expert.

One argsort groups the pairs; the inputs are gathered once in expert order, each expert that received pairs
runs its gate/up GEMM on a contiguous slice, one SiLU-and-multiply covers every expert's rows at once (at
decode an expert gets a few rows, and per-expert elementwise ops cost more in dispatch than in arithmetic),
each runs its down GEMM, and one index_add scatters the weighted results back. Experts nobody chose are never
read, which is what makes fine-grained MoE decode cheap. (A padded all-experts batched GEMM was measured as
no faster on CPU, so the simpler schedule stays.) Where the CPU kernels run (common/kernels/cpu_extension.py)
and each expert gets up to KERNEL_MAX_ROWS rows (decode, and prefill chunks of the default size), all of it
is one C++ call (csrc/grouped_experts.cpp), each GEMM round one grouped product over every expert's rows:
the bfloat16 kernel of common/kernels/bf16_gemm.py, or its float32-weight twin. Given the weights a second
time in strip order (`strip_order`), an expert with a few rows (decode) streams them in memory order instead
(csrc/gemm_strips.h): the same sums, 1.3-1.4x faster at mini's 64-sequence decode; the copy costs the routed
experts' memory once more, so it is the caller's choice (common/model/moe.py makes it where the kernel runs).
"""

import itertools
from collections.abc import Callable

import torch

from common.kernels import bf16_gemm, cpu_extension
from common.kernels.activation import silu_and_mul
from common.model.linear import multiply_dtype

# Rows per expert up to which the one C++ call beats one MKL GEMM pair per expert (mini's 32 experts, two
# threads, bfloat16 / float32 weights: 2.9x / 1.4x at 8 rows, 1.7x / 1.3x at 64, 1.3x / 1.35x at 256, even
# at 512).
KERNEL_MAX_ROWS = 256
STRIP = 32  # columns per strip: csrc/gemm_strips.h's STRIP_COLUMNS (the C++ call checks the layout)


def strip_order(w: torch.Tensor) -> torch.Tensor:
    """w [E, K, N] as [E, ceil(N / 32), K, 32]: strip s holds columns 32 s .. 32 s + 31 of every row, zeros
    past N, so a product over a strip reads it as one sequential stream."""
    experts, k, n = w.shape
    padded = torch.nn.functional.pad(w, (0, -n % STRIP))
    return padded.view(experts, k, -1, STRIP).transpose(1, 2).contiguous()


def grouped_swiglu(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    strips: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) over the experts of this shard.

    x [T, h]; expert_ids [T, k] local expert index or -1 (routed to another shard); weights [T, k] float32;
    w13 [E, h, 2I] (gate columns then up columns); w2 [E, I, h]: input-major, so each GEMM is a plain
    `rows @ weight` (see common/model/linear.py). Returns [T, h] in x.dtype, accumulated in float32. Each
    expert's GEMMs run in multiply_dtype (float32 for half types on CPUs without units for them), or all in
    one C++ call where it suits the rows each expert would get if the pairs spread evenly; that call takes
    w13 and w2 in strip order from `strips()` if given.
    """
    num_experts, k = w13.shape[0], expert_ids.shape[1]
    if _kernel_suits(x, w13, expert_ids.numel() / num_experts):
        w13_strips, w2_strips = strips() if strips is not None else (None, None)
        return cpu_extension.module().grouped_swiglu(x, expert_ids, weights, w13, w2, w13_strips, w2_strips)
    flat = expert_ids.flatten()
    counts = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()  # bin 0: pairs of other shards
    order = torch.argsort(flat, stable=True)[counts[0] :]
    tokens = order // k
    per_expert = counts[1:]
    rows_per_expert = len(tokens) / max(sum(n > 0 for n in per_expert), 1)
    ys = _per_expert(x[tokens], per_expert, w13, w2, multiply_dtype(x, rows_per_expert))
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, tokens, ys.float() * weights.flatten()[order, None]).to(x.dtype)


def _kernel_suits(x: torch.Tensor, w13: torch.Tensor, rows_per_expert: float) -> bool:
    """bfloat16 weights where bf16_gemm runs, or float32 ones, at up to KERNEL_MAX_ROWS rows per expert."""
    if not 0 < rows_per_expert <= KERNEL_MAX_ROWS or x.dtype != w13.dtype or not cpu_extension.runs(x):
        return False
    return w13.dtype == torch.float32 or bf16_gemm.available()  # native bfloat16 units: torch's GEMMs


def _per_expert(
    xs: torch.Tensor, per_expert: list[int], w13: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """xs in expert order through one GEMM pair per expert that got rows, multiplied in dtype."""
    spans = [  # (expert, its rows in expert order) for every expert that got pairs
        (e, slice(end - n, end))
        for e, (n, end) in enumerate(zip(per_expert, itertools.accumulate(per_expert)))
        if n
    ]
    xs = xs.to(dtype)
    gate_up = xs.new_empty(xs.shape[0], w13.shape[2])
    for e, rows in spans:
        torch.mm(xs[rows], w13[e].to(dtype), out=gate_up[rows])
    act = silu_and_mul(gate_up)  # one call over every expert's rows
    ys = torch.empty_like(xs)
    for e, rows in spans:
        torch.mm(act[rows], w2[e].to(dtype), out=ys[rows])
    return ys
