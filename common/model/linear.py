"""A linear layer that keeps its weight input-major: [in, out], the transpose of the Hub's [out, in].

`x @ W^T` with W stored [out, in] hands the BLAS a transposed operand, and on CPU MKL multiplies by one
more slowly than by a plain `x @ W` at the row counts of batched decode: for the mini model's shapes on two
threads, 2-2.7x at 16 rows and 1.1-1.9x at 32, about even at one row (tests/bench/bench_weight_layout.py).
So projections, shared and routed experts all keep their weights this way round; the loader writes the
checkpoint's tensors through transposed views (`weight`).
"""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The Hub-shaped [out, in] view of the weight (what a checkpoint holds)."""
        return self.weight_t.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias
