"""`RemoteBlockManager`: the BlockManager interface the engine's Scheduler and ModelRunner use, implemented
over the KV-cache service's gRPC API, plus page transfer helpers for attention workers.

    blocks = RemoteBlockManager("127.0.0.1:50060", namespace="router-0/")
    scheduler = Scheduler(config, blocks)  # same decisions as over a local BlockManager

Round trips (one gRPC call each unless noted):

=======================================  =====================================================================
call                                     round trips
=======================================  =====================================================================
can_allocate / can_append                1 (CanAllocate / CanAppend: pure queries, exact)
allocate / append_slots / fork           1 (Allocate / AppendSlots / Fork; a Batch if deferred ops are queued)
                                         append_slots inside ``deferred()``: 0 (queued) when the tokens fit
                                         the sequence's last block and no fork may share it
append_slots_in_order                    1 Batch for all of them; 0 inside ``deferred()`` when every one
                                         fits its last block as above
mark_computed / free                     1 (MarkComputed / Free); 0 inside ``deferred()``: queued, sent with
                                         the next call (one Batch) or when the outermost ``deferred()`` exits
block_table / has_seq / num_tokens /     0: answered from the local copy kept of this client's sequences
num_computed_tokens / slot_mapping
num_blocks / block_size                  0: read once at connect
stats()                                  1 (Stats): every counter in one snapshot
num_free_blocks() / num_used_blocks /    1 each (a Stats each)
num_cached_blocks / usage / num_seqs /
prefix_queries / prefix_hits / evictions
lookup_prefix / lookup_prefix_blocks     1 (LookupPrefix)
read_blocks / write_blocks /             1 (ReadBlocks / WriteBlocks / WriteEntries)
write_entries
=======================================  =====================================================================

The engine runs each step's scheduling and bookkeeping inside ``blocks.deferred()``, and the Scheduler tries
an allocation, or all of a step's decode appends in one call, and preempts when refused instead of asking
first. A step therefore costs one round trip per admission, one Batch for its decodes when any of them needs
a new page (one step in block_size) or a copy on write (and one more per preemption), one Batch for
everything queued, and one ``stats()`` for the metrics.

Semantics are the BlockManager's: NoFreeBlocksError when there is no room (state unchanged), KeyError for an
unknown sequence, ValueError for other bad input. Sequence ids travel as ``namespace + str(seq_id)``, so
clients sharing one service use distinct namespaces. The local tables mirror only what this client did: a
sequence is owned by the client that allocated or forked it. Not thread-safe (neither is BlockManager).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from common.kvcache import BlockStats, NoFreeBlocksError
from common.rpc.codec import tensor_from_proto, tensor_to_proto
from common.rpc.server import OPTIONS
from latentmoe.v1 import kvcache_pb2, kvcache_pb2_grpc
from services.kvcache.service import ERROR_METADATA_KEY, UNKNOWN_SEQUENCE

__all__ = ["RemoteBlockManager"]


@dataclass
class _Mirror:
    """What this client knows of one of its sequences (all returned or implied by the RPCs)."""

    block_table: list[int]
    num_tokens: int
    num_computed: int
    forked: bool = False  # may share its partial last block (until its next append copies it on write)

    def copy(self) -> _Mirror:
        return _Mirror(list(self.block_table), self.num_tokens, self.num_computed, self.forked)


def _raise_op_error(result: Any) -> None:
    """A Batch result's error as the exception BlockManager would have raised."""
    if result.unknown_sequence:
        raise KeyError(result.error)
    if result.error:
        raise ValueError(result.error)


