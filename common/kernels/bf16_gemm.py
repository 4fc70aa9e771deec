"""bfloat16 weights times a few rows, on CPUs with AVX-512 but without bfloat16 units.

There torch's bfloat16 GEMM is an emulation: 1.5-3x slower than float32 at decode's row counts. Upcasting
the weight on every call and multiplying in float32 (common.config.matmul_dtype) costs a full float32 copy
of it, which at a few rows is most of the work. This kernel (csrc/bf16_gemm.cpp) reads the bfloat16 weight
once and widens it in registers (a bfloat16 is the top half of a float32, so widening is a shift), so a
memory-bound product reads half the bytes of float32. Every product is exact in float32 and accumulation is
float32, as in a native bfloat16 GEMM. It pays at up to MAX_ROWS rows; beyond, MKL's float32 GEMM on the
upcast operands is faster (tests/bench/bench_bf16_gemm.py).

It is built by torch's extension loader on first use (cached per machine, about 25 s) and used only where
it can run: a CPU with AVX-512 (F, BW, VL), no bfloat16 units, and a compiler. Elsewhere `available()` is
False and callers keep torch's path.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "bf16_gemm.cpp"
MAX_ROWS = 32  # rows per weight up to which it is as fast as float32 MKL on upcast operands, or faster
_NEEDS = {"avx512f", "avx512bw", "avx512vl"}


@functools.cache
def _module() -> ModuleType | None:
    from common.config import cpu_flags, cpu_has_native_bf16

    if cpu_has_native_bf16() or not cpu_flags() >= _NEEDS:
        return None
    try:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp"]
        return load("latentmoe_bf16_gemm", [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, a failed build: torch's path still works
        log.warning("bfloat16 GEMM kernel unavailable (%s): bfloat16 matmuls run upcast to float32", e)
        return None


def available() -> bool:
    """Whether the kernel runs on this machine (builds it on first call)."""
    return _module() is not None


def suits(x: torch.Tensor, w: torch.Tensor, rows_per_weight: float) -> bool:
    """Whether x's products with w (or with weights like it) should run here."""
    return (
        x.dtype == w.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and 0 < rows_per_weight <= MAX_ROWS
        and available()
    )


def mm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (any float dtype) @ w [K, N] bfloat16 -> float32 [M, N], written into `out` when given."""
    x = x.float().contiguous()
    if out is None:
        out = x.new_empty(x.shape[0], w.shape[1])
    _module().mm_out(x, w.contiguous(), out)
    return out


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows offsets[e]..offsets[e+1] of x [R, K] times w[e] ([E, K, N] bfloat16), for every e, in one call
    -> float32 [R, N]. offsets: int64 [E + 1], from 0 to R."""
    x = x.float().contiguous()
    out = x.new_empty(x.shape[0], w.shape[2])
    _module().grouped_mm_out(x, w.contiguous(), offsets, out)
    return out
