"""BlockManager: a stateful property test against a shadow model of page contents, plus targeted cases.

The shadow model writes, for every slot the caller would write, a fingerprint of the whole prefix ending at
that token (the KV of a token depends on all tokens before it). That lets the tests check that a prefix hit
returns pages holding exactly the prompt's KV, that computed KV is never clobbered, and that no write ever
lands in a block held by more than one block table.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from common.kvcache import BlockManager, NoFreeBlocksError, hash_block_tokens

ALPHABET = st.integers(0, 2)  # tiny vocabulary: prompts collide on prefixes, so hits really happen


def fingerprints(tokens: list[int], start: list[int] | None = None) -> list[int]:
    """fp[p] identifies tokens[: p + 1]; extends `start` (the fingerprints of a prefix) in place."""
    fps = start if start is not None else []
    for p in range(len(fps), len(tokens)):
        fps.append(hash((fps[-1] if fps else 0, p, tokens[p])))
    return fps


def state(mgr: BlockManager) -> dict:
    """Everything the manager holds (to prove a failed call changed nothing)."""
    snapshot = {name: copy.copy(value) for name, value in vars(mgr).items()}
    snapshot["_seqs"] = copy.deepcopy(mgr._seqs)
    return snapshot


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mgr: BlockManager | None = None

    @initialize(
        block_size=st.sampled_from([1, 2, 4, 16]),
        pool_size=st.integers(3, 10),
        prefix_caching=st.sampled_from([True, True, True, False]),
        bases=st.lists(st.lists(ALPHABET, min_size=32, max_size=32), min_size=1, max_size=3),
    )
    def setup(self, block_size: int, pool_size: int, prefix_caching: bool, bases: list[list[int]]) -> None:
        """Small pools (3-10 blocks of 16, up to 80 blocks of 1) so eviction and exhaustion happen."""
        self.bs = block_size
        self.mgr = BlockManager(pool_size * max(1, 8 // block_size), block_size, prefix_caching)
        self.bases = bases
        self.max_prompt = max(2 * block_size, 8)
        self.content: list[list[int | None]] = [[None] * block_size for _ in range(self.mgr.num_blocks)]
        self.tokens: dict[int, list[int]] = {}  # live sequences
        self.fps: dict[int, list[int]] = {}
        self.history: list[list[int]] = []  # computed token runs of past and present sequences
        self.next_id = 0

    # ------------------------------------------------------------------ helpers

    def holders(self) -> Counter[int]:
        """How many block tables hold each block, counted from the tables themselves (not refcounts)."""
        return Counter(b for sid in self.tokens for b in self.mgr.block_table(sid))

    def write(self, sid: int, start: int, end: int) -> None:
        """Write the KV of positions [start, end) into the shadow pages, refusing shared targets."""
        holders = self.holders()
        for p, slot in zip(range(start, end), self.mgr.slot_mapping(sid, start, end), strict=True):
            block, offset = divmod(slot, self.bs)
            assert holders[block] == 1, f"write of position {p} into block {block} held by {holders[block]}"
            self.content[block][offset] = self.fps[sid][p]

    def try_allocate(self, prompt: list[int]) -> int | None:
        mgr, sid = self.mgr, self.next_id
        self.next_id += 1
        expected = mgr.lookup_prefix(prompt)
        can = mgr.can_allocate(prompt)
        before = None if can else state(mgr)
        try:
            cached = mgr.allocate(sid, prompt)
        except NoFreeBlocksError:
            assert not can, "can_allocate said yes"
            assert state(mgr) == before, "a failed allocate changed the state"
            event("allocate: no free blocks")
            return None
        assert can, "can_allocate said no"
        assert cached == expected
        assert cached % self.bs == 0 and cached <= (len(prompt) - 1) // self.bs * self.bs
        self.tokens[sid], self.fps[sid] = list(prompt), fingerprints(prompt)
        table = mgr.block_table(sid)
        assert len(table) == -(-len(prompt) // self.bs)
        for p in range(cached):  # the reused pages hold exactly this prompt's KV
            assert self.content[table[p // self.bs]][p % self.bs] == self.fps[sid][p]
        assert mgr.num_computed_tokens(sid) == cached
        event("allocate: prefix hit" if cached else "allocate: miss")
        return sid

    def compute_upto(self, sid: int, upto: int) -> None:
        self.write(sid, self.mgr.num_computed_tokens(sid), upto)
        self.mgr.mark_computed(sid, upto)
        self.history.append(self.tokens[sid][:upto])

    def live(self, data: st.DataObject, pending: bool = False) -> int | None:
        """A live sequence (with pending tokens if asked); None if there is none."""
        sids = [s for s in sorted(self.tokens) if self.pending(s) or not pending]
        return data.draw(st.sampled_from(sids)) if sids else None

    def pending(self, sid: int) -> bool:
        return self.mgr.num_computed_tokens(sid) < len(self.tokens[sid])

    # ------------------------------------------------------------------ rules
    # Rules that need a (pending) sequence start one when there is none, instead of using preconditions:
    # swarm testing may disable `allocate`, and a machine with no enabled rule is an invalid example.

    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        """A prompt sharing a prefix with a base text, or re-requesting computed text (the hit path)."""
        if self.history and data.draw(st.booleans()):
            prompt = data.draw(st.sampled_from(self.history)) + data.draw(st.lists(ALPHABET, max_size=2))
        else:
            base = data.draw(st.sampled_from(self.bases))
            prompt = base[: data.draw(st.integers(0, self.max_prompt))]
            prompt = prompt + data.draw(st.lists(ALPHABET, max_size=self.bs + 1))
        if not prompt:
            with pytest.raises(ValueError):
                self.mgr.allocate(-1, prompt)
            return
        sid = self.try_allocate(prompt)
        if sid is not None and data.draw(st.booleans()):  # prefill right away (short runs reach hits)
            self.compute_upto(sid, len(prompt))

    @rule(data=st.data())
    def append(self, data: st.DataObject) -> None:
        mgr, sid = self.mgr, self.live(data)
        if sid is None:
            return self.allocate(data)
        new = data.draw(st.lists(ALPHABET, min_size=1, max_size=2 * self.bs))
        old_n, old_table = len(self.tokens[sid]), mgr.block_table(sid)
        was_shared = old_n % self.bs != 0 and self.holders()[old_table[-1]] > 1
        can = mgr.can_append(sid, len(new))
        before = None if can else state(mgr)
        try:
            copies = mgr.append_slots(sid, new)
        except NoFreeBlocksError:
            assert not can, "can_append said yes"
            assert state(mgr) == before, "a failed append changed the state"
            event("append: no free blocks")
            return
        assert can, "can_append said no"
        table = mgr.block_table(sid)
        if was_shared:  # copy-on-write of the partial, shared last block
            assert copies == [(old_table[-1], table[len(old_table) - 1])]
            src, dst = copies[0]
            self.content[dst] = list(self.content[src])
            event("append: copy-on-write")
        else:
            assert copies == []
            assert table[: len(old_table)] == old_table
        self.tokens[sid] += new
        fingerprints(self.tokens[sid], self.fps[sid])
        holders = self.holders()  # the slots this append will write belong to this sequence alone
        for slot in mgr.slot_mapping(sid, old_n, len(self.tokens[sid])):
            assert holders[slot // self.bs] == 1
        if data.draw(st.booleans()):
            self.compute_upto(sid, len(self.tokens[sid]))

    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        """Write the KV of some pending tokens (a whole prefill, a chunk of one, or decode) and mark it."""
        sid = self.live(data, pending=True)
        if sid is None:
            return self.allocate(data)
        done, n = self.mgr.num_computed_tokens(sid), len(self.tokens[sid])
        self.compute_upto(sid, data.draw(st.integers(done + 1, n)))

    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        mgr, parent = self.mgr, self.live(data)
        if parent is None:
            return self.allocate(data)
        child = self.next_id
        self.next_id += 1
        if self.pending(parent):
            with pytest.raises(ValueError):
                mgr.fork(parent, child)
            return
        mgr.fork(parent, child)
        assert mgr.block_table(child) == mgr.block_table(parent)
        assert mgr.num_computed_tokens(child) == mgr.num_computed_tokens(parent)
        self.tokens[child], self.fps[child] = list(self.tokens[parent]), list(self.fps[parent])

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        sid = self.live(data)
        if sid is None:
            return self.allocate(data)
        self.mgr.free(sid)
        del self.tokens[sid], self.fps[sid]
        assert not self.mgr.has_seq(sid)

    # ------------------------------------------------------------------ checks

    @invariant()
    def consistent(self) -> None:
        if self.mgr is None:
            return
        mgr = self.mgr
        mgr.check_invariants()
        assert mgr.num_used_blocks + mgr.num_cached_blocks + len(mgr._free) == mgr.num_blocks
        for sid, tokens in self.tokens.items():  # computed KV of live sequences is intact
            assert mgr.num_tokens(sid) == len(tokens)
            table = mgr.block_table(sid)
            for p in range(mgr.num_computed_tokens(sid)):
                assert self.content[table[p // self.bs]][p % self.bs] == self.fps[sid][p]

    def teardown(self) -> None:
        mgr = self.mgr
        if mgr is None:
            return
        for sid in list(self.tokens):
            mgr.free(sid)
        mgr.check_invariants()
        assert mgr.num_used_blocks == 0
        assert mgr.num_free_blocks() == mgr.num_blocks
        # No leak: the whole pool (free + evictable) can be handed to one new sequence.
        mgr.allocate("all", [7] * (mgr.num_blocks * self.bs))
        assert mgr.num_free_blocks() == 0
        mgr.check_invariants()
        mgr.free("all")
        mgr.check_invariants()


BlockManagerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestBlockManagerStateful = BlockManagerMachine.TestCase


# ---------------------------------------------------------------------- targeted tests


def computed(mgr: BlockManager, sid: str, tokens: list[int]) -> int:
    """Allocate and 'prefill' a sequence; returns the cached token count."""
    cached = mgr.allocate(sid, tokens)
    mgr.mark_computed(sid, len(tokens))
    return cached


def test_cow_after_fork_on_partial_last_block() -> None:
    mgr = BlockManager(num_blocks=8, block_size=4)
    computed(mgr, "p", [1, 2, 3, 4, 5, 6])  # 2 blocks, the last holds 2 of 4 tokens
    parent_table = mgr.block_table("p")
    mgr.fork("p", "c")
    assert mgr.can_append("c", 1)
    copies = mgr.append_slots("c", [7])
    child_table = mgr.block_table("c")
    assert copies == [(parent_table[1], child_table[1])]
    assert child_table[0] == parent_table[0] and child_table[1] != parent_table[1]
    assert mgr.block_table("p") == parent_table  # parent untouched
    assert mgr.slot_mapping("c", 6, 7) == [child_table[1] * 4 + 2]  # the write goes to the copy
    assert mgr.append_slots("p", [8]) == []  # the parent now owns its last block alone
    assert mgr.block_table("p") == parent_table
    mgr.check_invariants()


def test_fork_on_full_last_block_needs_no_copy() -> None:
    mgr = BlockManager(num_blocks=8, block_size=4)
    computed(mgr, "p", list(range(8)))
    mgr.fork("p", "c")
    assert mgr.append_slots("c", [9]) == []
    assert mgr.block_table("c")[:2] == mgr.block_table("p")
    mgr.check_invariants()


def test_fork_with_uncomputed_tokens_is_refused() -> None:
    mgr = BlockManager(num_blocks=8, block_size=4)
    mgr.allocate("p", [1, 2, 3])
    with pytest.raises(ValueError, match="not computed"):
        mgr.fork("p", "c")
    assert not mgr.has_seq("c")
    mgr.check_invariants()


def test_block_aligned_cached_prompt_reuses_all_but_the_last_block() -> None:
    mgr = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    assert computed(mgr, "a", prompt) == 0
    first = mgr.block_table("a")
    mgr.free("a")
    assert mgr.num_cached_blocks == 2
    assert mgr.lookup_prefix(prompt) == 4 == (len(prompt) - 1) // 4 * 4
    assert mgr.allocate("b", prompt) == 4
    table = mgr.block_table("b")
    assert table[0] == first[0] and len(table) == 2
    assert mgr.num_computed_tokens("b") == 4
    assert (mgr.prefix_queries, mgr.prefix_hits) == (16, 4)
    assert (mgr.prefix_query_blocks, mgr.prefix_hit_blocks) == (2, 1)
    mgr.check_invariants()
    # One more token and the whole aligned prefix is reused.
    mgr.mark_computed("b", 8)
    assert mgr.lookup_prefix(prompt + [99]) == 8


def test_shared_prefix_hits_a_referenced_block() -> None:
    mgr = BlockManager(num_blocks=8, block_size=2)
    computed(mgr, "a", [1, 2, 3, 4, 5])
    assert mgr.allocate("b", [1, 2, 3, 4, 9]) == 4
    assert mgr.block_table("b")[:2] == mgr.block_table("a")[:2]
    assert mgr.num_used_blocks == 4  # 3 for a, 1 fresh for b
    mgr.check_invariants()


def test_duplicate_content_keeps_the_first_registered_block() -> None:
    mgr = BlockManager(num_blocks=8, block_size=2)
    mgr.allocate("a", [1, 2, 3])
    mgr.allocate("b", [1, 2, 3])  # nothing computed yet: no hit, private copies
    mgr.mark_computed("a", 3)
    mgr.mark_computed("b", 3)
    first_a, first_b = mgr.block_table("a")[0], mgr.block_table("b")[0]
    mgr.free("b")
    assert mgr.num_cached_blocks == 0  # b's duplicate was never indexed: straight to the free list
    mgr.free("a")
    assert mgr.num_cached_blocks == 1
    mgr.allocate("c", [1, 2, 3])
    assert mgr.block_table("c")[0] == first_a != first_b
    mgr.check_invariants()


def test_lru_evicts_least_recently_used_first() -> None:
    mgr = BlockManager(num_blocks=4, block_size=2)
    a, b = [1, 1, 1, 1], [2, 2, 2, 2]
    computed(mgr, "a", a)
    computed(mgr, "b", b)
    mgr.free("a")
    mgr.free("b")
    assert mgr.num_cached_blocks == 4 and mgr.num_free_blocks() == 4
    assert mgr.lookup_prefix(a + [0]) == 4 and mgr.lookup_prefix(b + [0]) == 4
    mgr.allocate("x", [3])  # evicts a's tail block (a freed first, its tail before its head)
    assert mgr.lookup_prefix(a + [0]) == 2 and mgr.lookup_prefix(b + [0]) == 4
    mgr.allocate("y", [4])
    assert mgr.lookup_prefix(a + [0]) == 0 and mgr.lookup_prefix(b + [0]) == 4
    assert mgr.evictions == 2
    mgr.check_invariants()


def test_hit_refreshes_lru_position() -> None:
    mgr = BlockManager(num_blocks=3, block_size=2)
    computed(mgr, "a", [1, 1, 1])  # blocks: [1,1] indexed, [1] partial
    computed(mgr, "b", [2, 2])  # [2,2] indexed
    mgr.free("a")  # a's head goes to the LRU, its partial tail to the free list
    mgr.free("b")
    assert mgr.allocate("a2", [1, 1, 5]) == 2  # hit takes a's head out of the LRU
    mgr.free("a2")  # ... and puts it back as most recently used
    mgr.allocate("x", [3, 3, 3])  # needs 2: the free block, then the LRU's oldest = b's block
    assert mgr.lookup_prefix([2, 2, 0]) == 0
    assert mgr.lookup_prefix([1, 1, 0]) == 2
    mgr.check_invariants()


def test_no_free_blocks_leaves_state_unchanged() -> None:
    mgr = BlockManager(num_blocks=3, block_size=2)
    computed(mgr, "a", [1, 2, 3])  # 2 blocks, last partial
    snapshot = state(mgr)
    assert not mgr.can_allocate([5, 6, 7, 8])
    with pytest.raises(NoFreeBlocksError):
        mgr.allocate("b", [5, 6, 7, 8])
    assert state(mgr) == snapshot
    assert not mgr.can_append("a", 4)
    with pytest.raises(NoFreeBlocksError):
        mgr.append_slots("a", [4, 5, 6, 7])  # fills block 2, needs 2 more
    assert state(mgr) == snapshot
    # Copy-on-write needs a block too: fork then use up the last free block.
    mgr.fork("a", "c")
    mgr.allocate("d", [9])
    snapshot = state(mgr)
    assert not mgr.can_append("c", 1)
    with pytest.raises(NoFreeBlocksError):
        mgr.append_slots("c", [4])
    assert state(mgr) == snapshot
    mgr.check_invariants()


def test_can_allocate_counts_reused_and_revived_blocks() -> None:
    mgr = BlockManager(num_blocks=3, block_size=2)
    computed(mgr, "a", [1, 2, 3, 4, 5])  # 3 blocks, pool full
    assert not mgr.can_allocate([1, 2, 3, 4, 6, 7])  # 2 reused (referenced), 1 fresh: none free
    mgr.free("a")  # [1,2] and [3,4] cached, [5] free
    assert mgr.num_free_blocks() == 3
    assert mgr.can_allocate([1, 2, 3, 4, 6, 7])  # 2 revived + 1 fresh = 3
    assert not mgr.can_allocate([1, 2, 3, 4, 6, 7, 8])  # 4 blocks
    assert mgr.can_allocate([1, 2, 9], watermark_blocks=1)  # revive 1 + 1 fresh, leaves 1
    assert not mgr.can_allocate([1, 2, 9], watermark_blocks=2)


def test_mark_computed_and_slot_mapping() -> None:
    mgr = BlockManager(num_blocks=4, block_size=4)
    mgr.allocate("s", list(range(6)))
    table = mgr.block_table("s")
    assert mgr.slot_mapping("s", 3, 6) == [table[0] * 4 + 3, table[1] * 4, table[1] * 4 + 1]
    mgr.mark_computed("s", 3)  # chunked prefill: nothing full yet
    assert mgr.lookup_prefix(list(range(6))) == 0
    mgr.mark_computed("s", 6)
    assert mgr.lookup_prefix(list(range(6))) == 4
    with pytest.raises(ValueError):
        mgr.mark_computed("s", 5)  # going backwards
    with pytest.raises(ValueError):
        mgr.mark_computed("s", 7)  # beyond the tokens
    with pytest.raises(ValueError):
        mgr.slot_mapping("s", 4, 7)


def test_errors() -> None:
    mgr = BlockManager(num_blocks=4, block_size=4)
    mgr.allocate("s", [1])
    with pytest.raises(ValueError):
        mgr.allocate("s", [1])
    with pytest.raises(ValueError):
        mgr.allocate("t", [])
    with pytest.raises(KeyError):
        mgr.free("nope")
    with pytest.raises(KeyError):
        mgr.append_slots("nope", [1])
    with pytest.raises(ValueError):
        mgr.fork("s", "s")
    assert mgr.append_slots("s", []) == []
    for bad in (0, 3, 12, 512, -4):
        with pytest.raises(ValueError, match="power of two"):
            BlockManager(num_blocks=4, block_size=bad)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
    mgr.check_invariants()


def test_prefix_caching_disabled() -> None:
    mgr = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    computed(mgr, "a", [1, 2, 3])
    mgr.free("a")
    assert mgr.num_cached_blocks == 0 and mgr.num_free_blocks() == 4
    assert mgr.allocate("b", [1, 2, 3]) == 0
    mgr.check_invariants()


def test_stats() -> None:
    mgr = BlockManager(num_blocks=4, block_size=2)
    computed(mgr, "a", [1, 2, 3])
    assert (mgr.num_used_blocks, mgr.num_cached_blocks, mgr.usage, mgr.num_seqs) == (2, 0, 0.5, 1)
    mgr.free("a")
    assert (mgr.num_used_blocks, mgr.num_cached_blocks, mgr.usage, mgr.num_seqs) == (0, 1, 0.0, 0)


def test_hash_is_stable_and_chained() -> None:
    # A fixed value: the key must not depend on the process (PYTHONHASHSEED) or the platform.
    assert hash_block_tokens(b"", [1, 2, 3, 4]).hex() == "087a24230771ee662be37e5493b333d7"
    root = hash_block_tokens(b"", [1, 2])
    assert hash_block_tokens(root, [3, 4]) != hash_block_tokens(b"", [3, 4])
    assert len(root) == 16


def test_appends_in_order_stop_at_the_first_that_finds_no_room():
    mgr = BlockManager(4, 4)
    for seq in "abc":
        mgr.allocate(seq, [1, 2, 3, 4])  # a full page each: the next token needs a new one
    copies, done = mgr.append_slots_in_order([("a", [5]), ("b", [5]), ("c", [5])])
    assert (copies, done) == ([], 1)  # one free page: "b" and "c" are left as they were
    assert [mgr.num_tokens(s) for s in "abc"] == [5, 4, 4]
    mgr.free("a")
    assert mgr.append_slots_in_order([("b", [5]), ("c", [5])]) == ([], 2)
    mgr.check_invariants()
