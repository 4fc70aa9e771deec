"""Strip order: a weight [K, N] kept as [ceil(N / 32), K, 32], so a product with a few rows reads it as one
sequential stream (csrc/gemm_strips.h says how the kernels walk it). Tile order, its form for AMX's tiles:
each strip's pairs of rows interleaved, [ceil(N / 32), K / 2, 64] (csrc/gemm_amx.h).

Strip s holds columns 32 s .. 32 s + 31 of every row, zeros past N. At decode's row counts a [K, N] weight is
read in runs of a panel's width, a row apart, which the prefetchers follow poorly; a strip is contiguous. The
routed experts keep their weights so ([E, strips, K, 32], common/model/moe.py), and so do the projections the
bfloat16 kernel multiplies, as one expert ([1, strips, K, 32], common/model/linear.py's Linear.pack).
"""

import torch

STRIP = 32  # columns per strip: csrc/gemm_strips.h's STRIP_COLUMNS (the C++ calls check the layout)
TILE_K = 32  # weight rows an AMX tile multiply takes: tile order's K is a multiple of it (csrc/gemm_amx.h)


def strip_order(w: torch.Tensor) -> torch.Tensor:
    """w [E, K, N] as [E, ceil(N / 32), K, 32]."""
    experts, k, n = w.shape
    padded = torch.nn.functional.pad(w, (0, -n % STRIP))
    return padded.view(experts, k, padded.shape[2] // STRIP, STRIP).transpose(1, 2).contiguous()


def tile_order(w: torch.Tensor) -> torch.Tensor:
    """w [E, K, N], K a multiple of TILE_K, as [E, ceil(N / 32), K / 2, 64]: row pair j of a strip holds
    columns 0-15 of its rows 2j and 2j + 1 as (row 2j, row 2j + 1) pairs, then columns 16-31 so."""
    strips = strip_order(w)
    experts, count, k, _ = strips.shape
    pairs = strips.view(experts, count, k // 2, 2, 2, STRIP // 2)  # [., row pair, row, half, column]
    return pairs.permute(0, 1, 2, 4, 5, 3).reshape(experts, count, k // 2, 2 * STRIP)


def in_strip_order(w: torch.Tensor) -> bool:
    """Whether w holds weights in strip (or tile) order rather than [E, K, N] or [K, N]."""
    return w.dim() == 4


def in_tile_order(w: torch.Tensor) -> bool:
    """Whether w holds weights in tile order ([E, strips, K / 2, 64]), the form of strip order for AMX."""
    return w.dim() == 4 and w.shape[3] == 2 * STRIP


def rows(w: torch.Tensor) -> int:
    """K of the weights [E, K, N] that w holds in strip or tile order."""
    return 2 * w.shape[2] if in_tile_order(w) else w.shape[2]


def unstrip(strips: torch.Tensor, n: int) -> torch.Tensor:
    """strip_order (or tile_order) undone: [E, K, n] (a copy)."""
    if in_tile_order(strips):
        experts, count, half_k, _ = strips.shape
        pairs = strips.view(experts, count, half_k, 2, STRIP // 2, 2).permute(0, 1, 2, 5, 3, 4)
        strips = pairs.reshape(experts, count, 2 * half_k, STRIP)
    experts, count, k, _ = strips.shape
    return strips.transpose(1, 2).reshape(experts, k, count * STRIP)[:, :, :n]
