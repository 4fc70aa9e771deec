"""Torch flash-style attention kernels against a plain full-softmax reference computed in float64.

The helpers (random cases, references) are shared with test_triton_attention.py.
"""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import Tensor

from common.kernels import flash_attention as fa

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5


# ---------------------------------------------------------------------------------------------- helpers


def rel_err(out: Tensor, ref: Tensor) -> float:
    """Largest absolute error relative to the largest reference value."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def cu_seqlens(lens: list[int]) -> Tensor:
    return torch.tensor([0, *lens], dtype=torch.int64).cumsum(0).to(torch.int32)


def varlen_case(
    q_lens: list[int], k_lens: list[int], heads: int, d_qk: int, d_v: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Packed random q [sum q_lens, H, Dqk], k, v and their cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), heads, d_qk, generator=g)
    k = torch.randn(sum(k_lens), heads, d_qk, generator=g)
    v = torch.randn(sum(k_lens), heads, d_v, generator=g)
    return q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens)


def reference_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float, causal: bool
) -> Tensor:
    """Full softmax per sequence in float64, bottom-right aligned causal mask."""
    out = []
    for q0, q1, k0, k1 in zip(
        cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist(), strict=True
    ):
        qb, kb, vb = q[q0:q1].double(), k[k0:k1].double(), v[k0:k1].double()
        s = torch.einsum("qhd,khd->hqk", qb, kb) * scale
        if causal:
            q_len, k_len = q1 - q0, k1 - k0
            s = s.masked_fill(torch.arange(k_len) > torch.arange(q_len)[:, None] + k_len - q_len, -math.inf)
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vb))
    return torch.cat(out)


def paged_case(
    context_lens: list[int], block_size: int, heads: int, dim: int, seed: int = 0, spare_blocks: int = 3
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """q [B, H, D] and a paged cache holding each sequence's latents in shuffled physical blocks.

    Everything the kernel must not read is poisoned: block-table padding holds out-of-range ids and every
    page slot that is not part of a context (tails of last blocks, spare blocks) holds NaN.
    Returns q, pages, block_tables (int32), context_lens (int32) and the contiguous latents per sequence.
    """
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    physical = torch.randperm(num_blocks, generator=g)
    pages = torch.full((num_blocks, block_size, dim), math.nan)
    max_blocks = max(blocks_per_seq) + 2
    garbage = torch.randint(-(10**6), 10**6, (len(context_lens), max_blocks), generator=g)
    block_tables = torch.where(garbage.abs() < num_blocks, -1, garbage).to(torch.int32)
    latents, used = [], 0
    for b, (n, nb) in enumerate(zip(context_lens, blocks_per_seq, strict=True)):
        ids = physical[used : used + nb]
        used += nb
        block_tables[b, :nb] = ids.to(torch.int32)
        entries = torch.randn(n, dim, generator=g)
        padded = torch.full((nb * block_size, dim), math.nan)
        padded[:n] = entries
        pages[ids] = padded.view(nb, block_size, dim)
        latents.append(entries)
    q = torch.randn(len(context_lens), heads, dim, generator=g)
    return q, pages, block_tables, torch.tensor(context_lens, dtype=torch.int32), latents


def reference_decode(q: Tensor, latents: list[Tensor], scale: float, value_dim: int) -> Tensor:
    """Full softmax over each sequence's contiguous latents in float64: [B, H, value_dim]."""
    out = []
    for qb, kv in zip(q.double(), latents, strict=True):
        p = (qb @ kv.double().T * scale).softmax(-1)
        out.append(p @ kv.double()[:, :value_dim])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- prefill

SMALL_TILES = {"tile_q": 16, "tile_k": 32}  # lengths below straddle these tiles


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 31, 32, 33, 100])
def test_prefill_single_sequence_around_tile_sizes(length: int, causal: bool) -> None:
    q, k, v, cu_q, cu_k = varlen_case([length], [length], heads=2, d_qk=24, d_v=16)
    out = fa.flash_attn_varlen(q, k, v, cu_q, cu_k, length, length, 0.3, causal, **SMALL_TILES)
    assert out.shape == (length, 2, 16) and out.dtype == torch.float32
    assert rel_err(out, reference_varlen(q, k, v, cu_q, cu_k, 0.3, causal)) < TOL


