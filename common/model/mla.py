"""Multi-head Latent Attention (DeepSeek-V2/V3).

Per token and layer MLA keeps only a compressed latent `c_kv` (kv_lora_rank wide) and one shared rotary key
`k_pe` (qk_rope_head_dim wide): the cache entry is `[c_kv, k_pe]`, written into paged blocks. Two equivalent
ways to attend over it:

* naive (prefill): up-project every context latent with W_UK / W_UV (`kv_b_proj`) into per-head keys and
  values, then run causal flash attention. Cheap when many queries share the context.
* absorbed (decode): fold W_UK into the query (q_nope @ W_UK gives a query in latent space) and W_UV into the
  output, so attention runs straight on the cached latents: one shared "head" of width d_c + d_R, like MQA.
  Nothing is up-projected per context token, which is what makes MLA decode cheap.

Prefill chunks take whichever form is cheaper for the batch (a short chunk after a long cached prefix is
cheaper absorbed); decodes always run absorbed on the pages.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from common.config import ModelConfig
from common.kernels import (
    DecodePlan,
    bf16_gemm,
    cpu_extension,
    decode_needs_plan,
    flash_attn_varlen,
    paged_latent_decode,
    strips,
)
from common.kvcache import BlockPool
from common.model.linear import DerivedWeight, Linear, matmul, pack
from common.model.norm import RMSNorm
from common.model.rope import apply_rotary


@dataclass
class AttentionBatch:
    """Where a step's tokens live in the paged cache. Prefill-chunk tokens first, then one token per decode.

    Prefill sequence i computes queries for its last `q_len_i` positions over a context of `k_len_i` tokens
    (cached prefix + the chunk); `context_slots` lists the cache slots of all those contexts back to back.
    """

    slot_mapping: torch.Tensor  # int64 [T]: cache slot of each new token
    num_prefill_tokens: int
    cu_seqlens_q: torch.Tensor  # int32 [Bp + 1]
    cu_seqlens_k: torch.Tensor  # int32 [Bp + 1]
    max_seqlen_q: int
    max_seqlen_k: int
    context_slots: torch.Tensor  # int64 [sum k_len]
    prefill_qk: int  # sum of q_len x k_len over the prefill sequences (attention cost)
    block_tables: torch.Tensor  # int32 [Bd, max_blocks]
    context_lens: torch.Tensor  # int32 [Bd]
    block_size: int
    _decode_plan: DecodePlan | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.numel()

    @property
    def decode_plan(self) -> DecodePlan:
        """Where the decodes' pages are, worked out once for every layer of the step."""
        if self._decode_plan is None:
            self._decode_plan = DecodePlan.build(self.block_tables, self.context_lens, self.block_size)
        return self._decode_plan

    @classmethod
    def build(
        cls,
        prefills: list[tuple[list[int], int, int]],
        decodes: list[tuple[list[int], int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionBatch:
        """prefills: (block_table, num_cached_tokens, num_new_tokens); decodes: (block_table, context_len).

        The slots are worked out in Python lists, a handful of tensors made at the end: at a decode step of
        a few sequences each tensor operator would cost more than the arithmetic."""
        bs = block_size
        slot_mapping = [s for t, c, n in prefills for s in _slots(t, c, c + n, bs)]
        slot_mapping += [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in decodes]
        context_slots = [s for t, c, n in prefills for s in _slots(t, 0, c + n, bs)]
        q_lens = [n for _, _, n in prefills]
        k_lens = [c + n for _, c, n in prefills]
        width = max((len(t) for t, _ in decodes), default=1)
        decode_tables = [t + [0] * (width - len(t)) for t, _ in decodes]
        return cls(
            slot_mapping=int_tensor(slot_mapping, np.int64, device),
            num_prefill_tokens=sum(q_lens),
            cu_seqlens_q=int_tensor([0, *itertools.accumulate(q_lens)], np.int32, device),
            cu_seqlens_k=int_tensor([0, *itertools.accumulate(k_lens)], np.int32, device),
            max_seqlen_q=max(q_lens, default=0),
            max_seqlen_k=max(k_lens, default=0),
            context_slots=int_tensor(context_slots, np.int64, device),
            prefill_qk=sum(q * k for q, k in zip(q_lens, k_lens)),
            block_tables=int_tensor(decode_tables, np.int32, device).view(len(decodes), width),
            context_lens=int_tensor([n for _, n in decodes], np.int32, device),
            block_size=block_size,
        )


def int_tensor(values: list[int] | list[list[int]], dtype: type, device: torch.device | str) -> torch.Tensor:
    """A tensor of Python ints, by way of numpy: torch.tensor on a short list costs three times as much (9-10
    against 3 us here), and a decode step makes eight of them."""
    return torch.from_numpy(np.array(values, dtype=dtype)).to(device)


def _slots(table: list[int], start: int, stop: int, block_size: int) -> Iterator[int]:
    """The cache slots of positions start .. stop - 1 of a sequence whose pages are `table`."""
    first, last = start // block_size, (stop - 1) // block_size
    pages = (range(b * block_size, (b + 1) * block_size) for b in table[first : last + 1])
    offset = first * block_size
    return itertools.islice(itertools.chain.from_iterable(pages), start - offset, stop - offset)


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.interleaved = config.rope_interleave
        self.scale = config.softmax_scale
        h, bias = config.hidden_size, config.attention_bias
        q_out = self.num_heads * config.qk_head_dim

        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = Linear(h, q_out, bias=False)
        else:
            self.q_a_proj = Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.num_heads * self.v_dim, h, bias=bias)
        self._absorbed = DerivedWeight(self._split_kv_b)
        self._input_projection: torch.Tensor | None = None

    # ------------------------------------------------------------------ projections
    def pack(self) -> None:
        """Once loaded: the projections a decode step multiplies in the layout their kernel reads best
        (Linear.pack), and so the absorbed weights split out of kv_b_proj, which stays [in, out] for the
        naive prefill."""
        for name, module in self.named_children():
            if isinstance(module, Linear) and name != "kv_b_proj":
                module.pack()
        self._absorbed = DerivedWeight(lambda w: tuple(pack(t) for t in self._split_kv_b(w)))
        self._join_input_projections()

    def _join_input_projections(self) -> None:
        """The two products of the layer's input, the queries' (q_proj, or q_a_proj) and the latents'
        (kv_a_proj_with_mqa), as one weight with their columns side by side (vLLM's fused_qkv_a_proj),
        each module's weight a view of its part: a decode step then makes one product of them
        (csrc/decode_layer.cpp), one fixed cost instead of two (mini, 1 / 64 rows: 28 -> 23 / 61 -> 46 us).
        In strip or tile order the parts are whole strips, so each view is contiguous; weights kept
        otherwise, or with a bias, stay apart."""
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        latents = self.kv_a_proj_with_mqa
        parts = (first.weight_t, latents.weight_t)
        alike = all(strips.in_strip_order(w) for w in parts) and parts[0].shape[2:] == parts[1].shape[2:]
        if not alike or first.bias is not None or latents.bias is not None:
            return
        joined = torch.cat(parts, dim=1)  # [1, strips, ...]: the latents' strips after the queries'
        split = parts[0].shape[1]
        for module, view in ((first, joined[:, :split]), (latents, joined[:, split:])):
            weight = nn.Parameter(view, requires_grad=False)
            if hasattr(module.weight_t, "rows_major"):  # kept for torch's GEMM (linear.py's pack)
                weight.rows_major = module.weight_t.rows_major
            module.weight_t = weight
        self._input_projection = joined

    def input_projection(self) -> torch.Tensor | None:
        """The queries' and latents' first weights joined (_join_input_projections), or None."""
        return self._input_projection

    def fused(self, x: torch.Tensor) -> bool:
        """Whether the projections around the attention run as one C++ call each (csrc/mla.cpp, the same
        products as below): on CPU where the kernels build, in float32, or in bfloat16 where x's products go
        through the bf16 kernel (common/model/linear.py's matmul)."""
        return cpu_extension.runs(x) and (
            x.dtype is torch.float32 or bf16_gemm.suits(x, self.o_proj.weight_t, x.shape[0])
        )

    def queries(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, absorb: bool, fused: bool = False
    ) -> torch.Tensor:
        """[T, H, d_nope + d_R] with q_pe rotated; absorbed, [T, H, d_c + d_R] (absorb_query). fused: as
        self.fused(x) says, asked once a layer by the caller (each of these checks costs microseconds)."""
        if fused:
            w_uk = self.absorbed_weights()[0] if absorb else None
            return cpu_extension.module().mla_queries(
                x, *self.query_weights(), cos, sin, self.interleaved, self.num_heads, self.rope_dim, w_uk
            )
        q = (
            self.q_proj(x)
            if self.q_lora_rank is None
            else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        )
        q = q.view(x.shape[0], self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split_with_sizes([self.nope_dim, self.rope_dim], dim=-1)
        rotated = apply_rotary(q_pe, cos, sin, self.interleaved)
        if absorb:
            return self.absorb_query(q_nope, rotated)
        q_pe.copy_(rotated)  # into the query's own columns, where a cat would copy the whole query
        return q

    def query_weights(self) -> tuple[torch.Tensor | float | None, ...]:
        """What csrc/mla.cpp's mla_queries takes after x: q_proj's weight, or q_a_proj's (and its bias),
        q_a_layernorm's weight and q_b_proj's, then q_a_layernorm's eps (the others None)."""
        if self.q_lora_rank is None:
            return self.q_proj.weight_t, None, None, None, None, 0.0
        norm = self.q_a_layernorm
        return None, self.q_a_proj.weight_t, self.q_a_proj.bias, norm.weight, self.q_b_proj.weight_t, norm.eps

    def latent_weights(self) -> tuple[torch.Tensor | float | None, ...]:
        """What mla_cache_latents takes after x: kv_a_proj_with_mqa's weight and bias, kv_a_layernorm's
        weight and eps."""
        proj, norm = self.kv_a_proj_with_mqa, self.kv_a_layernorm
        return proj.weight_t, proj.bias, norm.weight, norm.eps

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The per-token cache entry [T, d_c + d_R]: normalised c_kv and rotated k_pe."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split_with_sizes([self.kv_rank, self.rope_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(c_kv), apply_rotary(k_pe, cos, sin, self.interleaved)], dim=-1)

    def cache_latents(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        cache: BlockPool,
        fused: bool = False,
    ) -> None:
        """Write the new tokens' latents into their cache slots."""
        if fused and cache.dtype is x.dtype and slots.dtype is torch.int64:
            cpu_extension.module().mla_cache_latents(
                x, *self.latent_weights(), cos, sin, self.interleaved, cache.layer(self.layer), slots
            )
        else:
            cache.write(self.layer, slots, self.latents(x, cos, sin))

    def output(self, o_latent: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """Absorbed attention's latent outputs [T, H, d_c] -> [T, hidden]: W_UV, then o_proj."""
        if fused:
            _, w_uv_t = self.absorbed_weights()
            return cpu_extension.module().mla_output(o_latent, w_uv_t, self.o_proj.weight_t, self.o_proj.bias)
        return self.o_proj(self.absorb_output(o_latent).flatten(1))

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, d_nope, d_c] and W_UV^T [H, d_c, d_v], split out of kv_b_proj once and kept contiguous
        (in strip order once packed)."""
        return self._absorbed(self.kv_b_proj.weight_t)

    def _split_kv_b(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w: kv_b_proj's [d_c, H * (d_nope + d_v)]."""
        heads = w.view(self.kv_rank, self.num_heads, self.nope_dim + self.v_dim)
        w_uk = heads[:, :, : self.nope_dim].permute(1, 2, 0).contiguous()
        w_uv_t = heads[:, :, self.nope_dim :].transpose(0, 1).contiguous()
        return w_uk, w_uv_t

    # ------------------------------------------------------------------ attention
    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch, cache: BlockPool
    ) -> torch.Tensor:
        p = batch.num_prefill_tokens
        naive = p > 0 and not self.absorbed_prefill_is_cheaper(batch)
        fused = self.fused(x)
        q = self.queries(x, cos, sin, absorb=not naive, fused=fused)
        self.cache_latents(x, cos, sin, batch.slot_mapping, cache, fused)
        context = cache.gather(self.layer, batch.context_slots) if p else None
        pages = cache.layer(self.layer)
        if naive:  # the prefill's outputs come per head; the decodes' through W_UV to join them
            out = self.attend_naive(q[:p], context, batch)
            if p < x.shape[0]:
                q_nope, q_pe = q[p:].split_with_sizes([self.nope_dim, self.rope_dim], dim=-1)
                decoded = self.attend_absorbed(self.absorb_query(q_nope, q_pe), pages, batch)
                out = torch.cat([out, self.absorb_output(decoded)])
            return self.o_proj(out.flatten(1))
        parts = []
        if p:
            parts.append(self.attend_absorbed_prefill(q[:p], context, batch))
        if p < x.shape[0]:
            parts.append(self.attend_absorbed(q[p:], pages, batch))
        return self.output(parts[0] if len(parts) == 1 else torch.cat(parts), fused)

    def attend_naive(self, q: torch.Tensor, context: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Up-project the context latents to per-head K/V and run causal flash attention: [Tq, H, d_v]."""
        c_kv, k_pe = context.split_with_sizes([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(-1, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split_with_sizes([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.num_heads, -1)], dim=-1)
        return flash_attn_varlen(
            q,
            k,
            v,
            batch.cu_seqlens_q,
            batch.cu_seqlens_k,
            batch.max_seqlen_q,
            batch.max_seqlen_k,
            self.scale,
        )

    def absorbed_prefill_is_cheaper(self, batch: AttentionBatch) -> bool:
        """Per head, naive costs k x d_c x (d_nope + d_v) to up-project the context plus q x k x
        (d_nope + d_R + d_v) to attend; absorbed costs q x d_c x (d_nope + d_v) to fold the weights plus
        q x k x (2 d_c + d_R). Short chunks over long contexts (prefix hits, small chunks) favour absorbed."""
        q, k, qk = batch.num_prefill_tokens, batch.context_slots.numel(), batch.prefill_qk
        fold = self.kv_rank * (self.nope_dim + self.v_dim)
        naive = k * fold + qk * (self.nope_dim + self.rope_dim + self.v_dim)
        absorbed = q * fold + qk * (2 * self.kv_rank + self.rope_dim)
        return absorbed < naive

    def absorb_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """[T, H, d_c + d_R]: W_UK folded into the query, so it scores latents directly."""
        w_uk, _ = self.absorbed_weights()
        return torch.cat([matmul(q_nope.transpose(0, 1), w_uk).transpose(0, 1), q_pe], dim=-1)

    def absorb_output(self, o_latent: torch.Tensor) -> torch.Tensor:
        """[T, H, d_c] latent outputs -> [T, H, d_v] through W_UV."""
        _, w_uv_t = self.absorbed_weights()
        return matmul(o_latent.transpose(0, 1), w_uv_t).transpose(0, 1)

    def attend_absorbed_prefill(
        self, q: torch.Tensor, context: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        """Causal flash attention of absorbed queries [Tq, H, d_c + d_R] over the gathered latents, one head
        for all (MQA): latent outputs [Tq, H, d_c]."""
        k = context[:, None, :].expand(-1, self.num_heads, -1)
        v = context[:, None, : self.kv_rank].expand(-1, self.num_heads, -1)
        return flash_attn_varlen(
            q,
            k,
            v,
            batch.cu_seqlens_q,
            batch.cu_seqlens_k,
            batch.max_seqlen_q,
            batch.max_seqlen_k,
            self.scale,
        )

    def attend_absorbed(self, q: torch.Tensor, pages: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Decode of absorbed queries [Td, H, d_c + d_R] on the paged latents directly: latent outputs
        [Td, H, d_c]."""
        plan = batch.decode_plan if decode_needs_plan(q) else None
        return paged_latent_decode(
            q, pages, batch.block_tables, batch.context_lens, self.scale, self.kv_rank, plan=plan
        )
