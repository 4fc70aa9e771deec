"""Grouped SwiGLU expert computation: (token, expert) pairs sorted by expert, one GEMM pair per active expert.

One argsort groups the pairs; the inputs are gathered once in expert order, each expert that received pairs
runs its gate/up GEMM on a contiguous slice, one SiLU-and-multiply covers every expert's rows at once (at
decode an expert gets a few rows, and per-expert elementwise ops cost more in dispatch than in arithmetic),
each runs its down GEMM, and one index_add scatters the weighted results back. Experts nobody chose are never
read, which is what makes fine-grained MoE decode cheap. (A padded all-experts batched GEMM was measured as
no faster on CPU, so the simpler schedule stays.)

Where the CPU kernels run (common/kernels/cpu_extension.py), the weights are kept in strip order instead
(common/kernels/strips.py; common/model/moe.py packs them at load, `takes` says where) and all of it is one
C++ call (csrc/grouped_experts.cpp), each GEMM round one grouped product over every expert's rows (the
bfloat16 kernel of common/kernels/bf16_gemm.py, or its float32-weight twin): an expert with a few rows
(decode) streams its weights in memory order (csrc/gemm_strips.h), 1.3-1.4x faster than [K, N] panels at
mini's 64-sequence decode, and one with many widens panels from the strips (on a CPU with bfloat16 units,
a prefill's many rows an expert go to torch's GEMM instead: UNITS_ROWS). With AMX the experts are kept in
tile order and every row count stays in the call, on the tiles (csrc/gemm_amx.h): mini's experts, bf16,
at 64 / 256 / 2,048 tokens 1.4-1.5 / 4.4-4.7 / 31-35 ms a layer in strips against 1.1-1.5 / 1.8 / 12-13
in tiles.
"""

import itertools

import torch

from common.kernels import bf16_gemm, cpu_extension, strips
from common.kernels.activation import silu_and_mul
from common.kernels.strips import in_strip_order, in_tile_order, unstrip
from common.model.linear import in_row_buckets, multiply_dtype, on_half_units

# Rows an expert gets on average past which a CPU with bfloat16 units multiplies them faster in torch's GEMM
# (oneDNN, rows in buckets: common/model/linear.py) than in the C++ call, even with the experts made [K, N]
# again for it: mini at 2,048 tokens (256 rows an expert) 27 against 39 ms a layer, about even at 1,024.
UNITS_ROWS = 128


def takes(w13: torch.Tensor) -> bool:
    """Whether the C++ call multiplies by experts of w13's dtype and device (so they are kept in strip order):
    bfloat16 where bf16_gemm runs, or float32."""
    if w13.device.type != "cpu" or not cpu_extension.available():
        return False
    return w13.dtype == torch.float32 or (w13.dtype == torch.bfloat16 and bf16_gemm.available())


def grouped_swiglu(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    shared: int = 0,
) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) over the experts of this shard, plus the last `shared`
    experts of w13 and w2 (shared experts) with weight 1 for every token.

    x [T, h]; expert_ids [T, k] local expert index or -1 (routed to another shard); weights [T, k] float32;
    w13 [E, h, 2I] (gate columns then up columns); w2 [E, I, h]: input-major, so each GEMM is a plain
    `rows @ weight` (see common/model/linear.py); or both in strip order, [E, ceil(2I / 32), h, 32] and
    [E, ceil(h / 32), I, 32] (or tile order, common/kernels/strips.py). Returns [T, h] in x.dtype, accumulated
    in float32. Weights in strip or tile order go to the C++ call; others, x it cannot take (another dtype
    than the weights'), or on a CPU with bfloat16 units (weights in strip order) more than UNITS_ROWS rows
    an expert, run one GEMM pair per expert in multiply_dtype (float32 for half types on CPUs without units
    for them). There, past bf16_gemm.MAX_ROWS tokens, shared experts kept [K, N] run apart (_shared_apart).
    """
    if in_strip_order(w13):
        routed_rows = x.shape[0] * expert_ids.shape[1] / max(w13.shape[0] - shared, 1)  # per expert, mean
        many = on_half_units(x) and routed_rows > UNITS_ROWS and not in_tile_order(w13)
        if x.dtype == w13.dtype and cpu_extension.runs(x) and not many:
            kept = hasattr(w13, "shared_rows_major")  # on CPUs with bfloat16 units: RoutedExperts.pack
            if shared and kept and x.shape[0] > bf16_gemm.MAX_ROWS:
                return _shared_apart(x, expert_ids, weights, w13, w2, shared)
            return cpu_extension.module().grouped_swiglu(x, expert_ids, weights, w13, w2, shared)
        w13, w2 = unstrip(w13, 2 * strips.rows(w2)), unstrip(w2, x.shape[1])
    if shared:
        first = w13.shape[0] - shared
        every = torch.arange(first, first + shared, device=x.device).expand(x.shape[0], shared)
        expert_ids = torch.cat([expert_ids, every], dim=1)
        weights = torch.cat([weights, weights.new_ones(every.shape)], dim=1)
    num_experts, k = w13.shape[0], expert_ids.shape[1]
    flat = expert_ids.flatten()
    counts = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()  # bin 0: pairs of other shards
    order = torch.argsort(flat, stable=True)[counts[0] :]
    tokens = order // k
    per_expert = counts[1:]
    rows_per_expert = len(tokens) / max(sum(n > 0 for n in per_expert), 1)
    ys = _per_expert(x[tokens], per_expert, w13, w2, multiply_dtype(x, rows_per_expert))
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, tokens, ys.float() * weights.flatten()[order, None]).to(x.dtype)


def _shared_apart(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    shared: int,
) -> torch.Tensor:
    """The routed experts in the C++ call, the shared ones (every token's rows) in torch's GEMM on the CPU's
    bfloat16 units, on the [K, N] copies RoutedExperts.pack keeps there, their outputs added as the model adds
    them. Every token's rows meet the shared experts, so past the kernel's MAX_ROWS those units win: mini's
    prefill of 512 / 1,024 tokens 77-78 -> 68-73 / 153-157 -> 125-127 ms (a 64-sequence decode step: even)."""
    routed = w13.shape[0] - shared
    out = cpu_extension.module().grouped_swiglu(x, expert_ids, weights, w13[:routed], w2[:routed], 0)
    rows = x.expand(shared, *x.shape)
    gate_up = in_row_buckets(rows, w13.shared_rows_major, per_head=True)  # [shared, T, 2I]
    act = silu_and_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(shared, x.shape[0], -1)
    return out.add_(in_row_buckets(act, w2.shared_rows_major, per_head=True).sum(0))


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
    mm = in_row_buckets if on_half_units(xs) else torch.mm
    gate_up = xs.new_empty(xs.shape[0], w13.shape[2])
    for e, rows in spans:
        gate_up[rows] = mm(xs[rows], w13[e].to(dtype))
    act = silu_and_mul(gate_up)  # one call over every expert's rows
    ys = torch.empty_like(xs)
    for e, rows in spans:
        ys[rows] = mm(act[rows], w2[e].to(dtype))
    return ys
