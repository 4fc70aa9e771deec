"""Absorbed MLA decode over the paged latents in one C++ call (csrc/paged_decode.cpp), for CPU tensors.

The torch version (flash_attention.paged_latent_decode) gathers pages, scores and merges in about forty
operators per layer, whose dispatch costs more than their arithmetic at decode's sizes; this kernel runs the
same online softmax, page by page, in float32, and reads each latent row once for every head. It finds its
pages from the block tables itself, so it needs no DecodePlan.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.kernels import cpu_extension


def paged_latent_decode(
    q: Tensor,
    pages: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    value_dim: int,
    num_splits: int | None = None,
) -> Tensor:
    """Same contract as common.kernels.paged_latent_decode; num_splits (None: the kernel's own split of
    long contexts) fixes how many pieces the longest context is cut into."""
    tables, lens = (t if t.dtype == torch.int32 else t.int() for t in (block_tables, context_lens))
    return cpu_extension.module().paged_latent_decode(
        q.contiguous(), pages, tables.contiguous(), lens.contiguous(), scale, value_dim, num_splits or 0
    )
