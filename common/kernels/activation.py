"""silu(gate) * up, the SwiGLU activation of the MLPs and experts: one C++ call on CPU (csrc/activation.cpp,
where torch takes three operators), torch's operators elsewhere."""

import torch
import torch.nn.functional as F

from common.kernels import cpu_extension


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate columns, then up columns) -> [..., I], in gate_up's dtype."""
    if gate_up.dim() == 2 and gate_up.stride(1) == 1 and cpu_extension.runs(gate_up):
        return cpu_extension.module().silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
