"""The C++ CPU kernels of common/kernels/cpu_extension.py against the torch code they replace: the prefill
and the paged latent decode attention against the float64 references; RMSNorm, the rotary embedding, the
gate and MLA's projections against the model's torch path; the routed experts against one product pair per
(token, expert). (The bfloat16 GEMMs: test_bf16_gemm.py.)"""

import itertools
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F

from common.config import ModelConfig, cpu_has_native_bf16
from common.kernels import bf16_gemm, cpu_attention, cpu_extension, grouped_experts, strips
from common.kvcache import BlockPool
from common.model import norm, rope
from common.model.mla import MLA, AttentionBatch
from common.model.moe import MLP, Gate, MoE
from common.model.rope import RotaryEmbedding
from tests.model_configs import CONFIGS
from tests.unit.test_attention_kernels import (
    TOL,
    decode_lengths,
    paged_case,
    reference_decode,
    reference_varlen,
    rel_err,
    varlen_case,
)

pytestmark = pytest.mark.skipif(
    not cpu_extension.available(), reason="the CPU kernels need AVX-512 or AVX2 with FMA, and a compiler"
)
needs_tiles = pytest.mark.skipif(not bf16_gemm.tiles(), reason="needs AMX tiles (csrc/gemm_amx.h)")


# ---------------------------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, d_qk, d_v", [(3, 24, 20), (2, 96, 64), (1, 160, 130)])
def test_prefill_matches_the_reference(causal: bool, heads: int, d_qk: int, d_v: int) -> None:
    """Chunks after cached prefixes, around the 64-query and 64-key tiles; a sequence without queries."""
    q_lens = [1, 1, 5, 63, 64, 65, 0, 130, 200]
    k_lens = [1, 40, 40, 63, 100, 65, 9, 130, 333]
    q, k, v, cu_q, cu_k = varlen_case(q_lens, k_lens, heads=heads, d_qk=d_qk, d_v=d_v, seed=1)
    out = cpu_attention.flash_attn_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), 0.25, causal)
    assert out.shape == (sum(q_lens), heads, d_v) and out.dtype == torch.float32
    assert rel_err(out, reference_varlen(q, k, v, cu_q, cu_k, 0.25, causal)) < TOL


def test_prefill_reads_keys_and_values_through_their_strides() -> None:
    """k and v as views of one fused tensor (naive MLA), or one latent row shared by every head (absorbed: the
    heads are then folded into the query rows)."""
    q, k, v, cu_q, cu_k = varlen_case([20, 70], [50, 70], heads=4, d_qk=24, d_v=24)
    kv = torch.cat([k, v], dim=-1)
    out = cpu_attention.flash_attn_varlen(q, kv[..., :24], kv[..., 24:], cu_q, cu_k, 70, 70, 0.3)
    assert rel_err(out, reference_varlen(q, k, v, cu_q, cu_k, 0.3, True)) < TOL
    latent = k[:, :1].expand(-1, 4, -1)
    out = cpu_attention.flash_attn_varlen(q, latent, latent[..., :16], cu_q, cu_k, 70, 70, 0.3)
    reference = reference_varlen(q, latent.contiguous(), latent[..., :16].contiguous(), cu_q, cu_k, 0.3, True)
    assert rel_err(out, reference) < TOL


def test_bfloat16_prefill_matches_the_torch_path() -> None:
    from common.kernels import flash_attention

    q, k, v, cu_q, cu_k = varlen_case([40, 300], [90, 300], heads=2, d_qk=48, d_v=32, seed=5)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = cpu_attention.flash_attn_varlen(q, k, v, cu_q, cu_k, 300, 300, 0.15)
    ref = flash_attention.flash_attn_varlen(q.float(), k.float(), v.float(), cu_q, cu_k, 300, 300, 0.15)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2  # the output's own bfloat16 rounding


@needs_tiles
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, d_qk, d_v", [(2, 96, 64), (1, 160, 128), (8, 160, 128)])  # mini's widths
def test_bfloat16_prefill_on_tiles_matches_the_reference(
    causal: bool, heads: int, d_qk: int, d_v: int
) -> None:
    """bfloat16 with dimensions in whole tiles runs on AMX's tiles, the probabilities rounded to bfloat16 for
    the value product: within the output's own rounding of the reference on the same bfloat16 inputs, around
    the 16-query blocks, 64-key steps and 256-query items, after cached prefixes, the last keys of k (which a
    tile would read past), on any thread count; keys and values read through their strides (one latent row
    for every head, as the absorbed prefill gives them: the heads then folded into the query rows)."""
    q_lens = [1, 5, 16, 17, 63, 64, 65, 0, 130, 257, 200]
    k_lens = [1, 40, 16, 48, 63, 100, 65, 9, 130, 300, 333]
    q, k, v, cu_q, cu_k = varlen_case(q_lens, k_lens, heads=heads, d_qk=d_qk, d_v=d_v, seed=2)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()

    def attend(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return cpu_attention.flash_attn_varlen(q, k, v, cu_q, cu_k, 257, 333, 0.1, causal)

    out = attend(k, v)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference_varlen(q.float(), k.float(), v.float(), cu_q, cu_k, 0.1, causal)) < 1e-2
    assert torch.equal(on_threads(1, lambda: attend(k, v)), out)
    latent = k[:, :1].expand(-1, heads, -1)
    shared = attend(latent, latent[..., :d_v])
    reference = reference_varlen(
        q.float(), latent.float(), latent[..., :d_v].float(), cu_q, cu_k, 0.1, causal
    )
    assert rel_err(shared, reference) < 1e-2


