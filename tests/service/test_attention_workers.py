"""Attention workers + the KV-cache service behind the engine: the in-process engine's tokens under chunked
prefill, prefix hits and preemption; prefixes computed on one worker reused by another; bad input rejected."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from common.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.rpc.codec import tensor_to_proto
from common.torch_thread import TorchThread
from latentmoe.v1 import attention_pb2
from services.attention.worker import AttentionWorker, serve_worker
from services.kvcache.client import RemoteBlockManager
from services.kvcache.service import KVCacheService, serve_kvcache
from services.router.attention import AttentionPool

BS = 4
SHARED = list(range(40, 56))  # 4 full blocks that later requests find cached
PROMPTS = [
    [3, 4, 5],
    SHARED + [7, 8],
    list(range(100, 141)),
    [9],
    SHARED + [60, 61, 62, 63, 64],
    [(11 * i) % 380 + 2 for i in range(23)],
]
ARRIVAL_STEP = [0, 0, 0, 2, 5, 9]
PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def config(num_blocks: int, layers: int, entry_dim: int) -> EngineConfig:
    return EngineConfig(
        dtype="float32",
        device="cpu",
        block_size=BS,
        kv_cache_memory=num_blocks * BS * layers * entry_dim * 4,
        max_num_batched_tokens=16,  # long prompts are prefilled in chunks
        max_num_seqs=8,
    )


@pytest.fixture
def topology(checkpoint_dir):
    """topology(name, num_blocks) -> (engine over 2 attention workers, the pool, the KV service, an in-process
    engine, workers) where workers.stop(i) / workers.start(i) stop and (re)start worker i on its address;
    everything is stopped at the end."""
    started = []

    class Workers:
        def __init__(self, path: str, kv_address: str, hot_copy_blocks: int | None) -> None:
            self.path, self.kv_address, self.hot_copy_blocks = path, kv_address, hot_copy_blocks
            self.servers: list = [None, None]
            self.addresses = ["127.0.0.1:0", "127.0.0.1:0"]

        def start(self, i: int) -> None:
            torch_thread = TorchThread()
            worker = torch_thread.call(
                AttentionWorker, self.path, self.kv_address, "cpu", f"attention-{i}", self.hot_copy_blocks
            )
            host, port = self.addresses[i].rsplit(":", 1)
            self.servers[i], self.addresses[i] = serve_worker(worker, torch_thread, host, int(port))
            started.append(self.servers[i])

        def stop(self, i: int) -> None:
            self.servers[i].stop(grace=None)

    def make(name: str, num_blocks: int, hot_copy_blocks: int | None = None):
        path = checkpoint_dir(name)
        service = KVCacheService.from_model(path, block_size=BS, num_blocks=num_blocks, dtype="float32")
        kv_server, kv_address = serve_kvcache(service)
        started.append(kv_server)
        workers = Workers(path, kv_address, hot_copy_blocks)
        for i in range(2):
            workers.start(i)
        pool = AttentionPool(
            workers.addresses, RemoteBlockManager(kv_address, namespace="router/"), probe_interval_s=0.2
        )
        started.append(pool)
        cfg = config(num_blocks, service.pool.num_layers, service.pool.entry_dim)
        engine = LLMEngine.from_checkpoint(path, cfg, attention=pool)
        pool.attach(engine.runner.model)
        return engine, pool, service, LLMEngine.from_checkpoint(path, cfg), workers

    yield make
    for item in reversed(started):
        item.close() if isinstance(item, AttentionPool) else item.stop(grace=None)


def run_staggered(engine: LLMEngine) -> dict[str, tuple[list[int], int]]:
    results: dict[str, tuple[list[int], int]] = {}
    step = 0
    while len(results) < len(PROMPTS):
        for i, arrival in enumerate(ARRIVAL_STEP):
            if arrival == step:
                engine.add_request(PROMPTS[i], PARAMS, request_id=str(i))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = (out.outputs[0].token_ids, out.num_cached_tokens)
        step += 1
        assert step < 1000
    return results


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_attention_workers_give_the_in_process_tokens(topology, name):
    engine, pool, service, local, _ = topology(name, num_blocks=40)  # ~120 tokens for ~180 needed: preempts
    remote = run_staggered(engine)
    assert remote == run_staggered(local)
    assert engine.scheduler.num_preemptions > 0
    assert any(cached > 0 for _, cached in remote.values())
    infos = pool.worker_info()
    assert all(i.tokens_computed > 0 for i in infos)  # both workers carried sequences
    assert sum(i.entries_written for i in infos) == sum(i.tokens_computed for i in infos)
    stats = service.stats()
    assert (stats.used, stats.num_seqs) == (0, 0)  # every page freed or cached
    service.blocks.check_invariants()


def test_a_hot_copy_smaller_than_the_service_gives_the_same_tokens(topology):
    """Each worker caches 30 of the service's 64 blocks: pages are evicted, and no token changes."""
    engine, pool, service, local, _ = topology("v3", num_blocks=64, hot_copy_blocks=30)
    assert run_staggered(engine) == run_staggered(local)
    infos = pool.worker_info()
    assert all(i.hot_copy_blocks == 30 and i.num_blocks == 64 for i in infos)
    assert all(i.tokens_computed > 0 for i in infos)
    assert sum(i.blocks_evicted for i in infos) > 0
    assert (service.stats().used, service.stats().num_seqs) == (0, 0)


