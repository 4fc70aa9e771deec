"""Block manager: per-sequence block tables over a fixed set of physical latent KV pages.

Pure-Python bookkeeping (no torch), so the engine, the attention workers and the KV-cache service can
all run the same class. Every call costs O(blocks it touches): free blocks live in a deque, cached but
unreferenced blocks in an LRU ``OrderedDict`` and the prefix index is a dict; nothing scans the pool.

A block is always exactly one of:
  * free            -- refcount 0, holds nothing useful, in ``_free``;
  * cached          -- refcount 0, registered in the prefix index, in ``_lru`` (evictable, reusable on a hit);
  * referenced      -- refcount > 0, held by that many block tables.

Writes only ever go to a sequence's pending positions ``[num_computed, num_tokens)``; the manager keeps those
positions in blocks that the sequence owns alone (copy-on-write on append, fork only of computed sequences),
so a shared block is never written.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

DEFAULT_BLOCK_SIZE = 64  # the page size GPU MLA decode kernels are tuned for
MAX_BLOCK_SIZE = 256

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "BlockManager",
    "BlockStats",
    "NoFreeBlocksError",
    "hash_block_tokens",
    "validate_block_size",
]


class NoFreeBlocksError(RuntimeError):
    """Not enough free or evictable blocks; the manager's state is unchanged."""


def validate_block_size(block_size: int) -> int:
    """Kernels index pages with shifts and masks, so the page size must be a power of two."""
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or not 1 <= block_size <= MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise ValueError(f"block_size must be a power of two in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")
    return block_size


