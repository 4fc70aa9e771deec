"""Triton attention kernels against the float64 reference: natively on CUDA, else in the Triton interpreter.

The interpreter is only chosen if TRITON_INTERPRET is set before the @triton.jit kernels are defined, i.e.
before triton_attention is first imported; common.kernels imports it lazily, so setting it here suffices.
The interpreter's 16-bit arithmetic is not faithful, so these tests use float32 and small shapes.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from common.kernels import triton_attention as ta  # noqa: E402
from tests.unit.test_attention_kernels import (  # noqa: E402
    TOL,
    decode_lengths,
    paged_case,
    reference_decode,
    reference_varlen,
    rel_err,
    varlen_case,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TILES = {"block_m": 16, "block_n": 16}


def test_kernels_run_natively_or_interpreted() -> None:
    """Fails loudly (instead of with a driver error) if triton_attention was imported before the env var."""
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(ta._prefill_kernel, InterpretedFunction), "TRITON_INTERPRET was set too late"


def on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 40])
def test_prefill_single_sequence_around_tile_sizes(length: int, causal: bool) -> None:
    q, k, v, cu_q, cu_k = varlen_case([length], [length], heads=2, d_qk=24, d_v=16)
    out = ta.flash_attn_varlen(*on_device(q, k, v, cu_q, cu_k), length, length, 0.3, causal, **SMALL_TILES)
    assert out.shape == (length, 2, 16) and out.dtype == torch.float32
    assert rel_err(out.cpu(), reference_varlen(q, k, v, cu_q, cu_k, 0.3, causal)) < TOL


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_chunks_after_cached_prefix_in_mixed_batch(causal: bool) -> None:
    q_lens = [1, 1, 5, 17, 32, 0, 20]
    k_lens = [1, 40, 20, 33, 50, 9, 20]
    q, k, v, cu_q, cu_k = varlen_case(q_lens, k_lens, heads=3, d_qk=24, d_v=20, seed=1)
    out = ta.flash_attn_varlen(
        *on_device(q, k, v, cu_q, cu_k), max(q_lens), max(k_lens), 0.25, causal, **SMALL_TILES
    )
    assert rel_err(out.cpu(), reference_varlen(q, k, v, cu_q, cu_k, 0.25, causal)) < TOL


def test_prefill_default_tiles() -> None:
    q, k, v, cu_q, cu_k = varlen_case([70, 3], [100, 3], heads=2, d_qk=48, d_v=32, seed=2)
    out = ta.flash_attn_varlen(*on_device(q, k, v, cu_q, cu_k), 70, 100, 0.2)
    assert rel_err(out.cpu(), reference_varlen(q, k, v, cu_q, cu_k, 0.2, True)) < TOL


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_decode_mixed_lengths_shuffled_blocks(block_size: int) -> None:
    lens = decode_lengths(block_size)
    q, pages, tables, context_lens, latents = paged_case(lens, block_size, heads=4, dim=40)
    out = ta.paged_latent_decode(*on_device(q, pages, tables, context_lens), 0.2, 32, block_n=16)
    assert out.shape == (len(lens), 4, 32) and out.dtype == torch.float32
    assert rel_err(out.cpu(), reference_decode(q, latents, 0.2, 32)) < TOL


@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("num_splits", [2, 3, 7, 1000])
def test_decode_splits_equal_no_split(block_size: int, num_splits: int) -> None:
    lens = decode_lengths(block_size)
    q, pages, tables, context_lens, latents = paged_case(lens, block_size, heads=4, dim=40, seed=2)
    args = on_device(q, pages, tables, context_lens)
    whole = ta.paged_latent_decode(*args, 0.2, 32, num_splits=1, block_n=16)
    split = ta.paged_latent_decode(*args, 0.2, 32, num_splits=num_splits, block_n=16)
    assert rel_err(split.cpu(), whole.cpu()) < TOL
    assert rel_err(split.cpu(), reference_decode(q, latents, 0.2, 32)) < TOL


def test_decode_more_heads_than_a_group_and_no_rope_part() -> None:
    q, pages, tables, context_lens, latents = paged_case([9, 70], 16, heads=20, dim=32, seed=4)
    out = ta.paged_latent_decode(*on_device(q, pages, tables, context_lens), 0.3, 32)
    assert rel_err(out.cpu(), reference_decode(q, latents, 0.3, 32)) < TOL
