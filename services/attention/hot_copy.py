"""An attention worker's hot copy: a bounded local cache of the KV-cache service's pages.

The service holds the authoritative pages under its block ids. A worker keeps `capacity` local pages and maps
the service's block ids onto them, the least recently used first out. Opening a micro-batch pins every block
its tables name and pulls from the service those that hold computed tokens but are not resident here (never
seen, evicted, or stale by the router's word); the new tokens then go to local pages and, after the last
layer, through to the service. So capacity bounds memory only: the service always has what an eviction drops.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import torch

from common.kvcache import BlockPool
from services.kvcache.client import RemoteBlockManager


class HotCopyFull(RuntimeError):
    """A micro-batch names more blocks than the hot copy can hold beside the other open micro-batches."""


class HotCopy:
    def __init__(self, pool: BlockPool, kv: RemoteBlockManager) -> None:
        self.pool, self.kv = pool, kv
        self._page: collections.OrderedDict[int, int] = collections.OrderedDict()  # block -> page, LRU first
        self._free = list(range(pool.num_blocks - 1, -1, -1))
        self._block_of_page = torch.full((pool.num_blocks,), -1, dtype=torch.int64)
        self._pins: collections.Counter[int] = collections.Counter()  # blocks of open micro-batches
        self.pulled = self.evicted = 0

    @property
    def capacity(self) -> int:
        return self.pool.num_blocks

    @property
    def resident(self) -> int:
        return len(self._page)

    def open(self, tables: list[list[int]], filled: Iterable[int], stale: Iterable[int]) -> list[list[int]]:
        """Pin the blocks of `tables` (service ids) and return the tables in local pages.

        `filled`: the blocks holding tokens computed before this micro-batch; `stale`: blocks whose local copy
        the router knows to be out of date. Both are pulled unless resident and up to date. Raises HotCopyFull
        when the pages do not fit, or the KV-cache service's error, and then changes nothing.
        """
        needed = dict.fromkeys(b for table in tables for b in table)
        stale = set(stale)
        absent = [b for b in needed if b not in self._page or b in stale]
        new = [b for b in absent if b not in self._page]
        if len(new) > len(self._free):
            evictable = sum(1 for b in self._page if not self._pins[b] and b not in needed)
            if len(new) > len(self._free) + evictable:
                raise HotCopyFull(
                    f"this micro-batch needs {len(needed)} blocks, the hot copy has {self.capacity} "
                    f"({len(self._pins)} pinned by other micro-batches)"
                )
        filled = set(filled)
        pull = [b for b in absent if b in filled or b in stale]
        data = self.kv.read_blocks(pull) if pull else None  # before any change: the service may fail
        for b in new:
            self._page[b] = page = self._take(needed)
            self._block_of_page[page] = b
        for b in needed:
            self._page.move_to_end(b)
            self._pins[b] += 1
        if pull:
            self.pool.write_blocks([self._page[b] for b in pull], data)
            self.pulled += len(pull)
        return [[self._page[b] for b in table] for table in tables]

    def close(self, tables: list[list[int]]) -> None:
        """Unpin what `open` pinned for these tables (the micro-batch is done or abandoned)."""
        for b in dict.fromkeys(b for table in tables for b in table):
            self._pins[b] -= 1
            if not self._pins[b]:
                del self._pins[b]

    def service_slots(self, local_slots: torch.Tensor) -> torch.Tensor:
        """Service slots (block * block_size + offset) of local slots: where the write-through goes."""
        bs, local = self.pool.block_size, local_slots.cpu()
        return self._block_of_page[local // bs] * bs + local % bs

    def _take(self, keep: dict[int, None]) -> int:
        if self._free:
            return self._free.pop()
        for b in self._page:  # least recently used first
            if not self._pins[b] and b not in keep:
                self.evicted += 1
                return self._page.pop(b)
        raise AssertionError("open() checked that a page is free or evictable")