class RemoteBlockManager:
    """BlockManager over gRPC (see the module docstring for the round trips of every call)."""

    def __init__(self, target: str | grpc.Channel, namespace: str = "", timeout: float | None = 30.0) -> None:
        self._owns_channel = isinstance(target, str)
        self.channel = grpc.insecure_channel(target, options=OPTIONS) if isinstance(target, str) else target
        self.stub = kvcache_pb2_grpc.KVCacheStub(self.channel)
        self.namespace = namespace
        self.timeout = timeout
        self._seqs: dict[Hashable, _Mirror] = {}
        # Deferred ops: (op, the sequence it touches, its mirror before the op or None if it had none).
        self._pending: list[tuple[kvcache_pb2.KVOp, Hashable, _Mirror | None]] = []
        self._defer_depth = 0
        info = self._rpc(self.stub.Stats, kvcache_pb2.KVStatsRequest())
        self.num_blocks = info.num_blocks
        self.block_size = info.block_size
        self.num_layers = info.num_layers
        self.entry_dim = info.entry_dim
        self.dtype: torch.dtype = getattr(torch, info.dtype)
        self.enable_prefix_caching = info.enable_prefix_caching

    # ------------------------------------------------------------------ plumbing

    def _wire(self, seq_id: Hashable) -> str:
        return f"{self.namespace}{seq_id}"

    def _rpc(self, method: Any, request: Any) -> Any:
        """One call; INVALID_ARGUMENT becomes the KeyError / ValueError BlockManager would raise."""
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            trailing = dict(e.trailing_metadata() or ())
            if trailing.get(ERROR_METADATA_KEY) == UNKNOWN_SEQUENCE:
                raise KeyError(e.details()) from None
            raise ValueError(e.details()) from None

    def _query(self, method: Any, request: Any) -> Any:
        self.flush()  # the service must have seen every earlier op of this client first
        return self._rpc(method, request)

    def _mutate(self, kind: str, unary: Any, request: Any) -> Any:
        """One op: its unary RPC, or, with deferred ops queued, one Batch carrying them and this op.

        Unary responses and Batch results share the field names the callers read (ok, block_table, ...).
        """
        if not self._pending:
            return self._rpc(unary, request)
        result = self._send_batch([kvcache_pb2.KVOp(**{kind: request})])[0]
        _raise_op_error(result)
        return result

    def _send_batch(self, extra: Sequence[kvcache_pb2.KVOp] = ()) -> list[Any]:
        """Send the queued ops and then `extra` in one Batch; raise for the first queued op that failed, and
        return the results of `extra` (the service stops at the first op that fails)."""
        pending, self._pending = self._pending, []
        ops = [op for op, _, _ in pending] + list(extra)
        results = self._rpc(self.stub.Batch, kvcache_pb2.BatchRequest(ops=ops)).results
        for i, ((_, _, _), result) in enumerate(zip(pending, results, strict=False)):
            if not result.ok:
                # This op and the later ones did not run on the service: undo their local effects.
                for _, seq_id, before in reversed(pending[i:]):
                    if before is None:
                        self._seqs.pop(seq_id, None)
                    else:
                        self._seqs[seq_id] = before
                _raise_op_error(result)
                raise RuntimeError(f"deferred op {ops[i]} failed without an error")  # not reachable
        return list(results[len(pending) :])

    def flush(self) -> None:
        """Send the ops queued by ``deferred()`` now (one Batch round trip; nothing if none are queued)."""
        if self._pending:
            self._send_batch()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[RemoteBlockManager]:
        """Queue mark_computed and free calls and send them together (one Batch) with the next call or on
        exit of the outermost block: ``with blocks.deferred(): scheduler.mark_computed(plan)``.

        Order is kept (every later call flushes first). An unknown sequence is still reported at once; other
        errors of a queued op are raised by the call that sends it.
        """
        self._defer_depth += 1
        try:
            yield self
        finally:
            self._defer_depth -= 1
            if self._defer_depth == 0:
                self.flush()

    def close(self) -> None:
        """Send any deferred ops, then close the channel if this client opened it."""
        try:
            self.flush()
        finally:
            if self._owns_channel:
                self.channel.close()

    def __enter__(self) -> RemoteBlockManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _seq(self, seq_id: Hashable) -> _Mirror:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    # ------------------------------------------------------------------ capacity queries

    def can_allocate(self, token_ids: Sequence[int], watermark_blocks: int = 0) -> bool:
        request = kvcache_pb2.CanAllocateRequest(token_ids=token_ids, watermark_blocks=watermark_blocks)
        return self._query(self.stub.CanAllocate, request).ok

    def can_append(self, seq_id: Hashable, num_new_tokens: int = 1) -> bool:
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        request = kvcache_pb2.CanAppendRequest(seq_id=self._wire(seq_id), num_new_tokens=num_new_tokens)
        return self._query(self.stub.CanAppend, request).ok

    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: truly free plus cached-but-unreferenced (evictable)."""
        s = self.stats()
        return s.free + s.cached

    # ------------------------------------------------------------------ sequence lifecycle

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], watermark_blocks: int = 0) -> int:
        tokens = list(token_ids)
        request = kvcache_pb2.AllocateRequest(
            seq_id=self._wire(seq_id), token_ids=tokens, watermark_blocks=watermark_blocks
        )
        r = self._mutate("allocate", self.stub.Allocate, request)
        if not r.ok:
            raise NoFreeBlocksError(r.message or f"allocate {seq_id!r}: no room for {len(tokens)} tokens")
        self._seqs[seq_id] = _Mirror(list(r.block_table), len(tokens), r.num_cached_tokens)
        return r.num_cached_tokens

    def append_slots(self, seq_id: Hashable, token_ids: Sequence[int]) -> list[tuple[int, int]]:
        tokens = list(token_ids)
        if self._queue_append(seq_id, tokens):
            return []
        r = self._mutate("append", self.stub.AppendSlots, self._append_request(seq_id, tokens))
        if not r.ok:
            raise NoFreeBlocksError(r.message or f"append to {seq_id!r}: no room for {len(tokens)} tokens")
        return self._appended(seq_id, tokens, r)

    def append_slots_in_order(
        self, appends: Sequence[tuple[Hashable, Sequence[int]]]
    ) -> tuple[list[tuple[int, int]], int]:
        """BlockManager.append_slots_in_order: the leading appends that fit their last block are queued as
        append_slots queues them; the rest travel in one Batch, which stops at the first finding no room."""
        appends = [(seq_id, list(tokens)) for seq_id, tokens in appends]
        start = 0
        while start < len(appends) and self._queue_append(*appends[start]):
            start += 1
        rest = appends[start:]
        if not rest:
            return [], start
        results = self._send_batch([kvcache_pb2.KVOp(append=self._append_request(*a)) for a in rest])
        copies: list[tuple[int, int]] = []
        for done, ((seq_id, tokens), r) in enumerate(zip(rest, results, strict=True)):
            if not r.ok:
                _raise_op_error(r)  # malformed or unknown: raised as BlockManager would
                return copies, start + done
            copies += self._appended(seq_id, tokens, r)
        return copies, len(appends)

    def _append_request(self, seq_id: Hashable, tokens: list[int]) -> kvcache_pb2.AppendSlotsRequest:
        return kvcache_pb2.AppendSlotsRequest(seq_id=self._wire(seq_id), token_ids=tokens)

    def _queue_append(self, seq_id: Hashable, tokens: list[int]) -> bool:
        """Queue the append (inside ``deferred()``) if the tokens fit the last block, which this sequence owns
        alone (a prefix hit never includes the last block; only a fork shares it): the service can neither
        refuse nor copy it. Returns whether it was queued."""
        mirror = self._seqs.get(seq_id)
        if not (
            self._defer_depth
            and mirror is not None
            and not mirror.forked
            and mirror.num_tokens + len(tokens) <= len(mirror.block_table) * self.block_size
        ):
            return False
        request = self._append_request(seq_id, tokens)
        self._pending.append((kvcache_pb2.KVOp(append=request), seq_id, mirror.copy()))
        mirror.num_tokens += len(tokens)
        return True

    def _appended(self, seq_id: Hashable, tokens: list[int], r: Any) -> list[tuple[int, int]]:
        """Record an append the service did; returns its copy-on-write pairs."""
        mirror = self._seqs.get(seq_id)
        if mirror is not None:
            mirror.block_table = list(r.block_table)
            mirror.num_tokens += len(tokens)
            mirror.forked = mirror.forked and not tokens
        return [(c.src, c.dst) for c in r.copies]

    def mark_computed(self, seq_id: Hashable, num_computed_tokens: int) -> None:
        if num_computed_tokens < 0:
            raise ValueError(f"mark_computed {seq_id!r}: {num_computed_tokens} is negative")
        request = kvcache_pb2.MarkComputedRequest(
            seq_id=self._wire(seq_id), num_computed_tokens=num_computed_tokens
        )
        if self._defer_depth:
            mirror = self._seq(seq_id)
            self._pending.append((kvcache_pb2.KVOp(mark_computed=request), seq_id, mirror.copy()))
            mirror.num_computed = num_computed_tokens
            return
        self._mutate("mark_computed", self.stub.MarkComputed, request)
        if seq_id in self._seqs:
            self._seqs[seq_id].num_computed = num_computed_tokens

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        parent = self._seq(parent_id)  # a sequence this client owns (the child's mirror starts as its copy)
        request = kvcache_pb2.ForkRequest(parent_id=self._wire(parent_id), child_id=self._wire(child_id))
        r = self._mutate("fork", self.stub.Fork, request)
        parent.forked = True
        self._seqs[child_id] = _Mirror(list(r.block_table), parent.num_tokens, parent.num_computed, True)

    def free(self, seq_id: Hashable) -> None:
        request = kvcache_pb2.FreeRequest(seq_id=self._wire(seq_id))
        if self._defer_depth:
            before = self._seqs.pop(seq_id, None)
            if before is None:
                raise KeyError(f"unknown sequence {seq_id!r}")
            self._pending.append((kvcache_pb2.KVOp(free=request), seq_id, before))
            return
        self._mutate("free", self.stub.Free, request)
        self._seqs.pop(seq_id, None)

    # ------------------------------------------------------------------ local queries (no round trip)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id).block_table)

    def has_seq(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def num_tokens(self, seq_id: Hashable) -> int:
        return self._seq(seq_id).num_tokens

    def num_computed_tokens(self, seq_id: Hashable) -> int:
        return self._seq(seq_id).num_computed

    def slot_mapping(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        """Physical slots (block * block_size + offset) of token positions [start, end)."""
        seq = self._seq(seq_id)
        if not 0 <= start <= end <= seq.num_tokens:
            raise ValueError(f"slot_mapping {seq_id!r}: [{start}, {end}) outside [0, {seq.num_tokens})")
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    # ------------------------------------------------------------------ service-wide queries

    def lookup_prefix(self, token_ids: Sequence[int]) -> int:
        """Tokens a new request with these ids would find cached (pure query)."""
        return self.lookup_prefix_blocks(token_ids)[0]

    def lookup_prefix_blocks(self, token_ids: Sequence[int]) -> tuple[int, list[int]]:
        """(cached tokens, the blocks holding them) an allocation of these ids would reuse (pure query)."""
        r = self._query(self.stub.LookupPrefix, kvcache_pb2.LookupPrefixRequest(token_ids=token_ids))
        return r.num_cached_tokens, list(r.block_ids)

    def stats(self) -> BlockStats:
        """Every counter of the service in one round trip (blocks: used + cached + free == num_blocks)."""
        r = self._query(self.stub.Stats, kvcache_pb2.KVStatsRequest())
        return BlockStats(**{f.name: getattr(r, f.name) for f in dataclasses.fields(BlockStats)})

    @property
    def num_seqs(self) -> int:
        """Sequences on the service (every client's)."""
        return self.stats().num_seqs

    @property
    def num_used_blocks(self) -> int:
        return self.stats().used

    @property
    def num_cached_blocks(self) -> int:
        return self.stats().cached

    @property
    def usage(self) -> float:
        return self.stats().usage

    @property
    def prefix_queries(self) -> int:
        return self.stats().prefix_queries

    @property
    def prefix_hits(self) -> int:
        return self.stats().prefix_hits

    @property
    def evictions(self) -> int:
        return self.stats().evictions

    # ------------------------------------------------------------------ pages

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """``[num_layers, n, block_size, entry_dim]`` copy of the service's pages."""
        r = self._query(self.stub.ReadBlocks, kvcache_pb2.ReadBlocksRequest(block_ids=block_ids))
        return tensor_from_proto(r.data)

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Overwrite whole pages (every layer) on the service; data in the service's dtype."""
        request = kvcache_pb2.WriteBlocksRequest(block_ids=block_ids)
        tensor_to_proto(data, request.data)
        self._query(self.stub.WriteBlocks, request)

    def write_entries(
        self, slots: Sequence[int] | torch.Tensor, entries: torch.Tensor, layer_start: int = 0
    ) -> None:
        """Write-through of new latents: entries ``[layers, T, entry_dim]`` of layers [layer_start, ...)
        into slots ``[T]`` (block * block_size + offset, e.g. from `slot_mapping`)."""
        slots_t = torch.as_tensor(slots, dtype=torch.int64).reshape(-1)
        request = kvcache_pb2.WriteEntriesRequest(layer_start=layer_start, slots=tensor_to_proto(slots_t))
        tensor_to_proto(entries, request.entries)
        self._query(self.stub.WriteEntries, request)
