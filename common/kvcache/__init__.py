"""Paged MLA latent KV cache: physical pages (BlockPool) and their bookkeeping (BlockManager)."""

from common.kvcache.block_manager import (
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    BlockManager,
    BlockStats,
    NoFreeBlocksError,
    hash_block_tokens,
    validate_block_size,
)
from common.kvcache.block_pool import BlockPool, free_memory_bytes

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "BlockManager",
    "BlockStats",
    "BlockPool",
    "NoFreeBlocksError",
    "free_memory_bytes",
    "hash_block_tokens",
    "validate_block_size",
]
