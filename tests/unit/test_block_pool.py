"""BlockPool: slot writes/gathers, block copies and transfers, and KV-cache sizing."""

from __future__ import annotations

import pytest
import torch

from common.kvcache import DEFAULT_BLOCK_SIZE, BlockManager, BlockPool, block_pool

LAYERS, BLOCKS, BS, DIM = 3, 6, 4, 5  # DIM stands for kv_lora_rank + qk_rope_head_dim


def filled_pool(seed: int = 0) -> BlockPool:
    pool = BlockPool(LAYERS, BLOCKS, BS, DIM)
    pool.pages.copy_(torch.randn(pool.pages.shape, generator=torch.Generator().manual_seed(seed)))
    return pool


def test_shapes_and_sizes() -> None:
    pool = BlockPool(LAYERS, BLOCKS, BS, DIM, dtype=torch.bfloat16)
    assert pool.pages.shape == (LAYERS, BLOCKS, BS, DIM)
    assert not pool.pages.any()  # zero-initialised
    assert pool.layer(1).shape == (BLOCKS, BS, DIM)
    assert pool.layer(1).data_ptr() == pool.pages[1].data_ptr()  # a view, not a copy
    assert pool.capacity_tokens == BLOCKS * BS
    assert pool.nbytes == LAYERS * BLOCKS * BS * DIM * 2
    assert BlockPool.bytes_per_block(LAYERS, BS, DIM, torch.bfloat16) * BLOCKS == pool.nbytes
    assert DEFAULT_BLOCK_SIZE == 64


