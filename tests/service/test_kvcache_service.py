"""The KV-cache service on loopback: every RPC, Batch semantics, bad input rejected without leaks, the engine
scheduling over a RemoteBlockManager exactly as over a local BlockManager, pages and a prefix shared by two
clients, and the `python -m services.kvcache.service` entry point."""

from __future__ import annotations

import collections
import contextlib
import sys
import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.model_runner import LocalAttention
from common.engine.sampling_params import SamplingParams
from common.kvcache import BlockManager, BlockPool, NoFreeBlocksError
from common.rpc.codec import tensor_from_proto, tensor_to_proto
from latentmoe.v1 import kvcache_pb2 as pb
from latentmoe.v1 import kvcache_pb2_grpc, tensor_pb2
from services.kvcache.client import RemoteBlockManager
from services.kvcache.service import ERROR_METADATA_KEY, UNKNOWN_SEQUENCE, KVCacheService, serve_kvcache
from tests.processes import start_until_ready, stop

T = 30  # seconds: every RPC of these tests is bounded
LAYERS, ENTRY_DIM, BS = 3, 48, 4  # the v2_lite test config: 3 layers, kv_lora_rank 32 + qk_rope_head_dim 16


@pytest.fixture
def kv(checkpoint_dir):
    """kv(num_blocks, block_size) -> (service, address, stub) of a KV-cache service on 127.0.0.1; stopped
    at the end of the test."""
    started = []

    def start(num_blocks: int = 16, block_size: int = BS):
        service = KVCacheService.from_model(
            checkpoint_dir("v2_lite"), block_size=block_size, num_blocks=num_blocks
        )
        server, address = serve_kvcache(service, "127.0.0.1", 0, workers=4)
        channel = grpc.insecure_channel(address)
        started.append((server, channel))
        return service, address, kvcache_pb2_grpc.KVCacheStub(channel)

    yield start
    for server, channel in started:
        channel.close()
        server.stop(None).wait()


