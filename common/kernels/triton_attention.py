"""Triton versions of the flash-style attention kernels (same signatures as `flash_attention`).

- Prefill: a FlashAttention-2 kernel; one program per (query tile, head, sequence) walks the key tiles of its
  sequence with an online softmax, stopping at the causal diagonal.
- Decode: flash-decoding; one program per (sequence, head group, context split) reads latent entries through
  the block table, scores every head of the group against them and keeps a partial (max, sum, out); a second
  kernel merges the splits of each (sequence, head) with a log-sum-exp combine.

Softmax runs in base 2 (exp2 with log2(e) folded into the scale), accumulators are float32, and float32
inputs use IEEE dot products (no TF32) so results match the torch implementation.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = math.log2(math.e)


def _dot_precision(x: Tensor) -> str | None:
    return "ieee" if x.dtype == torch.float32 else None  # None: the backend default (16-bit inputs)


@triton.jit
def _prefill_kernel(
    Q,
    K,
    V,
    Out,
    CuSeqlensQ,
    CuSeqlensK,
    qk_scale,
    dim_qk,
    dim_v,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile, head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(CuSeqlensQ + seq)
    q_len = tl.load(CuSeqlensQ + seq + 1) - q_start
    k_start = tl.load(CuSeqlensK + seq)
    k_len = tl.load(CuSeqlensK + seq + 1) - k_start
    if tile * BLOCK_M < q_len:
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        d_qk = tl.arange(0, BLOCK_DQK)
        d_v = tl.arange(0, BLOCK_DV)
        q_ptrs = Q + (q_start + rows).to(tl.int64)[:, None] * stride_qt + head * stride_qh + d_qk[None, :]
        q = tl.load(q_ptrs, mask=(rows[:, None] < q_len) & (d_qk[None, :] < dim_qk), other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        shift = k_len - q_len  # causal: query i sees keys 0 .. i + shift
        k_stop = k_len
        if CAUSAL:
            k_stop = tl.minimum(k_len, (tile + 1) * BLOCK_M + shift)  # skip tiles above the diagonal
        for n0 in range(0, k_stop, BLOCK_N):
            keys = n0 + cols
            k_rows = (k_start + keys).to(tl.int64)
            k_ptrs = K + k_rows[None, :] * stride_kt + head * stride_kh + d_qk[:, None]
            k = tl.load(k_ptrs, mask=(keys[None, :] < k_len) & (d_qk[:, None] < dim_qk), other=0.0)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
            visible = keys[None, :] < k_len
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
            # Key 0 is visible to every row, so m_i is finite after the first tile: no NaN from inf - inf.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v_ptrs = V + k_rows[:, None] * stride_vt + head * stride_vh + d_v[None, :]
            v = tl.load(v_ptrs, mask=(keys[:, None] < k_len) & (d_v[None, :] < dim_v), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        acc = acc / l_i[:, None]
        o_ptrs = Out + (q_start + rows).to(tl.int64)[:, None] * stride_ot + head * stride_oh + d_v[None, :]
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(rows[:, None] < q_len) & (d_v[None, :] < dim_v))


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
    block_m: int = 64,
    block_n: int | None = None,
) -> Tensor:
    """Packed-sequence attention, see `flash_attention.flash_attn_varlen`; causal requires q_len <= k_len."""
    tokens, heads, dim_qk = q.shape
    dim_v = v.shape[2]
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = q.new_empty(tokens, heads, dim_v)
    batch = cu_seqlens_q.numel() - 1
    if tokens == 0 or batch == 0:
        return out
    block_dqk = max(16, triton.next_power_of_2(dim_qk))
    block_dv = max(16, triton.next_power_of_2(dim_v))
    if block_n is None:
        block_n = 64 if max(block_dqk, block_dv) <= 128 else 32
    grid = (triton.cdiv(max_seqlen_q, block_m), heads, batch)
    _prefill_kernel[grid](
        q,
        k,
        v,
        out,
        cu_seqlens_q,
        cu_seqlens_k,
        scale * LOG2E,
        dim_qk,
        dim_v,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        CAUSAL=causal,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_DQK=block_dqk,
        BLOCK_DV=block_dv,
        DOT_PRECISION=_dot_precision(q),
        num_warps=4 if block_dqk <= 64 else 8,
        num_stages=2,
    )
    return out


@triton.jit
def _decode_split_kernel(
    Q,
    Pages,
    BlockTables,
    ContextLens,
    PartialOut,
    PartialLse,
    qk_scale,
    split_len,
    num_heads,
    value_dim,
    pe_dim,
    stride_qb,
    stride_qh,
    stride_pb,
    stride_pt,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    HAS_PE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq, head_group, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(ContextLens + seq)
    start = split * split_len
    stop = tl.minimum(start + split_len, context_len)
    if start < stop:
        heads = head_group * BLOCK_H + tl.arange(0, BLOCK_H)
        head_ok = heads < num_heads
        d_c = tl.arange(0, BLOCK_DC)  # latent part: scored and also the value
        d_r = tl.arange(0, BLOCK_DR)  # rope part: scored only
        q_rows = Q + seq * stride_qb + heads[:, None] * stride_qh
        q_c = tl.load(q_rows + d_c[None, :], mask=head_ok[:, None] & (d_c[None, :] < value_dim), other=0.0)
        if HAS_PE:
            q_pe_mask = head_ok[:, None] & (d_r[None, :] < pe_dim)
            q_pe = tl.load(q_rows + value_dim + d_r[None, :], mask=q_pe_mask, other=0.0)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DC], dtype=tl.float32)
        for n0 in range(start, stop, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            live = pos < stop
            block = tl.load(BlockTables + seq * stride_bt + pos // PAGE_SIZE, mask=live, other=0)
            entry = Pages + block.to(tl.int64) * stride_pb + (pos % PAGE_SIZE) * stride_pt  # [BLOCK_N]
            kv_c_mask = live[:, None] & (d_c[None, :] < value_dim)
            kv_c = tl.load(entry[:, None] + d_c[None, :], mask=kv_c_mask, other=0.0)
            s = tl.dot(q_c, tl.trans(kv_c), input_precision=DOT_PRECISION)
            if HAS_PE:
                kv_pe_mask = live[:, None] & (d_r[None, :] < pe_dim)
                kv_pe = tl.load(entry[:, None] + value_dim + d_r[None, :], mask=kv_pe_mask, other=0.0)
                s += tl.dot(q_pe, tl.trans(kv_pe), input_precision=DOT_PRECISION)
            s = tl.where(live[None, :], s * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_N], log2 units
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the first tile holds position `start`
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(kv_c.dtype), kv_c, input_precision=DOT_PRECISION)
            m_i = m_new
        o_ptrs = PartialOut + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + d_c[None, :]
        tl.store(o_ptrs, acc / l_i[:, None], mask=head_ok[:, None] & (d_c[None, :] < value_dim))
        tl.store(PartialLse + seq * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i), mask=head_ok)


@triton.jit
def _decode_combine_kernel(
    PartialOut,
    PartialLse,
    ContextLens,
    Out,
    split_len,
    value_dim,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_outb,
    stride_outh,
    BLOCK_DC: tl.constexpr,
):
    seq, head = tl.program_id(0), tl.program_id(1)
    num_splits = tl.cdiv(tl.load(ContextLens + seq), split_len)  # splits of this sequence that hold tokens
    d_c = tl.arange(0, BLOCK_DC)
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_DC], dtype=tl.float32)
    for split in range(0, num_splits):
        lse = tl.load(PartialLse + seq * stride_lb + head * stride_lh + split)
        o = tl.load(
            PartialOut + seq * stride_ob + head * stride_oh + split * stride_os + d_c,
            mask=d_c < value_dim,
            other=0.0,
        )
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + w * o
        total = total * alpha + w
        m = m_new
    tl.store(
        Out + seq * stride_outb + head * stride_outh + d_c,
        (acc / total).to(Out.dtype.element_ty),
        mask=d_c < value_dim,
    )


def paged_latent_decode(
    q: Tensor,
    pages: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    value_dim: int,
    num_splits: int | None = None,
    *,
    block_n: int = 32,
    block_h: int = 16,
) -> Tensor:
    """Paged latent decode, see `flash_attention.paged_latent_decode`.

    The splits are sized from the block-table width, the bound on the longest context known without a
    device-to-host sync; num_splits=None gives one split per 512 tokens of it, at most 32 (occupancy for
    small batches, bounded partial buffers for large ones). Splits past a sequence's context exit at once.
    """
    batch, heads, dim = q.shape
    if q.stride(2) != 1 or pages.stride(2) != 1:
        q, pages = q.contiguous(), pages.contiguous()
    out = q.new_empty(batch, heads, value_dim)
    if batch == 0:
        return out
    max_len = block_tables.shape[1] * pages.shape[1]
    if num_splits is None:
        num_splits = min(32, triton.cdiv(max_len, 512))
    split_len = triton.cdiv(triton.cdiv(max_len, max(1, num_splits)), block_n) * block_n
    num_splits = triton.cdiv(max_len, split_len)
    pe_dim = dim - value_dim
    block_dc = max(16, triton.next_power_of_2(value_dim))
    block_dr = max(16, triton.next_power_of_2(pe_dim))
    block_h = min(block_h, max(16, triton.next_power_of_2(heads)))

    partial_out = torch.empty(batch, heads, num_splits, value_dim, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
    grid = (batch, triton.cdiv(heads, block_h), num_splits)
    _decode_split_kernel[grid](
        q,
        pages,
        block_tables,
        context_lens,
        partial_out,
        partial_lse,
        scale * LOG2E,
        split_len,
        heads,
        value_dim,
        pe_dim,
        q.stride(0),
        q.stride(1),
        pages.stride(0),
        pages.stride(1),
        block_tables.stride(0),
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        PAGE_SIZE=pages.shape[1],
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_DC=block_dc,
        BLOCK_DR=block_dr,
        HAS_PE=pe_dim > 0,
        DOT_PRECISION=_dot_precision(q),
        num_warps=4,
        num_stages=2,
    )
    _decode_combine_kernel[(batch, heads)](
        partial_out,
        partial_lse,
        context_lens,
        out,
        split_len,
        value_dim,
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_DC=block_dc,
    )
    return out