@pytest.mark.parametrize("length", [255, 256, 257, 513, 1100])
def test_prefill_default_tiles(length: int) -> None:
    q, k, v, cu_q, cu_k = varlen_case([length], [length], heads=2, d_qk=32, d_v=16)
    out = fa.flash_attn_varlen(q, k, v, cu_q, cu_k, length, length, 0.2)
    assert rel_err(out, reference_varlen(q, k, v, cu_q, cu_k, 0.2, True)) < TOL


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_chunks_after_cached_prefix_in_mixed_batch(causal: bool) -> None:
    """Chunked prefill: queries are the last q_len of k_len positions; Dqk != Dv; q_len 0 is skipped."""
    q_lens = [1, 1, 5, 17, 32, 40, 0, 70]
    k_lens = [1, 40, 40, 33, 100, 40, 9, 130]
    q, k, v, cu_q, cu_k = varlen_case(q_lens, k_lens, heads=3, d_qk=24, d_v=20, seed=1)
    out = fa.flash_attn_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), 0.25, causal, **SMALL_TILES)
    assert out.shape == (sum(q_lens), 3, 20)
    assert rel_err(out, reference_varlen(q, k, v, cu_q, cu_k, 0.25, causal)) < TOL


def test_prefill_accepts_non_contiguous_inputs() -> None:
    q, k, v, cu_q, cu_k = varlen_case([20, 7], [50, 7], heads=4, d_qk=24, d_v=24)
    kv = torch.cat([k, v], dim=-1)  # k and v as strided views of one tensor, as a fused projection gives
    out = fa.flash_attn_varlen(q, kv[..., :24], kv[..., 24:], cu_q, cu_k, 20, 50, 0.3, **SMALL_TILES)
    assert rel_err(out, reference_varlen(q, k, v, cu_q, cu_k, 0.3, True)) < TOL


def test_prefill_rejects_more_queries_than_keys() -> None:
    q, k, v, cu_q, cu_k = varlen_case([5], [4], heads=1, d_qk=8, d_v=8)
    with pytest.raises(ValueError, match="cannot attend"):
        fa.flash_attn_varlen(q, k, v, cu_q, cu_k, 5, 4, 1.0)


# ---------------------------------------------------------------------------------------------- decode


def decode_lengths(block_size: int) -> list[int]:
    lengths = [1, block_size - 1, block_size, block_size + 1, 5 * block_size + 3]
    return sorted({n for n in lengths if n >= 1}, key=lengths.index)


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_decode_mixed_lengths_shuffled_blocks(block_size: int) -> None:
    lens = decode_lengths(block_size)
    q, pages, tables, context_lens, latents = paged_case(lens, block_size, heads=4, dim=40)
    out = fa.paged_latent_decode(q, pages, tables, context_lens, 0.2, value_dim=32)
    assert out.shape == (len(lens), 4, 32) and out.dtype == torch.float32
    assert rel_err(out, reference_decode(q, latents, 0.2, 32)) < TOL


@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("num_splits", [2, 3, 7, 1000])
def test_decode_splits_equal_no_split(block_size: int, num_splits: int) -> None:
    lens = decode_lengths(block_size)
    q, pages, tables, context_lens, latents = paged_case(lens, block_size, heads=4, dim=40, seed=2)
    whole = fa.paged_latent_decode(q, pages, tables, context_lens, 0.2, 32, num_splits=1)
    split = fa.paged_latent_decode(q, pages, tables, context_lens, 0.2, 32, num_splits=num_splits)
    assert rel_err(split, whole) < TOL
    assert rel_err(split, reference_decode(q, latents, 0.2, 32)) < TOL