def _slots(table: list[int], start: int, end: int) -> torch.Tensor:
    return torch.tensor([table[p // BS] * BS + p % BS for p in range(start, end)])


def test_every_rpc_round_trips(kv):
    service, _, stub = kv()
    s = stub.Stats(pb.KVStatsRequest(), timeout=T)
    assert (s.num_blocks, s.block_size, s.entry_dim, s.num_layers, s.dtype) == (
        16,
        BS,
        ENTRY_DIM,
        LAYERS,
        "float32",
    )
    assert (s.used, s.cached, s.free, s.num_seqs) == (0, 0, 16, 0)

    prompt = list(range(10, 20))  # 10 tokens: 3 blocks, the last one partial
    assert stub.CanAllocate(pb.CanAllocateRequest(token_ids=prompt), timeout=T).ok
    assert not stub.CanAllocate(pb.CanAllocateRequest(token_ids=prompt, watermark_blocks=14), timeout=T).ok
    a = stub.Allocate(pb.AllocateRequest(seq_id="a", token_ids=prompt), timeout=T)
    assert a.ok and a.num_cached_tokens == 0 and len(a.block_table) == 3
    table = list(a.block_table)

    # Write-through of the prompt's latents, all layers in one call; then the pages hold them.
    entries = torch.randn(LAYERS, 10, ENTRY_DIM)
    stub.WriteEntries(
        pb.WriteEntriesRequest(
            layer_start=0, slots=tensor_to_proto(_slots(table, 0, 10)), entries=tensor_to_proto(entries)
        ),
        timeout=T,
    )
    stub.MarkComputed(pb.MarkComputedRequest(seq_id="a", num_computed_tokens=10), timeout=T)
    read = stub.ReadBlocks(pb.ReadBlocksRequest(block_ids=table), timeout=T)
    assert list(read.block_ids) == table
    pages = tensor_from_proto(read.data)
    assert pages.shape == (LAYERS, 3, BS, ENTRY_DIM)
    assert torch.equal(pages.reshape(LAYERS, 3 * BS, ENTRY_DIM)[:, :10], entries)

    # The two full computed blocks are indexed (never the block of a request's last token).
    hit = stub.LookupPrefix(pb.LookupPrefixRequest(token_ids=[*prompt, 99]), timeout=T)
    assert hit.num_cached_tokens == 8 and list(hit.block_ids) == table[:2]

    # Fork shares every block; the child's first append copies the shared partial block, on the service too.
    assert list(stub.Fork(pb.ForkRequest(parent_id="a", child_id="b"), timeout=T).block_table) == table
    assert stub.CanAppend(pb.CanAppendRequest(seq_id="b", num_new_tokens=1), timeout=T).ok
    app = stub.AppendSlots(pb.AppendSlotsRequest(seq_id="b", token_ids=[7]), timeout=T)
    dst = app.block_table[2]
    assert app.ok and [(c.src, c.dst) for c in app.copies] == [(table[2], dst)] and dst not in table
    both = tensor_from_proto(stub.ReadBlocks(pb.ReadBlocksRequest(block_ids=[table[2], dst]), timeout=T).data)
    assert torch.equal(both[:, 0], both[:, 1])

    data = torch.randn(LAYERS, 1, BS, ENTRY_DIM)
    stub.WriteBlocks(pb.WriteBlocksRequest(block_ids=[dst], data=tensor_to_proto(data)), timeout=T)
    back = stub.ReadBlocks(pb.ReadBlocksRequest(block_ids=[dst]), timeout=T)
    assert torch.equal(tensor_from_proto(back.data), data)

    # No room is ok=false, not an error, and changes nothing.
    before = stub.Stats(pb.KVStatsRequest(), timeout=T)
    big = stub.Allocate(pb.AllocateRequest(seq_id="big", token_ids=[5] * 100), timeout=T)
    assert not big.ok and big.message and not big.block_table
    assert not stub.CanAppend(pb.CanAppendRequest(seq_id="b", num_new_tokens=100), timeout=T).ok
    assert not stub.AppendSlots(pb.AppendSlotsRequest(seq_id="b", token_ids=[5] * 100), timeout=T).ok
    assert stub.Stats(pb.KVStatsRequest(), timeout=T) == before

    stub.Free(pb.FreeRequest(seq_id="a"), timeout=T)
    stub.Free(pb.FreeRequest(seq_id="b"), timeout=T)
    s = stub.Stats(pb.KVStatsRequest(), timeout=T)
    assert (s.used, s.cached, s.free, s.num_seqs) == (0, 2, 14, 0)  # a's full blocks stay cached
    assert (s.prefix_queries, s.prefix_hits) == (10, 0)
    again = stub.Allocate(pb.AllocateRequest(seq_id="c", token_ids=[*prompt, 3]), timeout=T)
    assert again.num_cached_tokens == 8 and list(again.block_table[:2]) == table[:2]
    stub.Free(pb.FreeRequest(seq_id="c"), timeout=T)
    assert stub.Stats(pb.KVStatsRequest(), timeout=T).prefix_hits == 8
    service.blocks.check_invariants()


def test_batch_stops_at_the_first_op_that_is_not_ok(kv):
    service, _, stub = kv()
    ops = [
        pb.KVOp(allocate=pb.AllocateRequest(seq_id="x", token_ids=[1, 2, 3, 4, 5])),
        pb.KVOp(mark_computed=pb.MarkComputedRequest(seq_id="x", num_computed_tokens=5)),
        pb.KVOp(append=pb.AppendSlotsRequest(seq_id="x", token_ids=[6])),
        pb.KVOp(allocate=pb.AllocateRequest(seq_id="big", token_ids=[1] * 100)),  # no room
        pb.KVOp(free=pb.FreeRequest(seq_id="x")),
    ]
    results = stub.Batch(pb.BatchRequest(ops=ops), timeout=T).results
    assert [r.executed for r in results] == [True, True, True, True, False]
    assert [r.ok for r in results] == [True, True, True, False, False]
    assert results[3].error == "" and not results[3].unknown_sequence  # lack of room, not bad input
    assert list(results[2].block_table) == list(results[0].block_table)  # 6 tokens still fit 2 blocks
    assert stub.Stats(pb.KVStatsRequest(), timeout=T).num_seqs == 1  # the free did not run

    ops = [
        pb.KVOp(mark_computed=pb.MarkComputedRequest(seq_id="x", num_computed_tokens=6)),
        pb.KVOp(free=pb.FreeRequest(seq_id="nope")),
        pb.KVOp(free=pb.FreeRequest(seq_id="x")),
    ]
    results = stub.Batch(pb.BatchRequest(ops=ops), timeout=T).results
    assert [(r.executed, r.ok) for r in results] == [(True, True), (True, False), (False, False)]
    assert results[1].unknown_sequence and "nope" in results[1].error
    results = stub.Batch(
        pb.BatchRequest(ops=[pb.KVOp(), pb.KVOp(free=pb.FreeRequest(seq_id="x"))]), timeout=T
    )
    assert [(r.executed, r.ok) for r in results.results] == [(True, False), (False, False)]
    assert results.results[0].error

    results = stub.Batch(pb.BatchRequest(ops=[pb.KVOp(free=pb.FreeRequest(seq_id="x"))]), timeout=T).results
    assert results[0].ok
    s = stub.Stats(pb.KVStatsRequest(), timeout=T)
    assert (s.used, s.num_seqs) == (0, 0)
    service.blocks.check_invariants()


def test_bad_input_is_invalid_argument_and_leaks_nothing(kv):
    service, _, stub = kv()
    assert stub.Allocate(pb.AllocateRequest(seq_id="d", token_ids=[1, 2, 3, 4, 5, 6]), timeout=T).ok
    used = stub.Stats(pb.KVStatsRequest(), timeout=T).used
    good_slots = tensor_to_proto(torch.tensor([0, 1]))
    good_entries = tensor_to_proto(torch.zeros(LAYERS, 2, ENTRY_DIM))
    bad = [
        (stub.Allocate, pb.AllocateRequest(seq_id="e", token_ids=[]), "empty"),
        (stub.Allocate, pb.AllocateRequest(seq_id="d", token_ids=[1]), "already allocated"),
        (stub.Allocate, pb.AllocateRequest(seq_id="", token_ids=[1]), "seq_id"),
        (stub.AppendSlots, pb.AppendSlotsRequest(seq_id="zz", token_ids=[1]), "unknown sequence"),
        (stub.MarkComputed, pb.MarkComputedRequest(seq_id="d", num_computed_tokens=7), "not in"),
        (stub.Fork, pb.ForkRequest(parent_id="zz", child_id="f"), "unknown sequence"),
        (stub.Fork, pb.ForkRequest(parent_id="d", child_id="f"), "not computed"),
        (stub.Free, pb.FreeRequest(seq_id="zz"), "unknown sequence"),
        (stub.CanAppend, pb.CanAppendRequest(seq_id="zz"), "unknown sequence"),
        (stub.CanAllocate, pb.CanAllocateRequest(token_ids=[]), "empty"),
        (stub.LookupPrefix, pb.LookupPrefixRequest(token_ids=[]), "empty"),
        (stub.ReadBlocks, pb.ReadBlocksRequest(block_ids=[0, 16]), "block ids"),
        (
            stub.WriteBlocks,
            pb.WriteBlocksRequest(
                block_ids=[1, 1], data=tensor_to_proto(torch.ones(LAYERS, 2, BS, ENTRY_DIM))
            ),
            "distinct",
        ),
        (
            stub.WriteBlocks,
            pb.WriteBlocksRequest(block_ids=[1], data=tensor_to_proto(torch.ones(LAYERS, 1, BS, 7))),
            "must be",
        ),
        (
            stub.WriteBlocks,
            pb.WriteBlocksRequest(
                block_ids=[1], data=tensor_to_proto(torch.ones(LAYERS, 1, BS, ENTRY_DIM, dtype=torch.float16))
            ),
            "float32",
        ),
        (  # bytes that do not match the shape
            stub.WriteBlocks,
            pb.WriteBlocksRequest(
                block_ids=[1], data=tensor_pb2.Tensor(dtype="float32", shape=[2], data=b"x")
            ),
            "bytes",
        ),
        (
            stub.WriteEntries,
            pb.WriteEntriesRequest(
                slots=tensor_to_proto(torch.tensor([0, 1], dtype=torch.int32)), entries=good_entries
            ),
            "int64",
        ),
        (
            stub.WriteEntries,
            pb.WriteEntriesRequest(slots=tensor_to_proto(torch.tensor([0, 64])), entries=good_entries),
            "slots must be in",
        ),
        (
            stub.WriteEntries,
            pb.WriteEntriesRequest(slots=tensor_to_proto(torch.tensor([3, 3])), entries=good_entries),
            "distinct",
        ),
        (
            stub.WriteEntries,
            pb.WriteEntriesRequest(slots=good_slots, entries=tensor_to_proto(torch.ones(LAYERS, 2, 5))),
            "entries must be",
        ),
        (
            stub.WriteEntries,
            pb.WriteEntriesRequest(layer_start=1, slots=good_slots, entries=good_entries),
            "layers",
        ),
        (
            stub.WriteEntries,
            pb.WriteEntriesRequest(
                slots=good_slots,
                entries=tensor_to_proto(torch.ones(LAYERS, 2, ENTRY_DIM, dtype=torch.bfloat16)),
            ),
            "float32",
        ),
    ]
    for method, request, words in bad:
        with pytest.raises(grpc.RpcError) as err:
            method(request, timeout=T)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert words in err.value.details(), (words, err.value.details())
        unknown = dict(err.value.trailing_metadata() or ()).get(ERROR_METADATA_KEY) == UNKNOWN_SEQUENCE
        assert unknown == (words == "unknown sequence"), request

    # Nothing changed: no block leaked, no page written; the service keeps serving.
    s = stub.Stats(pb.KVStatsRequest(), timeout=T)
    assert (s.used, s.num_seqs) == (used, 1)
    assert not service.pool.pages.any()
    stub.Free(pb.FreeRequest(seq_id="d"), timeout=T)
    assert stub.Stats(pb.KVStatsRequest(), timeout=T).used == 0
    assert stub.Allocate(pb.AllocateRequest(seq_id="d", token_ids=[1]), timeout=T).ok
    stub.Free(pb.FreeRequest(seq_id="d"), timeout=T)
    assert stub.Stats(pb.KVStatsRequest(), timeout=T).used == 0
    service.blocks.check_invariants()


class _CountCalls(grpc.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.calls[client_call_details.method.rsplit("/", 1)[-1]] += 1
        return continuation(client_call_details, request)


# The short prompt first: every step then has a sequence that samples. (The engine's ModelRunner fails on a
# step whose only work is a prefill chunk that finishes no prompt: its empty logits index is float.)
def _script(bm, defer: bool) -> list:
    """A scripted life of a few sequences; returns every answer (exceptions by type) for comparison."""
    trace: list = []
    batched = bm.deferred if defer else contextlib.nullcontext

    def do(fn, *args):
        try:
            trace.append(fn(*args))
        except (NoFreeBlocksError, KeyError, ValueError) as e:
            trace.append(type(e).__name__)

    def snapshot():
        trace.append(
            (
                bm.num_free_blocks(),
                bm.num_used_blocks,
                bm.num_cached_blocks,
                bm.usage,
                bm.num_seqs,
                bm.prefix_queries,
                bm.prefix_hits,
                bm.evictions,
            )
        )

    prompt = list(range(1, 11))  # 10 tokens
    do(bm.can_allocate, prompt, 1)
    do(bm.allocate, 1, prompt)
    do(bm.allocate, 1, prompt)  # duplicate
    do(bm.allocate, 2, [])  # empty
    with batched():
        do(bm.mark_computed, 1, 10)
    do(bm.mark_computed, 1, 3)  # backwards
    do(bm.fork, 1, 2)
    do(bm.can_append, 2, 1)
    do(bm.append_slots, 2, [11])  # copy-on-write of the shared partial block
    do(bm.append_slots, 1, [12, 13])
    for seq in (1, 2):
        trace.append((bm.block_table(seq), bm.num_tokens(seq), bm.num_computed_tokens(seq), bm.has_seq(seq)))
    do(bm.slot_mapping, 2, 8, 11)
    snapshot()
    do(bm.can_allocate, [7] * 40)
    do(bm.allocate, 3, [7] * 40)  # no room
    do(bm.can_append, 1, 40)
    do(bm.append_slots, 1, [4] * 40)  # no room
    do(bm.append_slots, 9, [4])  # unknown
    do(bm.block_table, 9)
    with batched():
        do(bm.mark_computed, 1, 12)
        do(bm.mark_computed, 2, 11)
        do(bm.free, 2)
    do(bm.lookup_prefix, [*prompt, 12, 13, 5])
    snapshot()
    do(bm.allocate, 4, [*prompt, 12, 13, 5])  # prefix hit on 3 blocks
    with batched():
        do(bm.free, 1)
        do(bm.free, 4)
    do(bm.free, 4)  # unknown
    snapshot()
    do(bm.allocate, 5, [9] * 44)  # evicts 2 of the 3 cached blocks
    snapshot()
    with batched():
        do(bm.free, 5)
    trace.append(bm.has_seq(5))
    snapshot()
    return trace


def test_remote_block_manager_answers_like_the_local_one(kv):
    local = _script(BlockManager(12, BS), defer=False)
    for defer in (False, True):
        service, address, _ = kv(num_blocks=12)
        with RemoteBlockManager(address, namespace="router-0/") as remote:
            assert (remote.num_blocks, remote.block_size, remote.num_layers, remote.entry_dim) == (
                12,
                BS,
                LAYERS,
                ENTRY_DIM,
            )
            assert _script(remote, defer) == local
        service.blocks.check_invariants()
    assert "NoFreeBlocksError" in local and "KeyError" in local and "ValueError" in local
    assert local[-1][1] == 0 and local[-1][7] == 2  # everything freed; two cached blocks were evicted


PROMPTS = [[9, 8, 7], list(range(20, 37)), list(range(20, 37)) + [5, 6], list(range(20, 30)) + [1, 2, 3]]
ARRIVAL_STEP = [0, 0, 3, 6]


def test_engine_over_a_remote_block_manager_matches_the_local_engine(kv, checkpoint_dir):
    path = checkpoint_dir("v2_lite")
    config = EngineConfig(
        dtype="float32",
        device="cpu",
        block_size=BS,
        kv_cache_memory=16 * LAYERS * BS * ENTRY_DIM * 4,  # 16 blocks = 64 tokens for ~120 needed
        max_num_batched_tokens=12,
        max_num_seqs=4,
    )
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    local = LLMEngine.from_checkpoint(path, config)
    assert local.blocks.num_blocks == 16
    service, address, _ = kv(num_blocks=16)
    counter = _CountCalls()
    channel = grpc.intercept_channel(grpc.insecure_channel(address), counter)
    blocks = RemoteBlockManager(channel)
    # Pages in this process, bookkeeping on the service: the engine's step batches its block-manager ops.
    pool = BlockPool(LAYERS, 16, BS, ENTRY_DIM)
    remote = LLMEngine.from_checkpoint(path, config, attention=LocalAttention(pool, blocks))

    results: dict[str, dict] = {"local": {}, "remote": {}}
    step = 0
    while len(results["remote"]) < len(PROMPTS) or len(results["local"]) < len(PROMPTS):
        for name, engine in (("local", local), ("remote", remote)):
            for i, arrival in enumerate(ARRIVAL_STEP):
                if arrival == step:
                    engine.add_request(PROMPTS[i], params, request_id=str(i))
            for out in engine.step():
                if out.finished:
                    results[name][out.request_id] = (out.outputs[0].token_ids, out.num_cached_tokens)
        # Same decisions, step by step: the same sequences hold the same physical blocks.
        assert [local.blocks.block_table(s.seq_id) for s in local.scheduler.running] == [
            blocks.block_table(s.seq_id) for s in remote.scheduler.running
        ], step
        step += 1
        assert step < 500

    assert results["remote"] == results["local"]
    assert remote.scheduler.num_preemptions == local.scheduler.num_preemptions > 0
    assert any(cached > 0 for _, cached in results["local"].values())  # a prefix was reused
    s = blocks.stats()
    assert (s.used, s.num_seqs, s.prefix_hits) == (0, 0, local.blocks.prefix_hits)
    service.blocks.check_invariants()
    assert counter.calls["MarkComputed"] == counter.calls["CanAppend"] == counter.calls["CanAllocate"] == 0
    assert counter.calls["AppendSlots"] == 0  # a step's decode appends travel in one Batch
    assert counter.calls["Batch"] > 0
    print(f"\n{step} steps, round trips per method: {dict(counter.calls)}")
    blocks.close()
    channel.close()


def test_pages_and_prefix_are_shared_between_clients(kv):
    service, address, _ = kv()
    prompt = list(range(40, 50))  # 10 tokens
    with RemoteBlockManager(address, namespace="a/") as a, RemoteBlockManager(address, namespace="b/") as b:
        a.allocate(1, prompt)
        entries = torch.randn(LAYERS, 10, ENTRY_DIM)
        a.write_entries(a.slot_mapping(1, 0, 10), entries)
        a.mark_computed(1, 10)

        n, ids = b.lookup_prefix_blocks([*prompt, 1])
        assert n == 8 and ids == a.block_table(1)[:2]
        assert torch.equal(b.read_blocks(ids), entries[:, :8].reshape(LAYERS, 2, BS, ENTRY_DIM))
        assert b.allocate(1, [*prompt, 1]) == 8  # same local id, another namespace
        assert b.block_table(1)[:2] == ids

        # A worker's cache miss: pull the blocks into its own pool; write one layer range through.
        pool = BlockPool(LAYERS, 16, BS, ENTRY_DIM)
        pool.write_blocks(ids, b.read_blocks(ids))
        assert torch.equal(pool.read_blocks(ids), b.read_blocks(ids))
        tail = b.slot_mapping(1, 8, 11)
        new = torch.randn(2, 3, ENTRY_DIM)
        b.write_entries(tail, new, layer_start=1)
        got = b.read_blocks(b.block_table(1)[2:]).reshape(LAYERS, BS, ENTRY_DIM)[:, :3]
        assert torch.equal(got[1:], new) and not got[0].any()
        pool.write(0, torch.tensor(tail), torch.ones(3, ENTRY_DIM))
        b.write_blocks(b.block_table(1)[2:], pool.read_blocks(b.block_table(1)[2:]))
        assert torch.equal(b.read_blocks(b.block_table(1)[2:]), pool.read_blocks(b.block_table(1)[2:]))

        with pytest.raises(ValueError, match="float32"):
            b.write_entries(tail, new.half(), layer_start=1)
        with pytest.raises(KeyError):
            b.free(2)
        a.free(1)
        b.free(1)
        assert a.stats().used == 0
    service.blocks.check_invariants()


def test_budget_sizing_and_the_command_line_entry(checkpoint_dir):
    path = checkpoint_dir("v2_lite")
    per_block = LAYERS * BS * ENTRY_DIM * 4
    assert (
        KVCacheService.from_model(path, block_size=BS, kv_cache_memory=10 * per_block).pool.num_blocks == 10
    )

    argv = [sys.executable, "-m", "services.kvcache.service", "--model", path, "--port", "0"]
    proc, ready = start_until_ready(
        argv + ["--block-size", str(BS), "--num-blocks", "8", "--dtype", "float32"]
    )
    try:
        with RemoteBlockManager(ready.group(1)) as blocks:
            assert (blocks.num_blocks, blocks.block_size) == (8, BS)
            assert blocks.allocate("s", [1, 2, 3]) == 0
            blocks.free("s")
            assert blocks.num_used_blocks == 0
            health = health_pb2_grpc.HealthStub(blocks.channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="latentmoe.v1.KVCache"), timeout=T)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        code = stop(proc)
    assert code == 0, "the KV-cache service did not stop cleanly on SIGTERM"


def test_deferred_ops_ride_on_the_next_call_and_fail_cleanly(kv):
    service, address, _ = kv()
    counter = _CountCalls()
    channel = grpc.intercept_channel(grpc.insecure_channel(address), counter)
    blocks = RemoteBlockManager(channel)
    blocks.allocate("p", list(range(1, 10)))
    counter.calls.clear()
    with blocks.deferred():
        blocks.mark_computed("p", 9)
        blocks.free("p")
        assert not blocks.has_seq("p") and counter.calls == {}  # queued, nothing sent yet
        assert blocks.allocate("q", [*range(1, 9), 7]) == 8  # one Batch: both queued ops + the allocate
        blocks.mark_computed("q", 9)
    assert counter.calls == {"Batch": 2}
    assert blocks.num_computed_tokens("q") == 9

    # A queued op the service rejects is raised when sent; it and the ops after it are undone locally.
    with pytest.raises(ValueError, match="not in"), blocks.deferred():
        blocks.append_slots("q", [3])
        blocks.mark_computed("q", 99)
        blocks.free("q")
    assert blocks.has_seq("q") and blocks.num_computed_tokens("q") == 9 and blocks.num_tokens("q") == 10
    blocks.free("q")
    assert blocks.num_used_blocks == 0
    service.blocks.check_invariants()
    blocks.close()
    channel.close()


def test_a_steps_decode_appends_cost_one_round_trip_and_stop_at_the_first_refusal(kv):
    """All sequences of aligned prompts cross into a new page at the same step: their appends travel in one
    Batch, not one call each. The first refused append and the ones after it are left undone, on the service
    and in the client's tables alike, as a local BlockManager leaves them."""
    service, address, _ = kv(num_blocks=8)
    counter = _CountCalls()
    channel = grpc.intercept_channel(grpc.insecure_channel(address), counter)
    remote = RemoteBlockManager(channel)
    local = BlockManager(8, BS)
    seqs = [0, 1, 2]

    def same_tables():
        """Read from the client's own tables: no round trip."""
        for seq in seqs:
            assert local.block_table(seq) == remote.block_table(seq)
            assert local.num_tokens(seq) == remote.num_tokens(seq)

    def both(fn):
        """The same call on both: the same answer, then the same tables."""
        answers = [fn(bm) for bm in (local, remote)]
        assert answers[0] == answers[1]
        same_tables()
        return answers[0]

    for bm in (local, remote):
        for seq in seqs:
            bm.allocate(seq, list(range(10 * seq, 10 * seq + BS)))  # one full page each
    counter.calls.clear()
    with remote.deferred():
        assert both(lambda bm: bm.append_slots_in_order([(s, [1]) for s in seqs])) == ([], 3)
        assert counter.calls == {"Batch": 1}  # three new pages, one round trip
        for _ in range(BS - 1):  # fill the new pages: nothing to send
            assert both(lambda bm: bm.append_slots_in_order([(s, [2]) for s in seqs])) == ([], 3)
        assert counter.calls == {"Batch": 1}
        # Two pages left for three sequences: the third is refused and stays as it was.
        assert both(lambda bm: bm.append_slots_in_order([(s, [3]) for s in seqs])) == ([], 2)
        assert counter.calls == {"Batch": 2}
        assert local.num_tokens(2) == 2 * BS and local.num_free_blocks() == remote.num_free_blocks() == 0
        seqs.remove(0)
        both(lambda bm: bm.free(0))  # what a scheduler does next: preempt one, then try again
        assert both(lambda bm: bm.append_slots_in_order([(2, [3])])) == ([], 1)
    # An unknown sequence is raised after the appends before it are done.
    for bm in (local, remote):
        with pytest.raises(KeyError):
            bm.append_slots_in_order([(1, [4]), ("nope", [4])])
    same_tables()
    assert local.num_free_blocks() == remote.num_free_blocks()
    service.blocks.check_invariants()
    remote.close()
    channel.close()


def test_concurrent_clients_keep_the_books_straight(kv):
    service, address, _ = kv(num_blocks=32)
    errors: list[BaseException] = []

    def client(name: str) -> None:
        try:
            with RemoteBlockManager(address, namespace=f"{name}/") as blocks:
                for i in range(25):  # bounded
                    tokens = [1 + i % 3] * 9  # shared prefixes across clients
                    if not blocks.can_allocate(tokens):
                        continue
                    with contextlib.suppress(NoFreeBlocksError):  # another client may have taken the room
                        blocks.allocate(i, tokens)
                        blocks.mark_computed(i, 9)
                        blocks.free(i)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(f"c{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    s = service.stats()
    assert (s.used, s.num_seqs) == (0, 0) and s.prefix_hits > 0
    service.blocks.check_invariants()
