"""Flash-style attention in plain torch: the reference for the C++ and Triton kernels, and the path where
neither runs.

Both functions use the online softmax of FlashAttention: scores are made one tile at a time, and a running
row maximum `m` and running denominator `l` rescale the partial output, so no [q_len, k_len] score matrix
ever exists for a whole sequence. Whatever the input dtype, the arithmetic is float32.

- `flash_attn_varlen`: prefill over packed variable-length sequences (naive MLA form, per-head K and V).
- `paged_latent_decode`: one query per sequence against its paged latent cache (absorbed MLA form, every
  head reads the same latent entries), split over the context and merged with a log-sum-exp combine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Large tiles keep the CPU matmuls efficient; a score tile is H * TILE_Q * TILE_K * 4 bytes.
TILE_Q = 256
TILE_K = 512
# Decode: context tokens per split when the caller does not choose, and the float32 latents gathered at once.
SPLIT_TOKENS = 1024
GATHER_BYTES = 32 << 20


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
    *,
    tile_q: int = TILE_Q,
    tile_k: int = TILE_K,
) -> Tensor:
    """Attention over packed sequences: q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] -> [Tq, H, Dv].

    Sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v.
    Causal masking is bottom-right aligned: the queries are the last q_len positions of the k_len context,
    so query j sees keys 0 .. k_len - q_len + j. max_seqlen_* are accepted for the Triton signature.
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        if q1 == q0:
            continue
        if k1 == k0 or (causal and q1 - q0 > k1 - k0):
            raise ValueError(f"sequence {b}: {q1 - q0} queries cannot attend to {k1 - k0} keys")
        # Heads become the batch dimension of every matmul: [H, len, D], float32, q pre-scaled.
        qb = q[q0:q1].transpose(0, 1).float() * scale
        kb = k[k0:k1].transpose(0, 1).float()
        vb = v[k0:k1].transpose(0, 1).float()
        out[q0:q1] = _attend(qb, kb, vb, causal, tile_q, tile_k).transpose(0, 1)
    return out


def _attend(q: Tensor, k: Tensor, v: Tensor, causal: bool, tile_q: int, tile_k: int) -> Tensor:
    """One sequence, all heads: q [H, Lq, Dqk] (pre-scaled), k [H, Lk, Dqk], v [H, Lk, Dv] -> [H, Lq, Dv]."""
    heads, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
    shift = k_len - q_len  # causal: query i sees keys 0 .. i + shift
    out = q.new_empty(heads, q_len, v.shape[2])
    for qs in range(0, q_len, tile_q):
        qe = min(qs + tile_q, q_len)
        q_tile = q[:, qs:qe]
        m = q.new_full((heads, qe - qs, 1), -math.inf)  # running row max
        l = q.new_zeros(heads, qe - qs, 1)  # running softmax denominator
        acc = q.new_zeros(heads, qe - qs, v.shape[2])  # running unnormalised output
        k_stop = min(k_len, qe + shift) if causal else k_len  # tiles above the diagonal are never visited
        for ks in range(0, k_stop, tile_k):
            ke = min(ks + tile_k, k_stop)
            s = torch.bmm(q_tile, k[:, ks:ke].transpose(1, 2))  # [H, tq, tk]
            if causal and ke - 1 > qs + shift:  # this tile crosses the diagonal
                rows = torch.arange(qs + shift, qe + shift, device=q.device)[:, None]
                s.masked_fill_(torch.arange(ks, ke, device=q.device) > rows, -math.inf)
            # Key 0 is visible to every query, so m is finite from the first tile on and no NaN can appear.
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            p = s.sub_(m_new).exp_()
            alpha = (m - m_new).exp_()
            l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
            acc.mul_(alpha).baddbmm_(p, v[:, ks:ke])
            m = m_new
        out[:, qs:qe] = acc.div_(l)
    return out