def hash_block_tokens(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Content key of a full block, chained over its parent so equal keys mean equal whole prefixes.

    Stable across processes and machines (unlike ``hash()``): the KV-cache service and every worker compute
    the same key for the same tokens. The first block's parent is ``b""``.
    """
    h = hashlib.blake2b(parent_hash, digest_size=16)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass
class _Seq:
    token_ids: list[int]
    block_table: list[int]
    num_computed: int = 0
    # Chained hashes of the computed full blocks (len == num_computed // block_size with prefix caching on).
    block_hashes: list[bytes] = field(default_factory=list)


def _check(condition: bool, message: str) -> None:
    # Not `assert`: invariants must still be checked under `python -O`.
    if not condition:
        raise AssertionError(message)


@dataclass(frozen=True)
class BlockStats:
    """One snapshot of the counters (a remote block manager answers it in one round trip)."""

    num_blocks: int
    used: int  # referenced by at least one sequence
    cached: int  # unreferenced, in the prefix index (evictable)
    free: int  # neither: used + cached + free == num_blocks
    usage: float
    prefix_queries: int
    prefix_hits: int
    evictions: int
    num_seqs: int


class BlockManager:
    """Maps sequences to physical blocks; shares full blocks by prefix hash, copies partial ones on write."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = validate_block_size(block_size)
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks  # set iff the block is in the index
        self._index: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached & unreferenced, least recently used first
        self._seqs: dict[Hashable, _Seq] = {}
        # Counters for metrics (tokens and blocks); only successful allocations count.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prefix_query_blocks = 0
        self.prefix_hit_blocks = 0
        self.evictions = 0

    # ------------------------------------------------------------------ capacity queries

    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: truly free plus cached-but-unreferenced (evictable)."""
        return len(self._free) + len(self._lru)

    def can_allocate(self, token_ids: Sequence[int], watermark_blocks: int = 0) -> bool:
        """Whether `allocate(token_ids)` would succeed and still leave `watermark_blocks` free."""
        need, _, _ = self._plan(self._tokens(token_ids))
        return self.num_free_blocks() - need >= watermark_blocks

    def can_append(self, seq_id: Hashable, num_new_tokens: int = 1) -> bool:
        """Whether `append_slots` of that many tokens would succeed (a copy-on-write block included)."""
        return self._append_need(self._seq(seq_id), num_new_tokens) <= self.num_free_blocks()

    # ------------------------------------------------------------------ sequence lifecycle

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], watermark_blocks: int = 0) -> int:
        """Build the block table of a new sequence; returns how many leading tokens are already cached.
        NoFreeBlocksError (state unchanged) unless `watermark_blocks` stay free or evictable afterwards.

        The block holding the last prompt token is never reused, so at least one token is computed (its
        logits are needed) and every position that will be written lies in a block this sequence owns.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        tokens = self._tokens(token_ids)
        need, hits, hashes = self._plan(tokens)
        if need + watermark_blocks > self.num_free_blocks():
            raise NoFreeBlocksError(
                f"allocate {seq_id!r}: needs {need} blocks (+{watermark_blocks} kept free), "
                f"{self.num_free_blocks()} free or evictable"
            )
        for block in hits:
            if self._ref[block] == 0:
                del self._lru[block]  # a hit revives the cached block: no longer evictable
            self._ref[block] += 1
        fresh = [self._take_free_block() for _ in range(self._blocks_for(len(tokens)) - len(hits))]
        cached = len(hits) * self.block_size
        self._seqs[seq_id] = _Seq(tokens, hits + fresh, cached, hashes)
        self.prefix_queries += len(tokens)
        self.prefix_hits += cached
        self.prefix_query_blocks += (len(tokens) - 1) // self.block_size
        self.prefix_hit_blocks += len(hits)
        return cached

    def append_slots(self, seq_id: Hashable, token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Grow a sequence by tokens whose KV is written next; returns copy-on-write (src, dst) block pairs.

        The caller must apply the copies to the BlockPool before writing the new tokens' KV.
        """
        seq = self._seq(seq_id)
        tokens = self._tokens(token_ids, allow_empty=True)
        need = self._append_need(seq, len(tokens))
        if need > self.num_free_blocks():
            raise NoFreeBlocksError(
                f"append to {seq_id!r}: needs {need} blocks, {self.num_free_blocks()} free or evictable"
            )
        copies = []
        if tokens and self._last_block_shared(seq):
            src, dst = seq.block_table[-1], self._take_free_block()
            self._ref[src] -= 1  # still >= 1: the other holders keep it
            seq.block_table[-1] = dst
            copies.append((src, dst))
        new_blocks = self._blocks_for(len(seq.token_ids) + len(tokens)) - len(seq.block_table)
        seq.block_table.extend(self._take_free_block() for _ in range(new_blocks))
        seq.token_ids.extend(tokens)
        return copies

    def append_slots_in_order(
        self, appends: Sequence[tuple[Hashable, Sequence[int]]]
    ) -> tuple[list[tuple[int, int]], int]:
        """append_slots for each (seq_id, token_ids) in order, stopping at the first one that finds no room:
        returns the copy-on-write pairs of the appends done and how many were done. A scheduler frees pages
        (preempts) and calls again with the rest; over the KV-cache service this is one round trip."""
        copies: list[tuple[int, int]] = []
        for done, (seq_id, token_ids) in enumerate(appends):
            try:
                copies += self.append_slots(seq_id, token_ids)
            except NoFreeBlocksError:
                return copies, done
        return copies, len(appends)

    def mark_computed(self, seq_id: Hashable, num_computed_tokens: int) -> None:
        """Record that the KV of the first `num_computed_tokens` tokens is written; index new full blocks."""
        seq = self._seq(seq_id)
        if not seq.num_computed <= num_computed_tokens <= len(seq.token_ids):
            raise ValueError(
                f"mark_computed {seq_id!r}: {num_computed_tokens} not in "
                f"[{seq.num_computed}, {len(seq.token_ids)}] (computed so far, tokens)"
            )
        seq.num_computed = num_computed_tokens
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else b""
        for i in range(len(seq.block_hashes), num_computed_tokens // bs):
            parent = hash_block_tokens(parent, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(parent)
            if parent not in self._index:  # an identical cached block wins: keep it, this one stays private
                block = seq.block_table[i]
                self._index[parent] = block
                self._block_hash[block] = parent

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Child shares every block of the parent (parallel sampling, beam search).

        Only a fully computed parent may be forked: otherwise both sequences would later write their pending
        positions into the same shared blocks.
        """
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} is already allocated")
        if parent.num_computed != len(parent.token_ids):
            raise ValueError(
                f"fork {parent_id!r}: {len(parent.token_ids) - parent.num_computed} tokens are not "
                "computed yet; fork after their KV is written and mark_computed was called"
            )
        for block in parent.block_table:
            self._ref[block] += 1
        self._seqs[child_id] = _Seq(
            list(parent.token_ids), list(parent.block_table), parent.num_computed, list(parent.block_hashes)
        )

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence; its indexed blocks stay cached (LRU) for later prefix hits."""
        seq = self._seq(seq_id)
        del self._seqs[seq_id]
        # Tail first: a prefix's later blocks are only useful together with its earlier ones, so they
        # should be the first to go when the LRU evicts.
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._block_hash[block] is not None:
                    self._lru[block] = None
                else:
                    self._free.append(block)

    # ------------------------------------------------------------------ queries

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id).block_table)

    def num_tokens(self, seq_id: Hashable) -> int:
        return len(self._seq(seq_id).token_ids)

    def num_computed_tokens(self, seq_id: Hashable) -> int:
        return self._seq(seq_id).num_computed

    def slot_mapping(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        """Physical slots (block * block_size + offset) of token positions [start, end)."""
        seq = self._seq(seq_id)
        if not 0 <= start <= end <= len(seq.token_ids):
            raise ValueError(f"slot_mapping {seq_id!r}: [{start}, {end}) outside [0, {len(seq.token_ids)})")
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def lookup_prefix(self, token_ids: Sequence[int]) -> int:
        """Tokens a new request with these ids would find cached (pure query: no state or counter change)."""
        return len(self.lookup_prefix_blocks(token_ids)) * self.block_size

    def lookup_prefix_blocks(self, token_ids: Sequence[int]) -> list[int]:
        """The cached blocks holding the longest reusable prefix of these ids (pure query)."""
        _, hits, _ = self._plan(self._tokens(token_ids))
        return hits

    def has_seq(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    # ------------------------------------------------------------------ stats

    @property
    def num_seqs(self) -> int:
        return len(self._seqs)

    def stats(self) -> BlockStats:
        return BlockStats(
            num_blocks=self.num_blocks,
            used=self.num_used_blocks,
            cached=self.num_cached_blocks,
            free=len(self._free),
            usage=self.usage,
            prefix_queries=self.prefix_queries,
            prefix_hits=self.prefix_hits,
            evictions=self.evictions,
            num_seqs=self.num_seqs,
        )

    def deferred(self) -> contextlib.AbstractContextManager:
        """Callers batch a step's ops in this block; a remote block manager sends them in one round trip."""
        return contextlib.nullcontext(self)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with refcount > 0."""
        return self.num_blocks - len(self._free) - len(self._lru)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with refcount 0 that are still in the prefix index (evictable)."""
        return len(self._lru)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    # ------------------------------------------------------------------ internals

    def _seq(self, seq_id: Hashable) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    @staticmethod
    def _tokens(token_ids: Sequence[int], allow_empty: bool = False) -> list[int]:
        tokens = [int(t) for t in token_ids]
        if not tokens and not allow_empty:
            raise ValueError("token_ids must not be empty")
        return tokens

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _plan(self, tokens: list[int]) -> tuple[int, list[int], list[bytes]]:
        """(blocks an allocation consumes from the free/evictable pool, prefix-hit blocks, their hashes)."""
        hits: list[int] = []
        hashes: list[bytes] = []
        if self.enable_prefix_caching:
            bs, parent = self.block_size, b""
            for i in range((len(tokens) - 1) // bs):
                parent = hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs])
                block = self._index.get(parent)
                if block is None:
                    break
                hits.append(block)
                hashes.append(parent)
        revived = sum(1 for block in hits if self._ref[block] == 0)  # cached hits leave the evictable pool
        return self._blocks_for(len(tokens)) - len(hits) + revived, hits, hashes

    def _last_block_shared(self, seq: _Seq) -> bool:
        return len(seq.token_ids) % self.block_size != 0 and self._ref[seq.block_table[-1]] > 1

    def _append_need(self, seq: _Seq, num_new_tokens: int) -> int:
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        if num_new_tokens == 0:
            return 0
        grow = self._blocks_for(len(seq.token_ids) + num_new_tokens) - len(seq.block_table)
        return grow + self._last_block_shared(seq)

    def _take_free_block(self) -> int:
        """A fresh block: a free one if any, else evict the least recently used cached block."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._lru.popitem(last=False)
            del self._index[self._block_hash[block]]
            self._block_hash[block] = None
            self.evictions += 1
        self._ref[block] = 1
        return block

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent. O(num_blocks + tables): for tests."""
        bs = self.block_size
        holders = [0] * self.num_blocks
        for sid, seq in self._seqs.items():
            n = len(seq.token_ids)
            _check(n >= 1, f"{sid!r}: empty sequence")
            _check(len(seq.block_table) == self._blocks_for(n), f"{sid!r}: table does not cover {n} tokens")
            _check(len(set(seq.block_table)) == len(seq.block_table), f"{sid!r}: a block appears twice")
            _check(0 <= seq.num_computed <= n, f"{sid!r}: computed {seq.num_computed} of {n} tokens")
            if self.enable_prefix_caching:
                _check(len(seq.block_hashes) == seq.num_computed // bs, f"{sid!r}: hashes out of sync")
            for i, block in enumerate(seq.block_table):
                holders[block] += 1
                h = self._block_hash[block]
                if h is not None:
                    _check(
                        (i + 1) * bs <= seq.num_computed, f"{sid!r}: indexed block {block} not full+computed"
                    )
                    _check(seq.block_hashes[i] == h, f"{sid!r}: indexed block {block} holds other tokens")
            # Every position that will still be written lies in a block this sequence owns alone.
            pending = range(seq.num_computed // bs, len(seq.block_table)) if seq.num_computed < n else ()
            for i in pending:
                block = seq.block_table[i]
                _check(self._ref[block] == 1, f"{sid!r}: pending writes into shared block {block}")
                _check(self._block_hash[block] is None, f"{sid!r}: pending writes into indexed block {block}")
        free, lru = set(self._free), set(self._lru)
        _check(len(free) == len(self._free), "a block is on the free list twice")
        _check(not free & lru, "a block is both free and cached")
        for block in range(self.num_blocks):
            _check(
                self._ref[block] == holders[block],
                f"block {block}: refcount {self._ref[block]} != {holders[block]} holding tables",
            )
            state = (block in free) + (block in lru) + (self._ref[block] > 0)
            _check(state == 1, f"block {block} is not exactly one of free / cached / referenced")
            if block in free:
                _check(self._block_hash[block] is None, f"free block {block} is still indexed")
            if block in lru:
                _check(self._block_hash[block] is not None, f"cached block {block} is not indexed")
        _check(
            len(self._index) == sum(h is not None for h in self._block_hash),
            "index and block hashes disagree",
        )
        for h, block in self._index.items():
            _check(self._block_hash[block] == h, f"index entry of block {block} disagrees with the block")
        if not self.enable_prefix_caching:
            _check(not self._index and not self._lru, "prefix caching is off but blocks are indexed")
        if not self._seqs:
            _check(self.num_used_blocks == 0, "no sequences, yet blocks are referenced")
