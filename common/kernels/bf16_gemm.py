"""bfloat16 weights times a few rows, on CPUs without bfloat16 units (AVX-512 or AVX2).

There torch's bfloat16 GEMM is an emulation: 1.5-3x slower than float32 at decode's row counts. Upcasting
the weight on every call and multiplying in float32 (common.config.matmul_dtype) costs a full float32 copy
of it, which at decode's row counts is much of the work. This kernel (csrc/bf16_gemm.cpp) reads the
bfloat16 weight once and widens it a small panel at a time (a bfloat16 is the top half of a float32, so
widening is a shift) into float32 that stays in L1, where tiles of rows multiply it from registers: a
memory-bound product reads half the bytes of float32, a compute-bound one runs at about MKL's float32 rate.
Every product is exact in float32 and accumulation is float32, as in a native bfloat16 GEMM. It pays at up
to MAX_ROWS rows; beyond, MKL's float32 GEMM on the upcast operands, blocked for large matrices, is faster
(tests/bench/bench_bf16_gemm.py).

It is part of common/kernels/cpu_extension.py and used only where it can run: a CPU with AVX-512 (F, BW,
VL) or AVX2 with FMA, no bfloat16 units, and a compiler. Elsewhere `available()` is False and callers keep
torch's path.
"""

from __future__ import annotations

import functools

import torch

from common.kernels import cpu_extension

MAX_ROWS = 256  # rows per weight up to which it is as fast as float32 MKL on upcast operands, or faster


@functools.cache
def available() -> bool:
    """Whether the kernel runs on this machine (builds common/kernels/cpu_extension.py on the first call)."""
    from common.config import cpu_has_native_bf16

    return not cpu_has_native_bf16() and cpu_extension.available()


def suits(x: torch.Tensor, w: torch.Tensor, rows_per_weight: float) -> bool:
    """Whether x's products with w (or with weights like it) should run here."""
    return (
        x.dtype is torch.bfloat16
        and w.dtype is torch.bfloat16
        and x.is_cpu
        and 0 < rows_per_weight <= MAX_ROWS
        and available()
    )


def mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] (float32 or bfloat16) @ w [K, N] bfloat16 -> [..., N] in x's dtype."""
    return cpu_extension.module().bf16_mm(x, w)


def bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, M, K] @ w [B, K, N] bfloat16 -> [B, M, N] in x's dtype (a weight per batch entry, as MLA's
    absorbed products have one per head)."""
    return cpu_extension.module().bf16_bmm(x, w)
