"""Strip order: a weight [K, N] kept as [ceil(N / 32), K, 32], so a product with a few rows reads it as one
sequential stream (csrc/gemm_strips.h says how the kernels walk it).

Strip s holds columns 32 s .. 32 s + 31 of every row, zeros past N. At decode's row counts a [K, N] weight is
read in runs of a panel's width, a row apart, which the prefetchers follow poorly; a strip is contiguous. The
routed experts keep their weights so ([E, strips, K, 32], common/model/moe.py), and so do the projections the
bfloat16 kernel multiplies, as one expert ([1, strips, K, 32], common/model/linear.py's Linear.pack).
"""

import torch

STRIP = 32  # columns per strip: csrc/gemm_strips.h's STRIP_COLUMNS (the C++ calls check the layout)


def strip_order(w: torch.Tensor) -> torch.Tensor:
    """w [E, K, N] as [E, ceil(N / 32), K, 32]."""
    experts, k, n = w.shape
    padded = torch.nn.functional.pad(w, (0, -n % STRIP))
    return padded.view(experts, k, padded.shape[2] // STRIP, STRIP).transpose(1, 2).contiguous()


def in_strip_order(w: torch.Tensor) -> bool:
    """Whether w holds weights in strip order ([E, strips, K, 32]) rather than [E, K, N] or [K, N]."""
    return w.dim() == 4


def unstrip(strips: torch.Tensor, n: int) -> torch.Tensor:
    """strip_order undone: [E, K, n] (a copy)."""
    experts, count, k, _ = strips.shape
    return strips.transpose(1, 2).reshape(experts, k, count * STRIP)[:, :, :n]
