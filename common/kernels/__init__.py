"""Attention kernels: Triton on CUDA tensors when triton is installed; on CPU the C++ kernels where they build
(common/kernels/cpu_extension.py); the torch implementation otherwise.

The Triton module is imported only when a CUDA tensor first shows up: importing it defines the @triton.jit
kernels, and that must not happen before a test had the chance to set TRITON_INTERPRET.
"""

import functools
from types import ModuleType

from torch import Tensor

from common.kernels import cpu_attention, cpu_extension, flash_attention
from common.kernels.flash_attention import DecodePlan

__all__ = ["DecodePlan", "decode_needs_plan", "flash_attn_varlen", "paged_latent_decode"]


@functools.cache
def _triton_module() -> ModuleType | None:
    try:
        from common.kernels import triton_attention
    except ImportError:
        return None
    return triton_attention


def _backend(x: Tensor) -> ModuleType:
    if x.is_cuda and (module := _triton_module()) is not None:
        return module
    if cpu_extension.runs(x):
        return cpu_attention
    return flash_attention


def decode_needs_plan(q: Tensor) -> bool:
    """Whether paged_latent_decode on queries like q runs the torch path, which takes a DecodePlan."""
    return _backend(q) is flash_attention


def flash_attn_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool = True,
) -> Tensor:
    """Causal (bottom-right aligned) or full attention over packed sequences -> [Tq, H, Dv] in q.dtype.

    q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv]; cu_seqlens_* int32 [B + 1] prefix sums of the lengths.
    A sequence's q_len queries are the last q_len positions of its k_len keys.
    """
    return _backend(q).flash_attn_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal
    )


def paged_latent_decode(
    q: Tensor,
    pages: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    value_dim: int,
    num_splits: int | None = None,
    plan: DecodePlan | None = None,
) -> Tensor:
    """One latent query per sequence and head against its paged latents -> [B, H, value_dim] in q.dtype.

    q [B, H, D]; pages [num_blocks, block_size, D]; block_tables int32 [B, max_blocks];
    context_lens int32 [B] >= 1. scores = q . entry * scale over the first context_lens entries of the
    sequence; the output mixes entry[:value_dim]. plan: the torch path's work items for these tables, built
    once per step (see decode_needs_plan; the Triton and C++ kernels find their blocks themselves).
    """
    backend = _backend(q)
    if backend is flash_attention:
        return backend.paged_latent_decode(
            q, pages, block_tables, context_lens, scale, value_dim, num_splits, plan=plan
        )
    return backend.paged_latent_decode(q, pages, block_tables, context_lens, scale, value_dim, num_splits)