def test_sequences_move_to_the_worker_with_room_when_a_hot_copy_would_overflow(topology):
    """Two long prompts land on one worker (placement counts sequences); as their chunked prefills grow they
    need more pages than its hot copy has, so the router moves one to the other worker instead of failing
    the step."""
    engine, pool, _, local, _ = topology("v2_lite", num_blocks=64, hot_copy_blocks=16)
    prompts = [list(range(100, 140)), [5], list(range(200, 240))]  # 10 blocks, 1, 10 (block size 4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = engine.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [
        o.outputs[0].token_ids for o in local.generate(prompts, params)
    ]
    infos = pool.worker_info()
    assert infos[1].blocks_pulled > 0  # a long prompt moved, part-computed: its pages came from the service
    assert all(i.tokens_computed > 0 for i in infos)


def test_sequences_that_fit_no_hot_copy_wait_preempted_and_give_the_same_tokens(topology):
    """Four prompts of 10 pages each on two workers of 12 pages: no placement holds them all, so the newest
    are preempted (recomputed later), as when the KV cache runs out, and every answer comes out unchanged."""
    engine, pool, service, local, _ = topology("v2_lite", num_blocks=64, hot_copy_blocks=12)
    assert engine.max_model_len == 12 * BS  # one sequence fits one hot copy
    prompts = [list(range(100 + 50 * i, 140 + 50 * i)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = engine.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [
        o.outputs[0].token_ids for o in local.generate(prompts, params)
    ]
    assert engine.scheduler.num_preemptions > 0
    assert (service.stats().used, service.stats().num_seqs) == (0, 0)


def test_a_prefix_computed_on_one_worker_is_a_hit_on_the_other(topology):
    engine, pool, service, local, _ = topology("v2_lite", num_blocks=64)
    first = engine.generate([SHARED + [1, 2]], PARAMS)[0]
    assert first.num_cached_tokens == 0
    before = [i.blocks_pulled for i in pool.worker_info()]
    second = engine.generate([SHARED + [3]], PARAMS)[0]
    after = [i.blocks_pulled for i in pool.worker_info()]
    assert second.num_cached_tokens == len(SHARED)  # no recompute of the shared blocks...
    assert after[1] - before[1] == len(SHARED) // BS  # ...the other worker pulled them from the service
    expected = local.generate([SHARED + [1, 2], SHARED + [3]], PARAMS)
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == [
        o.outputs[0].token_ids for o in expected
    ]


def test_a_lost_attention_worker_costs_time_not_requests(topology):
    engine, pool, service, local, workers = topology("v3", num_blocks=64)
    ids = [engine.add_request(p, PARAMS) for p in PROMPTS]
    outputs: dict[str, list[int]] = {}
    for _ in range(5):  # prompts prefilled on both workers, a few tokens decoded
        for out in engine.step():
            outputs[out.request_id] = out.outputs[0].token_ids
    assert len(pool.workers) == 2
    workers.stop(1)  # attention-1 dies with sequences and their hot pages
    pulled_before = pool.workers[0].info().blocks_pulled
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out.outputs[0].token_ids
        steps += 1
        assert steps < 500
    assert [w.name for w in pool.workers] == ["attention-0"]  # the lost worker was dropped...
    assert (
        pool.worker_info()[0].blocks_pulled > pulled_before
    )  # ...its sequences' pages came from the service
    want = local.generate(PROMPTS, PARAMS)
    assert [outputs[i] for i in ids] == [o.outputs[0].token_ids for o in want]  # and no answer changed
    assert service.stats().used == 0

    # attention-1 comes back (a restarted process on the same address): it rejoins and takes new sequences.
    workers.start(1)
    deadline = time.monotonic() + 30
    while len(pool.workers) < 2:
        assert time.monotonic() < deadline, "the restarted worker was not taken back"
        engine.generate([[5, 6, 7]], PARAMS)  # steps admit revived workers
        time.sleep(0.1)
    again = engine.generate(PROMPTS, PARAMS)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in want]
    assert pool.workers[1].info().tokens_computed > 0


def test_bad_attend_requests_are_invalid_argument(topology):
    engine, pool, _, _, _ = topology("v2_lite", num_blocks=16)
    stub = pool.workers[0].stub
    hidden = tensor_to_proto(torch.zeros(2, engine.model_config.hidden_size))
    positions = engine.model_config.max_position_embeddings
    spec = attention_pb2.AttentionBatchSpec(
        prefills=[attention_pb2.SequenceSpan(block_table=[0], num_computed=0, num_new=2)]
    )
    bad = [
        attention_pb2.AttendRequest(batch_id="x", layer=0, hidden=hidden),  # never announced
        attention_pb2.AttendRequest(batch_id="x", layer=99, hidden=hidden, batch=spec),
        attention_pb2.AttendRequest(
            batch_id="x",
            layer=0,
            hidden=tensor_to_proto(torch.zeros(3, engine.model_config.hidden_size)),  # 3 rows for 2 tokens
            batch=spec,
        ),
        attention_pb2.AttendRequest(
            batch_id="x",
            layer=0,
            hidden=hidden,
            batch=attention_pb2.AttentionBatchSpec(
                prefills=[attention_pb2.SequenceSpan(block_table=[999], num_computed=0, num_new=2)]
            ),
        ),
        attention_pb2.AttendRequest(  # past the model's positions (a table long enough, one page reused)
            batch_id="x",
            layer=0,
            hidden=hidden,
            batch=attention_pb2.AttentionBatchSpec(
                prefills=[
                    attention_pb2.SequenceSpan(
                        block_table=[0] * -(-(positions + 1) // engine.blocks.block_size),
                        num_computed=positions - 1,
                        num_new=2,
                    )
                ]
            ),
        ),
    ]
    for request in bad:
        with pytest.raises(grpc.RpcError) as e:
            stub.Attend(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert f"past the model's {positions} positions" in e.value.details()
    # The worker still serves.
    out = engine.generate([[5, 6, 7]], PARAMS)[0]
    assert len(out.outputs[0].token_ids) == PARAMS.max_tokens


def test_a_batch_that_does_not_fit_the_hot_copy_is_resource_exhausted_until_its_step_is_over(topology):
    """A batch pins its pages until its last layer; a router's later step closes its earlier batches (here
    one abandoned after layer 0), and frees their pages for the new one. Another router's step does not."""
    engine, pool, _, _, _ = topology("v2_lite", num_blocks=16, hot_copy_blocks=4)
    stub = pool.workers[0].stub

    def attend(batch_id: str, table: list[int], router: str, step: int) -> attention_pb2.AttendResponse:
        span = attention_pb2.SequenceSpan(block_table=table, num_computed=0, num_new=len(table) * BS)
        spec = attention_pb2.AttentionBatchSpec(prefills=[span], router=router, step=step)
        hidden = tensor_to_proto(torch.zeros(len(table) * BS, engine.model_config.hidden_size))
        return stub.Attend(attention_pb2.AttendRequest(batch_id=batch_id, layer=0, hidden=hidden, batch=spec))

    attend("a", [0, 1, 2], "r1/", 0)  # never finished: its 3 pages stay pinned
    with pytest.raises(grpc.RpcError) as e:
        attend("b", [3, 4], "r2/", 9)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "needs 2 blocks, the hot copy has 4 (3 pinned" in e.value.details()
    attend("c", [3, 4], "r1/", 1)  # r1's next step: batch a is over
    with pytest.raises(grpc.RpcError) as e:
        stub.Attend(
            attention_pb2.AttendRequest(
                batch_id="a",
                layer=1,
                hidden=tensor_to_proto(torch.zeros(12, engine.model_config.hidden_size)),
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown batch_id" in e.value.details()