def test_write_then_gather_round_trip() -> None:
    pool = BlockPool(LAYERS, BLOCKS, BS, DIM)
    slots = torch.tensor([0, 5, 6, 23, 13])
    entries = torch.randn(len(slots), DIM)
    pool.write(1, slots, entries)
    torch.testing.assert_close(pool.gather(1, slots), entries)
    assert not pool.pages[0].any() and not pool.pages[2].any()  # other layers untouched
    # slot = block * block_size + offset
    torch.testing.assert_close(pool.layer(1)[23 // BS, 23 % BS], entries[3])
    assert pool.layer(1).count_nonzero(dim=-1).bool().sum() == len(slots)


def test_write_converts_dtype_and_checks_shape() -> None:
    pool = BlockPool(LAYERS, BLOCKS, BS, DIM, dtype=torch.bfloat16)
    entries = torch.randn(2, DIM, dtype=torch.float64)
    pool.write(0, torch.tensor([1, 2], dtype=torch.int32), entries)
    torch.testing.assert_close(pool.gather(0, torch.tensor([1, 2])), entries.to(torch.bfloat16))
    with pytest.raises(ValueError, match="entries"):
        pool.write(0, torch.tensor([1, 2]), torch.randn(2, DIM + 1))
    with pytest.raises(ValueError, match="entries"):
        pool.write(0, torch.tensor([1, 2, 3]), torch.randn(2, DIM))


def test_copy_blocks_copies_every_layer() -> None:
    pool = filled_pool()
    before = pool.pages.clone()
    pool.copy_blocks([(1, 4), (2, 5), (1, 0)])
    for src, dst in [(1, 4), (2, 5), (1, 0)]:
        torch.testing.assert_close(pool.pages[:, dst], before[:, src])
    torch.testing.assert_close(pool.pages[:, 1:4], before[:, 1:4])  # sources and bystanders untouched
    pool.copy_blocks([])
    # Sources are read before destinations are written.
    pool = filled_pool()
    before = pool.pages.clone()
    pool.copy_blocks([(0, 1), (1, 2)])
    torch.testing.assert_close(pool.pages[:, 2], before[:, 1])


def test_read_blocks_write_blocks_transfer() -> None:
    src, dst = filled_pool(1), BlockPool(LAYERS, BLOCKS, BS, DIM)
    data = src.read_blocks([3, 0])
    assert data.shape == (LAYERS, 2, BS, DIM)
    dst.write_blocks([5, 2], data)
    torch.testing.assert_close(dst.pages[:, 5], src.pages[:, 3])
    torch.testing.assert_close(dst.pages[:, 2], src.pages[:, 0])
    assert not dst.pages[:, [0, 1, 3, 4]].any()
    data.zero_()  # read_blocks returns a copy
    assert src.pages[:, 3].any()
    with pytest.raises(ValueError, match="data must be"):
        dst.write_blocks([1], torch.zeros(LAYERS, 2, BS, DIM))


def test_manager_and_pool_together() -> None:
    """The engine's sequence: slot_mapping -> write, fork -> CoW copy -> write; the parent's KV survives."""
    pool, mgr = BlockPool(1, 4, 2, DIM), BlockManager(4, 2)
    mgr.allocate("p", [1, 2, 3])
    kv = torch.randn(3, DIM)
    pool.write(0, torch.tensor(mgr.slot_mapping("p", 0, 3)), kv)
    mgr.mark_computed("p", 3)
    mgr.fork("p", "c")
    pool.copy_blocks(mgr.append_slots("c", [9]))
    new = torch.randn(1, DIM)
    pool.write(0, torch.tensor(mgr.slot_mapping("c", 3, 4)), new)
    torch.testing.assert_close(pool.gather(0, torch.tensor(mgr.slot_mapping("p", 0, 3))), kv)
    torch.testing.assert_close(
        pool.gather(0, torch.tensor(mgr.slot_mapping("c", 0, 4))), torch.cat([kv, new])
    )


def test_num_blocks_for_budget_bytes() -> None:
    per_block = BlockPool.bytes_per_block(27, 64, 576, torch.bfloat16)  # DeepSeek-V2-Lite geometry
    assert per_block == 27 * 64 * 576 * 2
    assert BlockPool.num_blocks_for_budget(10 * per_block + 7, 27, 64, 576, torch.bfloat16, "cpu") == 10
    assert BlockPool.num_blocks_for_budget(per_block, 27, 64, 576, torch.bfloat16, "cpu") == 1
    with pytest.raises(ValueError, match="holds no block"):
        BlockPool.num_blocks_for_budget(per_block - 1, 27, 64, 576, torch.bfloat16, "cpu")
    for bad in (0, -5, True, "1GB"):
        with pytest.raises(ValueError):
            BlockPool.num_blocks_for_budget(bad, 27, 64, 576, torch.bfloat16, "cpu")


def test_num_blocks_for_budget_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    per_block = BlockPool.bytes_per_block(2, 16, 8, torch.float32)
    monkeypatch.setattr(block_pool, "free_memory_bytes", lambda device: 100 * per_block)
    assert BlockPool.num_blocks_for_budget(0.5, 2, 16, 8, torch.float32, "cpu") == 50
    assert BlockPool.num_blocks_for_budget(1.0, 2, 16, 8, torch.float32, "cpu") == 100
    with pytest.raises(ValueError, match="holds no block"):
        BlockPool.num_blocks_for_budget(0.001, 2, 16, 8, torch.float32, "cpu")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            BlockPool.num_blocks_for_budget(bad, 2, 16, 8, torch.float32, "cpu")


def test_free_host_memory_is_measured() -> None:
    assert block_pool.free_memory_bytes("cpu") > 0
    assert BlockPool.num_blocks_for_budget(0.01, 1, 1, 1, torch.float32, "cpu") > 0


@pytest.mark.parametrize("bad", [0, 3, 48, 512, -1])
def test_invalid_block_size(bad: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        BlockPool(LAYERS, BLOCKS, bad, DIM)
    with pytest.raises(ValueError, match="power of two"):
        BlockPool.bytes_per_block(LAYERS, bad, DIM, torch.float32)


@pytest.mark.parametrize("good", [1, 2, 16, 64, 256])
def test_valid_block_sizes(good: int) -> None:
    assert BlockPool(1, 1, good, 1).capacity_tokens == good


def test_invalid_dimensions() -> None:
    for args in ((0, BLOCKS, BS, DIM), (LAYERS, 0, BS, DIM), (LAYERS, BLOCKS, BS, 0)):
        with pytest.raises(ValueError, match=">= 1"):
            BlockPool(*args)