@dataclass(frozen=True)
class DecodePlan:
    """The work items of a paged decode: which blocks each (sequence, split) reads, and which of their slots
    lie past the context. It depends only on the block tables, the context lengths and the page size, so one
    plan serves every layer of a step (built once: at one sequence it is most of a layer's decode work).

    The context is cut into splits of whole blocks (num_splits per longest sequence; None picks one split per
    SPLIT_TOKENS); item w covers positions split * split_len + [0, split_len) of sequence seq[w].
    """

    batch: int
    block_size: int
    split_len: int
    split_blocks: int
    seq: Tensor  # int64 [W]: the sequence of each item
    block_ids: Tensor  # int64 [W, split_blocks]: the blocks each item gathers (0 where unused)
    stale: Tensor  # bool [W, split_len]: slots past the sequence's context

    @classmethod
    def build(
        cls, block_tables: Tensor, context_lens: Tensor, block_size: int, num_splits: int | None = None
    ) -> DecodePlan:
        """block_tables [B, max_blocks]; context_lens [B] >= 1."""
        device = block_tables.device
        lens = context_lens.to(device=device, dtype=torch.long)
        batch = lens.shape[0]
        if block_tables.dim() != 2 or block_tables.shape[0] != batch or lens.dim() != 1:
            raise ValueError(f"block_tables [B, max_blocks] and context_lens [B] expected for B={batch}")
        lo, hi = torch.stack(torch.aminmax(lens)).tolist() if batch else (1, 0)
        if lo < 1 or hi > block_tables.shape[1] * block_size:
            raise ValueError(f"context_lens must be in 1..{block_tables.shape[1] * block_size}")
        if num_splits is None:
            num_splits = -(-hi // SPLIT_TOKENS)
        split_blocks = max(1, -(-hi // (max(1, num_splits) * block_size)))
        split_len = split_blocks * block_size
        items_per_seq = (lens + split_len - 1) // split_len
        seq = torch.repeat_interleave(torch.arange(batch, device=device), items_per_seq)
        split = torch.arange(seq.numel(), device=device) - (items_per_seq.cumsum(0) - items_per_seq)[seq]
        stale = split[:, None] * split_len + torch.arange(split_len, device=device) >= lens[seq, None]
        block_col = split[:, None] * split_blocks + torch.arange(split_blocks, device=device)
        block_used = block_col * block_size < lens[seq, None]
        block_col = block_col.clamp_(max=block_tables.shape[1] - 1)
        block_ids = torch.where(block_used, block_tables.to(torch.long)[seq[:, None], block_col], 0)
        return cls(batch, block_size, split_len, split_blocks, seq, block_ids, stale)


def paged_latent_decode(
    q: Tensor,
    pages: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    value_dim: int,
    num_splits: int | None = None,
    *,
    plan: DecodePlan | None = None,
) -> Tensor:
    """One query per sequence and head against that sequence's paged latent cache -> [B, H, value_dim].

    q [B, H, D]; pages [num_blocks, block_size, D]; block_tables [B, max_blocks] (entries past a sequence's
    context are never read); context_lens [B] >= 1. scores = q . entry * scale; values = entry[:value_dim].
    plan: DecodePlan.build of these tables, when the caller keeps it for every layer of a step.

    Every (sequence, split) pair with tokens is one work item: all items are gathered and scored with batched
    matmuls, each yields a partial (max, sum, out), and a log-sum-exp combine merges the items of a sequence.
    There is no Python loop over sequences or blocks, only over memory-bounded chunks.
    """
    if plan is None:
        plan = DecodePlan.build(block_tables.to(q.device), context_lens, pages.shape[1], num_splits)
    _check_decode(q, pages, plan, value_dim)
    batch, heads, dim = q.shape
    if batch == 0:
        return q.new_empty(0, heads, value_dim)
    seq, block_ids, stale = plan.seq, plan.block_ids, plan.stale
    block_size, split_len, split_blocks = plan.block_size, plan.split_len, plan.split_blocks

    # Partial softmax of every item, a chunk of items at a time so the gathered latents stay bounded. The
    # buffers are reused across chunks: on CPU every fresh large allocation pays a page fault per 4 KiB.
    num_items = seq.numel()
    chunk = min(num_items, max(1, GATHER_BYTES // (split_len * dim * 4)))
    gathered = pages.new_empty(chunk * split_blocks, block_size, dim)
    latents = gathered if pages.dtype == torch.float32 else torch.empty_like(gathered, dtype=torch.float32)
    scores = q.new_empty(chunk, heads, split_len, dtype=torch.float32)
    q_items = q.float()[seq] * scale  # [W, H, D]
    m = q.new_empty(num_items, heads, 1, dtype=torch.float32)
    l = torch.empty_like(m)
    o = q.new_empty(num_items, heads, value_dim, dtype=torch.float32)
    for c in range(0, num_items, chunk):
        n, items = min(chunk, num_items - c), slice(c, c + chunk)
        torch.index_select(pages, 0, block_ids[items].flatten(), out=gathered[: n * split_blocks])
        if latents is not gathered:
            latents[: n * split_blocks].copy_(gathered[: n * split_blocks])
        kv = latents[: n * split_blocks].view(n, split_len, dim)
        # Slots past the context may hold anything, even NaN: zero them (few rows) and mask their scores.
        kv.view(-1, dim).index_fill_(0, stale[items].flatten().nonzero().squeeze(1), 0.0)
        s = torch.bmm(q_items[items], kv.transpose(1, 2), out=scores[:n])  # [n, H, split_len]
        s.masked_fill_(stale[items, None, :], -math.inf)
        m[items] = s.amax(dim=-1, keepdim=True)  # finite: every item holds at least one token
        p = s.sub_(m[items]).exp_()
        l[items] = p.sum(dim=-1, keepdim=True)
        torch.bmm(p, kv[:, :, :value_dim], out=o[items])

    if num_items == batch:  # one split per sequence: nothing to combine
        return o.div_(l).to(q.dtype)

    # Log-sum-exp combine of the items of each sequence.
    owner = seq[:, None, None].expand_as(m)
    m_seq = m.new_full((batch, heads, 1), -math.inf).scatter_reduce_(0, owner, m, "amax")
    weight = (m - m_seq[seq]).exp_()
    num = o.new_zeros(batch, heads, value_dim).index_add_(0, seq, o.mul_(weight))
    den = l.new_zeros(batch, heads, 1).index_add_(0, seq, l.mul_(weight))
    return num.div_(den).to(q.dtype)


def _check_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [tokens, heads, dim], got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if k.shape[:2] != v.shape[:2] or q.shape[1] != k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must both be [batch + 1]")


def _check_decode(q: Tensor, pages: Tensor, plan: DecodePlan, value_dim: int) -> None:
    if q.dim() != 3 or pages.dim() != 3 or q.shape[2] != pages.shape[2]:
        raise ValueError(
            f"q [B, H, D] and pages [blocks, block_size, D] expected, got {tuple(q.shape)}, "
            f"{tuple(pages.shape)}"
        )
    if not 0 < value_dim <= q.shape[2]:
        raise ValueError(f"value_dim {value_dim} must be in 1..{q.shape[2]}")
    if (plan.batch, plan.block_size) != (q.shape[0], pages.shape[1]):
        raise ValueError(
            f"the plan is for {plan.batch} sequences on pages of {plan.block_size} slots; got {q.shape[0]} "
            f"queries and pages of {pages.shape[1]}"
        )
