"""A linear layer that keeps its weight input-major: [in, out], the transpose of the Hub's [out, in].

`x @ W^T` with W stored [out, in] hands the BLAS a transposed operand, and on CPU MKL multiplies by one
more slowly than by a plain `x @ W` at the row counts of batched decode: for the mini model's shapes on two
threads, 2-2.7x at 16 rows and 1.1-1.9x at 32, about even at one row (tests/bench/bench_weight_layout.py).
So projections, shared and routed experts all keep their weights this way round; the loader writes the
checkpoint's tensors through transposed views (`weight`).

The projections, the MLPs and the weight-absorbed MLA products multiply through `matmul`. It runs a few rows
of bfloat16 in common/kernels/bf16_gemm.py where that kernel runs, and on CPUs without units for half
precision other half-precision products in float32 (common.config.matmul_dtype); the gate scores in float32
anyway, and a tied lm_head (no DeepSeek checkpoint ties it) stays an nn.Linear.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import nn

from common.config import cpu_has_native_bf16, matmul_dtype
from common.kernels import bf16_gemm, strips


def multiply_dtype(x: torch.Tensor, rows_per_weight: float) -> torch.dtype:
    """The dtype x's products with a weight run in: matmul_dtype, unless each weight meets only one row
    (one-sequence decode), for which upcasting a whole weight costs more than the native form."""
    return matmul_dtype(x.dtype, x.device.type) if rows_per_weight > 1 else x.dtype


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w (2-D, batched, or a weight in strip order: pack), in x's dtype: a few rows of bfloat16 through
    common/kernels/bf16_gemm.py where it runs, otherwise multiplied in multiply_dtype."""
    per_head = w.dim() == 3 or (strips.in_strip_order(w) and w.shape[0] > 1)  # a weight per batch entry
    rows = x.shape[-2] if per_head else x.numel() // x.shape[-1]
    if strips.in_strip_order(w):
        if rows <= bf16_gemm.MAX_ROWS:
            return bf16_gemm.bmm(x, w) if per_head else bf16_gemm.mm(x, w)
        rows_major = getattr(w, "rows_major", None)  # many rows: the blocked GEMM below, on [in, out]
        if rows_major is None:
            rows_major = strips.unstrip(w, w.shape[1] * strips.STRIP)
            rows_major = rows_major if per_head else rows_major[0]
        w = rows_major
    if bf16_gemm.suits(x, w, rows):
        return bf16_gemm.mm(x, w) if w.dim() == 2 else bf16_gemm.bmm(x, w)
    dtype = multiply_dtype(x, rows)
    if dtype != x.dtype:
        return (x.to(dtype) @ w.to(dtype)).to(x.dtype)
    return in_row_buckets(x, w, per_head) if on_half_units(x) else x @ w


def on_half_units(x: torch.Tensor) -> bool:
    """Whether x's products in its own dtype run on the CPU's bfloat16 (or float16) units: oneDNN's GEMM."""
    return x.is_cpu and x.dtype is not torch.float32 and matmul_dtype(x.dtype, "cpu") == x.dtype


ROW_BUCKET = 64


def in_row_buckets(x: torch.Tensor, w: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """x @ w with x's rows (a weight per head: each head's) padded with zeros to a multiple of ROW_BUCKET.
    On a CPU with bfloat16 units torch's GEMM is oneDNN's, which builds a kernel for every new shape: mini's
    q_proj took 2.7 ms the first time 64 rows came, 0.1-0.3 ms after. Prefill chunks and decode batches bring
    new row counts all the time; in buckets, as vLLM captures CUDA graphs for batch sizes, a few kernels serve
    them all, and the padding's rows cost those units next to nothing."""
    xs = x if per_head else x.reshape(-1, x.shape[-1])
    rows = xs.shape[-2]
    if pad := -rows % ROW_BUCKET:
        xs = torch.nn.functional.pad(xs, (0, 0, 0, pad))
    y = (xs @ w)[..., :rows, :]
    return y if per_head else y.view(*x.shape[:-1], w.shape[-1])


T = TypeVar("T")


class DerivedWeight(Generic[T]):
    """What a product needs worked out from a weight (a float32 copy, W_UK and W_UV split out of kv_b_proj),
    computed once and again only when the weight is replaced or written in place (the loader fills weights
    after the modules are built)."""

    def __init__(self, derive: Callable[[torch.Tensor], T]) -> None:
        self.derive = derive
        self._source: tuple[torch.Tensor, int] | None = None
        self._value: T | None = None

    def __call__(self, weight: torch.Tensor) -> T:
        if self._source is None or self._source[0] is not weight or self._source[1] != weight._version:
            self._source, self._value = (weight, weight._version), self.derive(weight)
        return self._value  # type: ignore[return-value]


def pack(w: torch.Tensor) -> torch.Tensor:
    """A weight [in, out] (or one per head, [heads, in, out]) in strip order (common/kernels/strips.py) where
    the bfloat16 kernel multiplies it, as the routed experts are kept: a product with a few rows (decode)
    then streams it in memory order (at one row, from memory, mini's projections and dense MLP 1.5-1.7x
    faster than [in, out], its lm_head 1.1x). With AMX, in tile order (bf16_gemm.kernel_order). Otherwise
    (another dtype, `out` not a whole number of strips) w itself. matmul takes either. On a CPU with
    bfloat16 units, whose own GEMM takes the products of more than bf16_gemm.MAX_ROWS rows, w stays beside
    its strips as `rows_major` for them: made again from the strips on every call, it cost as much as the
    product (mini's lm_head at 64 rows, 0.8 ms of 1.3)."""
    if w.dim() not in (2, 3) or w.shape[-1] % strips.STRIP or not bf16_gemm.suits(w, w, 1):  # one row
        return w
    with torch.no_grad():
        packed = nn.Parameter(bf16_gemm.kernel_order(w if w.dim() == 3 else w[None]), requires_grad=False)
    if cpu_has_native_bf16():
        packed.rows_major = w.detach()
    return packed


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The Hub-shaped [out, in] view of the weight (what a checkpoint holds)."""
        if strips.in_strip_order(self.weight_t):
            raise ValueError("a Linear packed in strip order takes no checkpoint tensor: load, then pack")
        return self.weight_t.T

    def pack(self) -> None:
        """Once loaded: the weight in the layout its kernel reads best (`pack`)."""
        self.weight_t = pack(self.weight_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias
