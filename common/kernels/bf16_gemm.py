"""bfloat16 weights times a few rows (AVX-512 or AVX2), on any CPU the kernels build for.

On a CPU without bfloat16 units torch's bfloat16 GEMM is an emulation: 1.5-3x slower than float32 at decode's
row counts. Upcasting the weight on every call and multiplying in float32 (common.config.matmul_dtype) costs a
full float32 copy of it, which at decode's row counts is much of the work. This kernel (csrc/bf16_gemm.cpp)
reads the bfloat16 weight once and widens it a small panel at a time (a bfloat16 is the top half of a
float32, so widening is a shift) into float32 that stays in L1, where tiles of rows multiply it from
registers: a memory-bound product reads half the bytes of float32, a compute-bound one runs at about MKL's
float32 rate. Every product is exact in float32 and accumulation is float32, as in a native bfloat16 GEMM.
It pays at up to MAX_ROWS rows (tests/bench/bench_bf16_gemm.py): beyond, MKL's float32 GEMM on the upcast
operands, blocked for large matrices, is faster.

A CPU with bfloat16 units (AMX, AVX512-BF16) multiplies many rows far faster in torch's own GEMM (oneDNN),
but a call there costs about 40 us whatever its size, and a product of one row is memory-bound anyway: this
kernel, streaming a weight in strip order, is 2.5-3x faster at 1-4 rows and even at 16. There MAX_ROWS is 16.
With AMX the kernel multiplies on its tiles too (csrc/gemm_amx.h), the weights in tile order: faster than
oneDNN's GEMM (its rows padded to buckets of 64, common/model/linear.py) at up to 256 rows of mini's
projections and dense MLP (at 96: 29-181 against 55-352 us; at 256, 46-360 against 54-364), even at 384-512,
and faster for the routed experts at any row count (they stay in the kernel there). There MAX_ROWS is 256.

It is part of common/kernels/cpu_extension.py and used only where it can run: a CPU with AVX-512 (F, BW,
VL) or AVX2 with FMA, and a compiler. Elsewhere `available()` is False and callers keep torch's path.
"""

from __future__ import annotations

import functools

import torch

from common.config import cpu_flags, cpu_has_native_bf16
from common.kernels import cpu_extension, strips

# Rows per weight up to which the kernel is as fast as the CPU's best other GEMM, or faster: float32 MKL on
# upcast operands without bfloat16 units, torch's own bfloat16 GEMM with them. A weight kept [K, N] (MLA's
# kv_b_proj, for the naive prefill) is multiplied with FMAs even on AMX, where oneDNN's GEMM beats them past
# 16 rows (64 rows of kv_b_proj: 77 against 38 us; 256: 272 against 57): ROW_MAJOR_MAX_ROWS.
ROW_MAJOR_MAX_ROWS = 16 if cpu_has_native_bf16() else 256
MAX_ROWS = 256 if cpu_flags() >= {"amx_tile", "amx_bf16"} else ROW_MAJOR_MAX_ROWS


@functools.cache
def available() -> bool:
    """Whether the kernel runs on this machine (builds common/kernels/cpu_extension.py on the first call)."""
    return cpu_extension.available()


@functools.cache
def tiles() -> bool:
    """Whether bfloat16 weights multiply on AMX's tiles here: kernels built for them, granted by the OS."""
    return available() and cpu_extension.module().amx_ready()


def kernel_order(w: torch.Tensor) -> torch.Tensor:
    """Weights [E, K, N] in the order the kernels read best: tile order where AMX's tiles take them
    (bfloat16, K a multiple of strips.TILE_K), strip order otherwise (common/kernels/strips.py)."""
    if w.dtype is torch.bfloat16 and w.shape[1] % strips.TILE_K == 0 and tiles():
        return strips.tile_order(w)
    return strips.strip_order(w)


def suits(x: torch.Tensor, w: torch.Tensor, rows_per_weight: float) -> bool:
    """Whether x's products with w (or with weights like it, packed as it is) should run here."""
    most = MAX_ROWS if strips.in_strip_order(w) else ROW_MAJOR_MAX_ROWS
    return (
        x.dtype is torch.bfloat16
        and w.dtype is torch.bfloat16
        and x.is_cpu
        and 0 < rows_per_weight <= most
        and available()
    )


def mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] (float32 or bfloat16) @ w [K, N] bfloat16 -> [..., N] in x's dtype."""
    return cpu_extension.module().bf16_mm(x, w)


def bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, M, K] @ w [B, K, N] bfloat16 -> [B, M, N] in x's dtype (a weight per batch entry, as MLA's
    absorbed products have one per head)."""
    return cpu_extension.module().bf16_bmm(x, w)
