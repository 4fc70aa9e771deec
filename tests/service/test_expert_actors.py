"""Routed experts as Ray actors serving gRPC: same tokens as in-process, load spread, bad input rejected."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
import torch
from prometheus_client import REGISTRY

from common.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.rpc.codec import tensor_to_proto
from common.rpc.stream import ThreadStreams
from latentmoe.v1 import expert_pb2
from services.router.experts import ExpertPool, contiguous_shards
from tests.processes import stat_fields

KEEPALIVE_S = 2.0
PROMPTS = [[3, 4, 5, 6], list(range(50, 81)), [9], [(5 * i) % 300 + 2 for i in range(17)]]
CONFIG = EngineConfig(
    dtype="float32", device="cpu", block_size=16, kv_cache_memory=8e6, max_num_batched_tokens=32
)


@pytest.fixture(scope="module")
def pool(ray_session, checkpoint_dir):
    # Expert 5 lives on both workers: pairs for it alternate between the replicas.
    pool = ExpertPool(
        checkpoint_dir("v3"),
        2,
        "float32",
        shards=[[0, 1, 2, 3, 5], [4, 5, 6, 7]],
        host="127.0.0.1",
        keepalive_s=KEEPALIVE_S,
    )
    yield pool
    pool.shutdown()


def test_contiguous_shards_cover_every_expert():
    assert contiguous_shards(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sorted(e for s in contiguous_shards(160, 3) for e in s) == list(range(160))


def test_remote_experts_give_the_in_process_tokens(pool, checkpoint_dir):
    path = checkpoint_dir("v3")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    local = LLMEngine.from_checkpoint(path, CONFIG).generate(PROMPTS, params)
    remote_engine = LLMEngine.from_checkpoint(path, CONFIG, local_experts=False)
    assert all(
        layer.mlp.experts.__class__.__name__ == "RoutedExperts"
        for layer in remote_engine.runner.model.layers[2:]
    )
    pool.attach(remote_engine.runner.model)
    remote = remote_engine.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in remote] == [o.outputs[0].token_ids for o in local]
    stats = [shard.stats() for shard in pool.shards]
    assert all(s.pairs > 0 for s in stats)  # the load is spread over both actors
    assert all(s.pairs_per_expert[5] > 0 for s in stats)  # and over both replicas of expert 5


def test_bad_expert_requests_are_invalid_argument(pool):
    stub = pool.shards[0].stub
    hidden = tensor_to_proto(torch.zeros(2, 64))
    ids = tensor_to_proto(torch.tensor([[0, 1, 2], [1, 2, 3]], dtype=torch.int32))
    weights = tensor_to_proto(torch.ones(2, 3))
    bad = [
        expert_pb2.RunExpertsRequest(layer=0, hidden=hidden, expert_ids=ids, weights=weights),  # dense layer
        expert_pb2.RunExpertsRequest(
            layer=2, hidden=tensor_to_proto(torch.zeros(2, 5)), expert_ids=ids, weights=weights
        ),
        expert_pb2.RunExpertsRequest(
            layer=2,
            hidden=hidden,
            expert_ids=tensor_to_proto(torch.full((2, 3), 99, dtype=torch.int32)),
            weights=weights,
        ),
    ]
    for request in bad:
        with pytest.raises(grpc.RpcError) as err:
            stub.RunExperts(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    good = stub.RunExperts(
        expert_pb2.RunExpertsRequest(layer=2, hidden=hidden, expert_ids=ids, weights=weights), timeout=30
    )
    assert list(good.output.shape) == [2, 64]


def test_stream_calls_answer_like_unary_calls_and_survive_errors(pool):
    """The router's hot path: calls on a long-lived stream per thread, reopened after an error or after a
    call whose response was never read, so that responses never go to the wrong call."""
    stub = pool.shards[0].stub
    ids = tensor_to_proto(torch.tensor([[0, 1, 2], [1, 2, 3]], dtype=torch.int32))
    weights = tensor_to_proto(torch.ones(2, 3))

    def request(value: float, layer: int = 2) -> expert_pb2.RunExpertsRequest:
        hidden = tensor_to_proto(torch.full((2, 64), value))
        return expert_pb2.RunExpertsRequest(layer=layer, hidden=hidden, expert_ids=ids, weights=weights)

    expected = {v: stub.RunExperts(request(v), timeout=30).output.data for v in (0.5, -1.0)}
    streams = ThreadStreams(stub.RunExpertsStream)
    try:
        first = streams.send(request(0.5))
        assert first.receive().output.data == expected[0.5]
        assert streams.send(request(-1.0)) is first  # the same stream, one call after the other
        assert first.receive().output.data == expected[-1.0]

        with pytest.raises(grpc.RpcError) as err:
            streams.send(request(0.5, layer=0)).receive()  # layer 0 is dense: the error ends the stream
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        again = streams.send(request(0.5))
        assert again is not first and again.receive().output.data == expected[0.5]

        abandoned = streams.send(request(0.5))  # its caller never reads the response
        fresh = streams.send(request(-1.0))
        assert fresh is not abandoned and fresh.receive().output.data == expected[-1.0]

        with ThreadPoolExecutor(2) as threads:  # concurrent callers, each on its own stream
            values = [0.5, -1.0] * 6
            outputs = list(threads.map(lambda v: streams.send(request(v)).receive().output.data, values))
        assert outputs == [expected[v] for v in values]
    finally:
        streams.close()


def process_state(pid: int) -> str | None:
    """The state letter in /proc/PID/stat (T: stopped, Z: zombie); None when there is no such process."""
    fields = stat_fields(pid)
    return fields[0] if fields else None


def assert_replaced_without_a_changed_token(pool, path: str, shard: int, fail: Callable[[], None]) -> None:
    """PROMPTS before and after `fail()` breaks the shard's actor: the same tokens, one restart counted, and
    the shard served from a new address."""
    engine = LLMEngine.from_checkpoint(path, CONFIG, local_experts=False)
    pool.attach(engine.runner.model)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params)]
    restarts = {"worker": f"expert-{shard}"}
    before = REGISTRY.get_sample_value("latentmoe_expert_worker_restarts_total", restarts) or 0.0
    old_address = pool.shards[shard].address
    fail()
    assert [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params)] == expected
    assert REGISTRY.get_sample_value("latentmoe_expert_worker_restarts_total", restarts) == before + 1
    assert pool.shards[shard].address != old_address


def test_a_frozen_actor_is_restarted_and_no_answer_changes(pool, checkpoint_dir):
    """A stopped process keeps its sockets open and stays alive to Ray: the router's keepalive pings go
    unanswered, the health check times out, and the router has Ray restart the actor."""
    pid = ray.get(pool.shards[0].actor.__ray_call__.remote(lambda _actor: os.getpid()))
    try:
        assert_replaced_without_a_changed_token(
            pool, checkpoint_dir("v3"), 0, lambda: os.kill(pid, signal.SIGSTOP)
        )
        assert process_state(pid) in (None, "Z")  # Ray killed it
    finally:
        if process_state(pid) not in (None, "Z"):  # ours to clean up if Ray did not
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)


def test_a_restarted_actor_is_reconnected_and_no_answer_changes(pool, checkpoint_dir):
    """Ray restarts a killed expert actor on a fresh port; the router's call to it fails UNAVAILABLE, waits
    for the new address and sends the call again. Last in this module: the pool's actor is a new process."""
    assert_replaced_without_a_changed_token(
        pool, checkpoint_dir("v3"), 1, lambda: ray.kill(pool.shards[1].actor, no_restart=False)
    )