def test_prefill_is_the_same_on_any_thread_count() -> None:
    q, k, v, cu_q, cu_k = varlen_case([100, 7, 300], [150, 7, 300], heads=3, d_qk=32, d_v=32, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention.flash_attn_varlen(q, k, v, cu_q, cu_k, 300, 300, 0.2)
        torch.set_num_threads(2)
        two = cpu_attention.flash_attn_varlen(q, k, v, cu_q, cu_k, 300, 300, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_prefill_rejects_what_it_cannot_attend() -> None:
    q, k, v, cu_q, cu_k = varlen_case([5], [4], heads=1, d_qk=8, d_v=8)
    with pytest.raises(ValueError, match="5 queries cannot attend to 4 keys"):
        cpu_attention.flash_attn_varlen(q, k, v, cu_q, cu_k, 5, 4, 1.0)
    with pytest.raises(ValueError, match="end within"):
        cpu_attention.flash_attn_varlen(q[:4], k, v, cu_q, cu_k, 5, 4, 1.0, causal=False)
    with pytest.raises(ValueError, match="must all be float32 or all bfloat16"):
        cpu_attention.flash_attn_varlen(q, k.bfloat16(), v, cu_q, cu_k, 5, 4, 1.0, causal=False)


# ---------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("num_splits", [None, 1, 3, 1000])
@pytest.mark.parametrize("heads", [4, 20])  # the softmax runs 16 heads at a time: one part, or two
def test_decode_matches_the_reference(block_size: int, num_splits: int | None, heads: int) -> None:
    lens = decode_lengths(block_size) + [1300]
    q, pages, tables, context_lens, latents = paged_case(lens, block_size, heads=heads, dim=40, seed=1)
    out = cpu_attention.paged_latent_decode(q, pages, tables, context_lens, 0.2, 32, num_splits)
    assert out.shape == (len(lens), heads, 32) and out.dtype == torch.float32
    assert rel_err(out, reference_decode(q, latents, 0.2, 32)) < TOL


def test_decode_is_the_same_on_any_thread_count() -> None:
    q, pages, tables, context_lens, _ = paged_case([700, 3, 1100, 64], 16, heads=8, dim=72, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention.paged_latent_decode(q, pages, tables, context_lens, 0.1, 64)
        torch.set_num_threads(2)
        two = cpu_attention.paged_latent_decode(q, pages, tables, context_lens, 0.1, 64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


T = TypeVar("T")


def on_threads(count: int, run: Callable[[], T]) -> T:
    """run() with torch's thread count set to `count`, then set back."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(count)
        return run()
    finally:
        torch.set_num_threads(threads)


def alone_and_batched(
    q: torch.Tensor, pages: torch.Tensor, tables: torch.Tensor, context_lens: torch.Tensor, value_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """On two threads: every sequence's decode alone (concatenated), and the batch's."""

    def decode(b: slice) -> torch.Tensor:
        return cpu_attention.paged_latent_decode(q[b], pages, tables[b], context_lens[b], 0.1, value_dim)

    return on_threads(
        2, lambda: (torch.cat([decode(slice(b, b + 1)) for b in range(q.shape[0])]), decode(slice(None)))
    )


@pytest.mark.parametrize("heads", [8, 16, 40])  # with AVX2: one group; two of 8 heads; of 32 and 8
def test_decode_gives_a_sequence_the_same_bits_alone_or_in_a_batch(heads: int) -> None:
    # Alone, a short context is one split, fewer than the threads: its heads split between them.
    lens = [100, 3, 1100, 64]
    q, pages, tables, context_lens, latents = paged_case(lens, 16, heads=heads, dim=72, seed=3)
    alone, batch = alone_and_batched(q, pages, tables, context_lens, 64)
    assert torch.equal(alone, batch)
    assert rel_err(batch, reference_decode(q, latents, 0.1, 64)) < TOL


def test_decode_of_no_sequences_is_empty() -> None:
    tables, lens = torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    out = cpu_attention.paged_latent_decode(torch.empty(0, 4, 8), torch.zeros(2, 4, 8), tables, lens, 0.1, 6)
    assert out.shape == (0, 4, 6)


def test_bfloat16_decode_matches_the_torch_path() -> None:
    from common.kernels import flash_attention

    q, pages, tables, context_lens, _ = paged_case([1, 100, 1500], 64, heads=4, dim=72, seed=6)
    q, pages = q.bfloat16(), pages.bfloat16()
    out = cpu_attention.paged_latent_decode(q, pages, tables, context_lens, 0.1, 64)
    ref = flash_attention.paged_latent_decode(q.float(), pages.float(), tables, context_lens, 0.1, 64)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2  # the output's own bfloat16 rounding


@needs_tiles
@pytest.mark.parametrize("heads", [8, 20])  # one group of heads on the tiles, or two (16 and 4)
@pytest.mark.parametrize("block_size", [32, 64])
def test_bfloat16_decode_on_tiles_matches_the_reference(heads: int, block_size: int) -> None:
    """bfloat16 with dimensions in whole tiles (mini's latents: 160, 128 of them values) runs on AMX's tiles,
    the probabilities rounded to bfloat16 for the value product: within the output's own rounding of the
    reference on the same bfloat16 inputs, and a sequence's bits the same alone, in a batch, on any thread
    count."""
    lens = decode_lengths(block_size) + [1300]
    q, pages, tables, context_lens, latents = paged_case(lens, block_size, heads=heads, dim=160, seed=8)
    q, pages = q.bfloat16(), pages.bfloat16()
    alone, batch = alone_and_batched(q, pages, tables, context_lens, 128)
    one_thread = on_threads(
        1, lambda: cpu_attention.paged_latent_decode(q, pages, tables, context_lens, 0.1, 128)
    )
    ref = reference_decode(q.float(), [x.bfloat16().float() for x in latents], 0.1, 128)
    assert rel_err(batch, ref) < 1e-2
    assert torch.equal(alone, batch) and torch.equal(one_thread, batch)


def test_decode_rejects_what_it_cannot_read() -> None:
    q, pages, tables, context_lens, _ = paged_case([4, 5], 4, heads=1, dim=8)
    with pytest.raises(ValueError, match="context_lens must be in"):
        cpu_attention.paged_latent_decode(q, pages, tables, torch.tensor([4, 0]), 1.0, 8)
    with pytest.raises(ValueError, match="context_lens must be in"):
        cpu_attention.paged_latent_decode(q, pages, tables, torch.tensor([4, 10_000]), 1.0, 8)
    bad = tables.clone()
    bad[0, 0] = pages.shape[0]
    with pytest.raises(ValueError, match="block id outside"):
        cpu_attention.paged_latent_decode(q, pages, bad, context_lens, 1.0, 8)
    with pytest.raises(ValueError, match="value_dim"):
        cpu_attention.paged_latent_decode(q, pages, tables, context_lens, 1.0, 9)
    with pytest.raises(ValueError, match="must both be float32 or both bfloat16"):
        cpu_attention.paged_latent_decode(q, pages.bfloat16(), tables, context_lens, 1.0, 8)


# ---------------------------------------------------------------------------------------------- norm, rope


def torch_path(monkeypatch: pytest.MonkeyPatch, fn, *args):
    """What fn computes with the kernels switched off."""
    with monkeypatch.context() as m:
        m.setattr(cpu_extension, "runs", lambda x: False)
        return fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_torch_path(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = norm.RMSNorm(160, eps=1e-6).to(dtype)
    layer.weight.data = torch.randn(160, generator=gen).to(dtype)
    x = torch.randn(9, 200, generator=gen).to(dtype)[:, 20:180]  # a strided slice, as c_kv is
    with torch.no_grad():
        got, want = layer(x), torch_path(monkeypatch, layer, x)
    assert got.dtype == dtype and got.is_contiguous()
    assert_norms_agree(got, want)


def assert_norms_agree(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # rounded where the reference rounds; the mean of squares can differ in its last bit
        assert (got != want).float().mean() < 0.01
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_adds_into_the_residual_as_the_torch_path(monkeypatch, dtype: torch.dtype) -> None:
    """The pre-norm layer's residual add: the sum is rounded to the dtype, kept, and what is normalised."""
    gen = torch.Generator().manual_seed(2)
    layer = norm.RMSNorm(96, eps=1e-6).to(dtype)
    layer.weight.data = torch.randn(96, generator=gen).to(dtype)
    x, residual = (torch.randn(7, 96, generator=gen).to(dtype) for _ in range(2))
    with torch.no_grad():
        want, want_sum = torch_path(monkeypatch, layer, x, residual.clone())
        kept = residual.clone()
        got, got_sum = layer(x, kept)
    assert got_sum is kept and torch.equal(got_sum, x + residual)  # added in place, rounded like torch's add
    assert torch.equal(got_sum, want_sum)
    assert_norms_agree(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_the_torch_path(monkeypatch, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    mlp = MLP(64, 40).to(dtype)  # 40: a row ends in a partial vector
    for weight in (mlp.gate_up_proj, mlp.down_proj):
        weight.data = (torch.randn(weight.shape, generator=gen) * 0.2).to(dtype)
    x = torch.randn(9, 64, generator=gen).to(dtype) * 3
    with torch.no_grad():
        got, want = mlp(x), torch_path(monkeypatch, mlp, x)
    gate_up = x.float() @ mlp.gate_up_proj.float()
    act = cpu_extension.module().silu_and_mul(gate_up)
    torch.testing.assert_close(act, F.silu(gate_up[:, :40]) * gate_up[:, 40:], rtol=1e-6, atol=1e-6)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want)  # bfloat16: an activation may round the other way, rarely


def test_silu_and_mul_at_the_edges_of_the_vector_exp() -> None:
    """exp16's range (inf above 88, a floor below -87; on AVX2 its scaling by 2^n is two exact steps) and
    bfloat16's rounding of non-finite values, in a row whose tail fills part of a vector."""
    edges = [-200.0, -88.5, -87.5, -87.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 87.0, 88.5, 200.0]
    gate = torch.tensor([*edges, float("inf"), float("-inf"), float("nan"), 3.0, -3.0])
    gate_up = torch.cat([gate, torch.ones_like(gate)])[None]
    got = cpu_extension.module().silu_and_mul(gate_up)
    torch.testing.assert_close(got[0], F.silu(gate), rtol=1e-6, atol=1e-30, equal_nan=True)
    got_bf16 = cpu_extension.module().silu_and_mul(gate_up.bfloat16())
    want_bf16 = F.silu(gate.bfloat16().float()).bfloat16()
    torch.testing.assert_close(got_bf16[0], want_bf16, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", [(7, 32), (7, 4, 32), (7, 4, 40), (7, 64)])  # 16 pairs a vector, a tail
def test_rotary_matches_the_torch_path(monkeypatch, dtype, interleaved, shape) -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(*shape[:-1], 64 + shape[-1], generator=gen).to(dtype)
    x = wide[..., 64:]  # q_pe and k_pe are views into wider rows
    angles = torch.arange(7.0)[:, None] * torch.rand(shape[-1] // 2, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    got = rope.apply_rotary(x, cos, sin, interleaved)
    want = torch_path(monkeypatch, rope.apply_rotary, x, cos, sin, interleaved)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:  # the compiler may fuse a product into the subtraction: last-bit differences
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # each element rounded once from float32, alike
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------- routed experts


def packed(*weights: torch.Tensor, order=strips.strip_order) -> tuple[torch.Tensor, ...]:
    return tuple(order(w) for w in weights)


@pytest.mark.parametrize(
    ("dtype", "order"),
    [
        (torch.float32, strips.strip_order),
        (torch.bfloat16, strips.strip_order),
        pytest.param(torch.bfloat16, strips.tile_order, marks=needs_tiles),
    ],
)
def test_grouped_swiglu_matches_one_product_pair_per_expert(dtype: torch.dtype, order) -> None:
    """Experts with no pairs, one and many (the panels read from the strips, or AMX's tiles at any count);
    pairs of another shard (-1) left out; float32 products of the same values, up to the output's rounding."""
    gen = torch.Generator().manual_seed(7)
    tokens, k, experts, hidden, inter = 40, 3, 6, 96, 64
    ids = torch.randint(-1, experts - 1, (tokens, k), generator=gen)  # expert 5 never chosen
    ids[:, 0] = 2  # one crowded expert
    weights = torch.rand(tokens, k, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, hidden, 2 * inter, generator=gen) / 10).to(dtype)
    w2 = (torch.randn(experts, inter, hidden, generator=gen) / 10).to(dtype)
    want = torch.zeros(tokens, hidden)
    for t, j in itertools.product(range(tokens), range(k)):
        if (e := int(ids[t, j])) >= 0:
            gate, up = (x[t].float() @ w13[e].float()).chunk(2)
            want[t] += weights[t, j] * ((F.silu(gate) * up) @ w2[e].float())
    got = cpu_extension.module().grouped_swiglu(x, ids, weights, *packed(w13, w2, order=order))
    assert got.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}  # else bfloat16's defaults
    if order is strips.tile_order:  # activations and expert outputs rounded to bfloat16, as torch's GEMM does
        tolerance = {"rtol": 0.016, "atol": 0.01 * want.abs().max().item()}
    torch.testing.assert_close(got, want.to(dtype), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_swiglu_takes_the_kernel_for_packed_weights_and_agrees_with_the_torch_path(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """Packed weights go to the C++ call; the checkpoint's layout, or packed weights with x the call cannot
    take (float64), run the torch path: the same results up to the sums' order (the call's, rounded once from
    float32, against the torch path in float32: a CPU with bfloat16 units multiplies bfloat16 natively,
    rounding every intermediate)."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 64, generator=gen).to(dtype)
    ids = torch.randint(0, 16, (4, 2), generator=gen)
    weights = torch.rand(4, 2, generator=gen)
    w13, w2 = (
        torch.randn(16, 64, 96, generator=gen).to(dtype),
        torch.randn(16, 48, 64, generator=gen).to(dtype),
    )
    assert grouped_experts.takes(w13)
    calls = []
    kernel = cpu_extension.module().grouped_swiglu
    monkeypatch.setattr(cpu_extension.module(), "grouped_swiglu", lambda *a: calls.append(a) or kernel(*a))
    got = grouped_experts.grouped_swiglu(x, ids, weights, *packed(w13, w2))
    assert len(calls) == 1
    want = grouped_experts.grouped_swiglu(x.float(), ids, weights, w13.float(), w2.float()).to(dtype)
    unpacked = grouped_experts.grouped_swiglu(x.double(), ids, weights, *packed(w13, w2))
    assert len(calls) == 1  # neither went to the kernel
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tolerance)
    assert torch.equal(unpacked, grouped_experts.grouped_swiglu(x.double(), ids, weights, w13, w2))


def test_a_prefills_many_rows_an_expert_go_to_the_bfloat16_units_where_the_cpu_has_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past UNITS_ROWS rows an expert (on average) a CPU with bfloat16 units multiplies the experts in torch's
    GEMM, with the shared experts among them; elsewhere, and below it, the C++ call does. Both agree with the
    float32 torch path."""
    gen = torch.Generator().manual_seed(9)
    experts, k, shared = 8, 2, 1
    w13 = torch.randn(experts + shared, 64, 96, generator=gen).bfloat16()
    w2 = torch.randn(experts + shared, 48, 64, generator=gen).bfloat16()
    calls = []
    kernel = cpu_extension.module().grouped_swiglu
    monkeypatch.setattr(cpu_extension.module(), "grouped_swiglu", lambda *a: calls.append(a) or kernel(*a))
    for rows_each in (grouped_experts.UNITS_ROWS, grouped_experts.UNITS_ROWS + 1):
        tokens = rows_each * experts // k
        x = torch.randn(tokens, 64, generator=gen).bfloat16()
        ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
        weights = torch.rand(tokens, k, generator=gen)
        calls.clear()
        got = grouped_experts.grouped_swiglu(x, ids, weights, *packed(w13, w2), shared)
        units = rows_each > grouped_experts.UNITS_ROWS and cpu_has_native_bf16()
        assert len(calls) == (not units)
        want = grouped_experts.grouped_swiglu(x.float(), ids, weights, w13.float(), w2.float(), shared)
        # bfloat16 units round every intermediate to bfloat16: within a few of its ulps of the outputs' scale
        torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2 * want.abs().max().item())


def test_strip_order_puts_each_32_columns_of_every_row_together() -> None:
    w = torch.arange(2 * 3 * 40, dtype=torch.float32).view(2, 3, 40)
    packed = strips.strip_order(w)
    assert packed.shape == (2, 2, 3, 32) and packed.is_contiguous()
    assert torch.equal(packed[1, 0, 2], w[1, 2, :32])
    assert torch.equal(packed[1, 1, 2, :8], w[1, 2, 32:]) and not packed[:, 1, :, 8:].any()
    assert torch.equal(strips.unstrip(packed, 40), w)
    assert strips.strip_order(w[:0]).shape == (0, 2, 3, 32)  # a shard without experts


def test_tile_order_interleaves_each_strips_pairs_of_rows() -> None:
    w = torch.arange(2 * 64 * 40, dtype=torch.float32).view(2, 64, 40)
    tiles = strips.tile_order(w)
    assert tiles.shape == (2, 2, 32, 64) and strips.in_tile_order(tiles) and strips.rows(tiles) == 64
    assert torch.equal(tiles[1, 0, 5, :32:2], w[1, 10, :16])
    assert torch.equal(tiles[1, 0, 5, 1:32:2], w[1, 11, :16])
    assert torch.equal(tiles[1, 0, 5, 32::2], w[1, 10, 16:32])
    assert torch.equal(tiles[1, 1, 5, 1:16:2], w[1, 11, 32:]) and not tiles[:, 1, :, 16:].any()
    assert torch.equal(strips.unstrip(tiles, 40), w)


@needs_tiles
def test_the_kernels_order_is_tiles_for_bfloat16_rows_in_whole_tiles() -> None:
    w = torch.randn(2, 64, 40)
    assert strips.in_tile_order(bf16_gemm.kernel_order(w.bfloat16()))
    assert not strips.in_tile_order(bf16_gemm.kernel_order(w))  # float32: the strip kernel
    assert not strips.in_tile_order(bf16_gemm.kernel_order(w[:, :48].bfloat16()))  # 48 rows: not whole tiles


SHAPES = [
    (64, 4, 32, 128, 64),
    (7, 2, 8, 72, 40),
    (50, 3, 4, 100, 24),
    (1, 4, 16, 64, 48),
    (200, 2, 6, 40, 20),
]
TILE_SHAPES = [(64, 4, 32, 128, 64), (7, 2, 8, 96, 32), (200, 2, 6, 64, 32)]  # rows in whole tiles


@pytest.mark.parametrize(
    ("dtype", "order", "tokens", "k", "experts", "hidden", "inter"),
    [(d, strips.strip_order, *s) for d in (torch.float32, torch.bfloat16) for s in SHAPES]
    + [pytest.param(torch.bfloat16, strips.tile_order, *s, marks=needs_tiles) for s in TILE_SHAPES],
)
def test_grouped_swiglu_gives_a_token_the_same_bits_alone_or_in_a_crowd(
    dtype: torch.dtype, order, tokens: int, k: int, experts: int, hidden: int, inter: int
) -> None:
    """Alone, a token's experts get one row each (strip tiles); with the others, 1 to 12 rows (one tile), up
    to 24 (two) and beyond (panels widened from the strips), in widths that leave a part strip (72, 40, 100,
    20 columns): the same sums in the same order, so the same bits. In tile order, one row or 32 a block of
    AMX's tiles: a row's sums do not depend on the rows beside it either."""
    gen = torch.Generator().manual_seed(9)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    ids[0, 0] = -1
    weights = torch.rand(tokens, k, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, hidden, 2 * inter, generator=gen) / 10).to(dtype)
    w2 = (torch.randn(experts, inter, hidden, generator=gen) / 10).to(dtype)
    kept = packed(w13, w2, order=order)
    crowd = cpu_extension.module().grouped_swiglu(x, ids, weights, *kept)
    for t in range(0, tokens, max(1, tokens // 7)):
        one = slice(t, t + 1)
        alone = cpu_extension.module().grouped_swiglu(x[one], ids[one], weights[one], *kept)
        assert torch.equal(alone[0], crowd[t])


def test_grouped_swiglu_rejects_weights_not_in_strip_order() -> None:
    x, ids, weights = torch.randn(2, 8), torch.tensor([[0], [1]]), torch.ones(2, 1)
    w13, w2 = torch.randn(2, 8, 48), torch.randn(2, 24, 8)
    with pytest.raises(ValueError, match=r"w2 must be \[E, I, h\] in strip order"):
        cpu_extension.module().grouped_swiglu(x, ids, weights, w13, w2)
    strips = packed(w13, w2)
    with pytest.raises(ValueError, match=r"w13 must be 2 weights \[8, 48\] in strip order, \[2, 2, 8, 32\]"):
        cpu_extension.module().grouped_swiglu(x, ids, weights, strips[1], strips[1])


def test_grouped_swiglu_rejects_ids_it_does_not_hold() -> None:
    x, (w13, w2) = torch.randn(2, 8), packed(torch.randn(2, 8, 16), torch.randn(2, 8, 8))
    for bad in (2, -2):
        with pytest.raises(ValueError, match="outside -1..1"):
            cpu_extension.module().grouped_swiglu(x, torch.tensor([[0], [bad]]), torch.ones(2, 1), w13, w2)
    with pytest.raises(ValueError, match="must both be bfloat16 or both float32"):
        cpu_extension.module().grouped_swiglu(
            x, torch.tensor([[0], [1]]), torch.ones(2, 1), w13, w2.bfloat16()
        )


def moe_of(name: str, dtype: torch.dtype, expert_ids: list[int] | None = None) -> MoE:
    """A MoE layer of a test model (tests/model_configs.py) with random weights, not yet packed."""
    gen = torch.Generator().manual_seed(10)
    moe = MoE(ModelConfig.from_dict(CONFIGS[name]), expert_ids)
    for p in moe.parameters():
        p.data = (torch.randn(p.shape, generator=gen) / 4).to(dtype)
    return moe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_a_moe_layer_packs_its_shared_experts_with_its_routed_ones(name: str, dtype: torch.dtype) -> None:
    """Where the layer holds every routed expert, MoE.pack appends its shared MLP as experts of the routed
    width, which every token takes with weight 1: the layer's experts in one C++ call, the same output up to
    the sums' order (float32) or rounded once instead of three times (bfloat16); the torch path (an x of
    another dtype) gets it too."""
    moe = moe_of(name, dtype)
    x = torch.randn(9, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(11)).to(dtype)
    with torch.no_grad():
        want = moe(x)
        moe.pack()
        assert moe.shared_experts is None and moe.experts.num_shared == 2 and moe.experts.packed
        got, torch_path = moe(x), moe(x.double())
    assert got.dtype == dtype
    scale = want.abs().max().item()
    tolerance = (
        {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02 * scale}
    )
    torch.testing.assert_close(got, want, **tolerance)
    torch.testing.assert_close(torch_path.to(dtype), got, **tolerance)


@pytest.mark.parametrize("tokens", [bf16_gemm.MAX_ROWS, bf16_gemm.MAX_ROWS + 1, 100])
def test_past_max_rows_the_shared_experts_run_on_bfloat16_units_where_the_cpu_has_them(
    monkeypatch: pytest.MonkeyPatch, tokens: int
) -> None:
    """A packed layer on a CPU with bfloat16 units but no AMX, past the kernel's MAX_ROWS: the routed experts
    in the C++ call, the shared ones in torch's GEMM on the [K, N] copies RoutedExperts.pack keeps there.
    Elsewhere (with AMX, the experts in tile order), and up to MAX_ROWS, all in the call. The output agrees
    with the unpacked layer's either way."""
    moe = moe_of("v3", torch.bfloat16)
    x = torch.randn(tokens, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(12)).bfloat16()
    shared_in_call = []
    kernel = cpu_extension.module().grouped_swiglu
    monkeypatch.setattr(
        cpu_extension.module(), "grouped_swiglu", lambda *a: shared_in_call.append(a[-1]) or kernel(*a)
    )
    with torch.no_grad():
        want = moe(x)
        moe.pack()
        got = moe(x)
    kept = cpu_has_native_bf16() and not bf16_gemm.tiles()
    assert strips.in_tile_order(moe.experts.w13) == bf16_gemm.tiles()
    assert shared_in_call == [0 if kept and tokens > bf16_gemm.MAX_ROWS else 2]
    assert (getattr(moe.experts.w13, "shared_rows_major", None) is not None) == kept
    float32 = moe_of("v3", torch.float32)
    float32.pack()  # float32 products stay in the C++ call
    assert getattr(float32.experts.w13, "shared_rows_major", None) is None
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())


def test_a_shard_of_some_experts_keeps_the_shared_experts_apart() -> None:
    """The router's layers (no local routed expert) and an expert worker's shard: the shared experts stay
    where every token passes (the router), not with the routed experts that run elsewhere."""
    moe = moe_of("v2_lite", torch.float32, expert_ids=[0, 3])
    moe.pack()
    assert moe.experts.packed and moe.experts.num_shared == 0 and moe.shared_experts is not None


def test_grouped_swiglu_takes_no_routed_id_among_the_shared_experts() -> None:
    x, (w13, w2) = torch.randn(2, 8), packed(torch.randn(3, 8, 16), torch.randn(3, 8, 8))
    call = cpu_extension.module().grouped_swiglu
    assert call(x, torch.tensor([[0], [1]]), torch.ones(2, 1), w13, w2, shared=1).shape == (2, 8)
    with pytest.raises(ValueError, match="outside -1..1"):
        call(x, torch.tensor([[0], [2]]), torch.ones(2, 1), w13, w2, shared=1)
    with pytest.raises(ValueError, match="shared must lie in 0..3"):
        call(x, torch.tensor([[0], [1]]), torch.ones(2, 1), w13, w2, shared=4)


# ------------------------------------------------------------------------------------------------- gate


def gate_of(name: str, dtype: torch.dtype, seed: int) -> Gate:
    """The gate of a test model (tests/model_configs.py), with random weights and correction bias."""
    gen = torch.Generator().manual_seed(seed)
    gate = Gate(ModelConfig.from_dict(CONFIGS[name]))
    gate.weight.data = torch.randn(gate.weight.shape, generator=gen).to(dtype)
    if gate.e_score_correction_bias is not None:
        gate.e_score_correction_bias.copy_(torch.randn(gate.num_experts, generator=gen) / 10)
    return gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["v2_lite", "v2_group_yarn", "v3"])
def test_gate_matches_the_torch_path(monkeypatch, name: str, dtype: torch.dtype) -> None:
    """Greedy softmax (V2-Lite), group-limited with scaling (V2), sigmoid + bias over noaux_tc groups with
    renormalised weights (V3): the same experts, and their weights up to float32 summation order."""
    gate = gate_of(name, dtype, seed=4)
    x = torch.randn(33, gate.weight.shape[1], generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.no_grad():
        weights, ids = gate(x)
        want_weights, want_ids = torch_path(monkeypatch, gate, x)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    (ids, order), (want_ids, want_order) = ids.sort(dim=-1), want_ids.sort(dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(
        weights.gather(1, order), want_weights.gather(1, want_order), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", ["v2_group_yarn", "v3"])
def test_gate_gives_a_token_the_same_bits_alone_or_in_a_crowd(name: str) -> None:
    gate = gate_of(name, torch.float32, seed=6)
    x = torch.randn(70, gate.weight.shape[1], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        crowd = gate(x)
        for t in (0, 13, 69):
            alone = gate(x[t : t + 1])
            assert all(torch.equal(a[0], c[t]) for a, c in zip(alone, crowd))


def test_gate_rejects_what_it_cannot_score() -> None:
    x, w = torch.randn(2, 8), torch.randn(8, 6)
    gate = cpu_extension.module().moe_gate
    with pytest.raises(ValueError, match="unknown top-k method nearest"):
        gate(x, w, None, 2, "softmax", "nearest", 1, 1, False, 1.0)
    with pytest.raises(ValueError, match="n_group must divide the 6 experts"):
        gate(x, w, None, 2, "softmax", "noaux_tc", 4, 2, False, 1.0)
    with pytest.raises(ValueError, match="noaux_tc scores a group by its best two experts"):
        gate(x, w, None, 2, "sigmoid", "noaux_tc", 6, 2, False, 1.0)
    with pytest.raises(ValueError, match=r"weight must be contiguous float32 \[h, E\]"):
        gate(x, w.t(), None, 2, "softmax", "greedy", 1, 1, False, 1.0)
    with pytest.raises(ValueError, match=r"correction bias must be contiguous float32 \[6\]"):
        gate(x, w, torch.zeros(5), 2, "sigmoid", "greedy", 1, 1, False, 1.0)


@pytest.mark.parametrize("kernel", [True, False])
def test_gate_adds_its_choices_into_its_counts(monkeypatch, kernel: bool) -> None:
    """The expert load of a step (common/metrics.py's ExpertLoad): every call's choices added in."""
    gate = gate_of("v3", torch.float32, seed=10)
    gate.counts = torch.zeros(gate.num_experts, dtype=torch.int64)
    gen = torch.Generator().manual_seed(11)
    xs = [torch.randn(n, gate.weight.shape[1], generator=gen) for n in (1, 7, 40)]
    with torch.no_grad():
        ids = [gate(x)[1] if kernel else torch_path(monkeypatch, gate, x)[1] for x in xs]
    want = torch.bincount(torch.cat(ids).flatten(), minlength=gate.num_experts)
    assert gate.counts.sum().item() == 48 * gate.top_k and torch.equal(gate.counts, want)


# -------------------------------------------------------------------------------------------------- mla


# MLA's per-head widths in whole tiles (mini's are 64, 128 and 64), so that on AMX both absorbed products
# take the tiles, reading and writing their heads' rows at the [T, H, .] tensors' strides.
WHOLE_TILES = {"qk_nope_head_dim": 32, "kv_lora_rank": 64, "v_head_dim": 32}


def mla_case(
    name: str, dtype: torch.dtype, bias: bool, widths: dict | None = None
) -> tuple[MLA, RotaryEmbedding, BlockPool]:
    """Layer 0's MLA of a test model with random weights (biases too, if asked), and random pages."""
    gen = torch.Generator().manual_seed(8)
    config = ModelConfig.from_dict({**CONFIGS[name], "attention_bias": bias, **(widths or {})})
    attn = MLA(config, 0)
    for p in attn.parameters():
        p.data = (torch.randn(p.shape, generator=gen) / 4).to(dtype)
    pool = BlockPool(1, 12, 4, config.latent_dim, dtype, "cpu")
    pool.pages.copy_(torch.randn(pool.pages.shape, generator=gen))
    return attn, RotaryEmbedding(config), pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "name, bias, widths",
    [
        ("v2_lite", False, None),
        ("v3", False, None),
        ("v2_group_yarn", True, None),
        ("v2_lite", False, WHOLE_TILES),
    ],
)
@pytest.mark.parametrize("batch", ["decodes", "naive prefill", "absorbed prefill"])
def test_mla_projections_give_the_torch_paths_bits(monkeypatch, name, bias, widths, dtype, batch) -> None:
    """csrc/mla.cpp's calls (queries, cache entries, output) against MLA's torch code on the same kernels:
    with and without a low-rank query, interleaved rope, biases, per-head widths in whole tiles; decodes
    alone, and beside a prefill chunk attended naively (short context) or absorbed (a chunk of one after a
    long prefix)."""
    attn, rotary, pool = mla_case(name, dtype, bias, widths)
    decodes = [([0, 1], 7), ([2], 1), ([3, 4, 5], 9)]
    prefills = {"decodes": [], "naive prefill": [([6, 7], 0, 6)], "absorbed prefill": [([6, 7, 8], 10, 1)]}
    step = AttentionBatch.build(prefills[batch], decodes, pool.block_size)
    positions = [c + i for _, c, n in prefills[batch] for i in range(n)] + [n - 1 for _, n in decodes]
    cos, sin = rotary(torch.tensor(positions))
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(step.num_tokens, attn.o_proj.weight_t.shape[1], generator=gen).to(dtype)
    assert attn.fused(x)
    assert (batch == "absorbed prefill") == (batch != "decodes" and attn.absorbed_prefill_is_cheaper(step))
    fused = MLA.fused
    with torch.no_grad():
        out, pages = attn(x, cos, sin, step, pool), pool.pages.clone()
        monkeypatch.setattr(MLA, "fused", lambda self, x: False)
        assert torch.equal(attn(x, cos, sin, step, pool), out)
        attn.pack()  # bfloat16 projections in strip order (those a whole number of strips wide): same bits
        assert strips.in_strip_order(attn.o_proj.weight_t) == (dtype is torch.bfloat16)
        assert torch.equal(attn(x, cos, sin, step, pool), out)
        monkeypatch.setattr(MLA, "fused", fused)
        assert torch.equal(attn(x, cos, sin, step, pool), out)
    assert torch.equal(pool.pages, pages)


def test_mla_cache_latents_checks_every_slot_before_writing() -> None:
    attn, rotary, pool = mla_case("v2_lite", torch.float32, False)
    cos, sin = rotary(torch.tensor([3, 4]))
    x, before = torch.randn(2, attn.o_proj.weight_t.shape[1]), pool.pages.clone()
    with pytest.raises(IndexError, match="slot 48 outside 0..47"):
        attn.cache_latents(x, cos, sin, torch.tensor([5, 48]), pool, fused=True)
    with pytest.raises(ValueError, match=r"slots must be contiguous int64 \[2\]"):
        attn.cache_latents(x, cos, sin, torch.tensor([5]), pool, fused=True)
    assert torch.equal(pool.pages, before)


# --------------------------------------------------------------------------------------------- sampling


def lane_order(vocab: int) -> torch.Tensor:
    """The order csrc/sampling.cpp's inverse CDF runs over a row: lane by lane, tokens j, j + 16, ..."""
    padded = torch.arange(-(-vocab // 16) * 16).view(-1, 16).t().flatten()
    return padded[padded < vocab]


@pytest.mark.parametrize("vocab", [1, 37, 8192])
def test_inverse_cdf_draw_inverts_the_distribution_in_lane_order(vocab: int) -> None:
    """Against float64 cumulative probabilities in the kernel's order: away from a boundary between two tokens
    every u gives the token whose interval holds it; filtered tokens are never drawn, not even at u = 0 or
    the largest u below 1."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(vocab, generator=gen) * 3
    logits[torch.rand(vocab, generator=gen) < 0.5] = float("-inf")
    logits[vocab // 2] = 1.0  # one token at least survives
    order = lane_order(vocab)
    cdf = logits.double().softmax(0)[order].cumsum(0)
    u = torch.cat([torch.rand(2000, generator=gen), torch.tensor([0.0, 1 - 2**-24])])
    drawn = cpu_extension.module().inverse_cdf_draw(logits.expand(u.numel(), -1).contiguous(), u)
    want = order[torch.searchsorted(cdf, u.double(), right=True).clamp(max=vocab - 1)]
    clear = ((cdf[None, :] - u.double()[:, None]).abs() > 1e-5).all(dim=1)
    assert torch.equal(drawn[clear], want[clear])
    assert torch.isfinite(logits[drawn]).all()