def test_decode_long_context_default_splits_and_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A context past SPLIT_TOKENS gets several splits; a tiny gather budget forces one item per chunk."""
    lens = [2 * fa.SPLIT_TOKENS + 77, 3, 700]
    q, pages, tables, context_lens, latents = paged_case(lens, 64, heads=3, dim=48, seed=3)
    ref = reference_decode(q, latents, 0.15, 40)
    assert rel_err(fa.paged_latent_decode(q, pages, tables, context_lens, 0.15, 40), ref) < TOL
    monkeypatch.setattr(fa, "GATHER_BYTES", 1)
    assert rel_err(fa.paged_latent_decode(q, pages, tables, context_lens, 0.15, 40), ref) < TOL


def test_decode_value_dim_equal_to_entry_width() -> None:
    q, pages, tables, context_lens, latents = paged_case([9, 33], 16, heads=2, dim=32, seed=4)
    out = fa.paged_latent_decode(q, pages, tables, context_lens, 0.3, value_dim=32)
    assert rel_err(out, reference_decode(q, latents, 0.3, 32)) < TOL


def test_decode_rejects_empty_context() -> None:
    q, pages, tables, context_lens, _ = paged_case([4, 5], 4, heads=1, dim=8)
    with pytest.raises(ValueError, match="context_lens"):
        fa.paged_latent_decode(q, pages, tables, torch.tensor([4, 0], dtype=torch.int32), 1.0, 8)


def test_one_plan_serves_every_layer_of_a_step() -> None:
    """A plan built once gives each layer what a plan of its own would; a plan of other tables is refused."""
    q, pages, tables, context_lens, _ = paged_case([5, 40, 17], 8, heads=2, dim=16, seed=5)
    plan = fa.DecodePlan.build(tables, context_lens, pages.shape[1], num_splits=2)
    for layer in range(3):
        q_layer, pages_layer = q * (layer + 1), pages.roll(layer, dims=-1)
        expected = fa.paged_latent_decode(q_layer, pages_layer, tables, context_lens, 0.2, 8, num_splits=2)
        got = fa.paged_latent_decode(q_layer, pages_layer, tables, context_lens, 0.2, 8, plan=plan)
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="the plan is for 3 sequences"):
        fa.paged_latent_decode(q[:2], pages, tables[:2], context_lens[:2], 0.2, 8, plan=plan)


# ---------------------------------------------------------------------------------------------- bfloat16


def test_bfloat16_prefill_close_to_float32() -> None:
    q, k, v, cu_q, cu_k = varlen_case([40, 300], [90, 300], heads=2, d_qk=48, d_v=32, seed=5)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = fa.flash_attn_varlen(q, k, v, cu_q, cu_k, 300, 300, 0.15)
    ref = fa.flash_attn_varlen(q.float(), k.float(), v.float(), cu_q, cu_k, 300, 300, 0.15)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2


def test_bfloat16_decode_close_to_float32() -> None:
    q, pages, tables, context_lens, _ = paged_case([1, 100, 1500], 64, heads=4, dim=72, seed=6)
    q, pages = q.bfloat16(), pages.bfloat16()
    out = fa.paged_latent_decode(q, pages, tables, context_lens, 0.1, 64)
    ref = fa.paged_latent_decode(q.float(), pages.float(), tables, context_lens, 0.1, 64)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2


# ---------------------------------------------------------------------------------------------- memory

MEMORY_SCRIPT = """
import torch
from common.kernels.flash_attention import flash_attn_varlen

torch.set_num_threads(1)  # the footprint does not depend on threads; one keeps a busy machine quick

def status(key: str) -> int:  # bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def extra_peak(fn) -> int:  # how far the resident set peaks above where it was before fn
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before

T, H, D = 8192, 2, 64
q, k, v = (torch.randn(T, H, D) for _ in range(3))
cu = torch.tensor([0, T], dtype=torch.int32)
warm = torch.tensor([0, 600], dtype=torch.int32)
flash_attn_varlen(q[:600], k[:600], v[:600], warm, warm, 600, 600, 0.125)  # thread pools, allocator caches
ours = extra_peak(lambda: flash_attn_varlen(q, k, v, cu, cu, T, T, 0.125))
control = extra_peak(lambda: torch.einsum("qhd,khd->hqk", q, k).softmax(-1))  # materialises the scores
print(ours, control)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux peak-RSS accounting")
def test_prefill_8k_peak_memory_far_below_score_matrix() -> None:
    """In a fresh process, the peak resident set must grow far less than one [8k, 8k] x H score matrix.

    The control (a plain einsum over the same inputs) proves the measurement does see such a matrix.
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    ours, control = map(int, result.stdout.split())
    score_matrix = 8192 * 8192 * 4 * 2
    assert control > 0.9 * score_matrix, f"measurement blind: control grew {control / 2**20:.0f} MiB"
    assert ours < score_matrix / 16, f"flash attention grew {ours / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------- dispatch

DISPATCH_SCRIPT = """
import sys, torch
import common.kernels as kernels
q = torch.randn(3, 2, 8)
cu = torch.tensor([0, 3], dtype=torch.int32)
out = kernels.flash_attn_varlen(q, q, q, cu, cu, 3, 3, 0.5)
pages = torch.randn(2, 4, 8)
out = kernels.paged_latent_decode(q, pages, torch.tensor([[1, 0]] * 3, dtype=torch.int32),
                                  torch.tensor([1, 4, 7], dtype=torch.int32), 0.5, 6)
assert out.shape == (3, 2, 6)
assert "common.kernels.triton_attention" not in sys.modules, "Triton kernels defined for CPU tensors"
"""


def test_public_api_uses_torch_on_cpu_without_defining_triton_kernels() -> None:
    script = textwrap.dedent(DISPATCH_SCRIPT)
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=120)
