"""RMSNorm, computed in float32 like the reference implementation (one C++ call on CPU where it builds)."""

import torch
from torch import nn

from common.kernels import cpu_extension


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """weight * x / rms(x). With a residual, x is added into it first, as a pre-norm layer adds its
        sublayer's output to the residual stream before the next norm, and (norm of the sum, the sum) come
        back; the kernel adds in place, sparing a pass and an operator."""
        weight = self.weight  # a module's parameter lookup costs microseconds, and this runs twice a layer
        if x.dim() == 2 and x.stride(1) == 1 and x.dtype is weight.dtype and cpu_extension.runs(x):
            if residual is None:
                return cpu_extension.module().rms_norm(x, weight, self.eps)
            if residual.is_contiguous() and residual.shape == x.shape and residual.dtype is x.dtype:
                return cpu_extension.module().rms_norm(x, weight, self.eps, residual), residual
        if residual is not None:
            residual = x + residual
            return self(residual), residual
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)
