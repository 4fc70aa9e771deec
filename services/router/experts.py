"""Routed experts as Ray actors: the pool that places them, and the drop-in that calls them.

`RemoteExperts` has RoutedExperts' call signature, so a MoE layer runs unchanged whether its experts are in
this process or spread over actors: switching is configuration (`ExpertPool.attach`), not a model code path.
Each layer call sends every shard only the tokens routed to it, all shards in parallel, and adds up the
weighted partial outputs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from common import metrics
from common.config import ModelConfig
from common.model.moe import MoE
from common.rpc.channel import KEEPALIVE_S, worker_channel
from common.rpc.codec import tensor_from_proto, tensor_to_proto
from common.rpc.stream import CallStream, ThreadStreams
from common.torch_thread import WATCHDOG_TIMEOUT_S
from latentmoe.v1 import expert_pb2, expert_pb2_grpc
from services.expert.worker import ExpertActor
from services.health import check

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 120.0


@dataclass
class ShardClient:
    """The router's handle on one expert actor: its gRPC stub, re-resolved if Ray restarts the actor."""

    name: str
    actor: ray.actor.ActorHandle
    keepalive_s: float = KEEPALIVE_S
    address: str = ""
    stub: expert_pb2_grpc.ExpertShardStub | None = field(default=None, repr=False)
    channel: grpc.Channel | None = field(default=None, repr=False)
    streams: ThreadStreams[expert_pb2.RunExpertsRequest, expert_pb2.RunExpertsResponse] | None = field(
        default=None, repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def connect(self) -> None:
        self.address = ray.get(self.actor.address.remote(), timeout=300)
        self.close()
        self.channel = worker_channel(self.address, self.keepalive_s)
        self.stub = expert_pb2_grpc.ExpertShardStub(self.channel)
        self.streams = ThreadStreams(self.stub.RunExpertsStream)

    def close(self) -> None:
        if self.channel is not None:
            self.streams.close()
            self.channel.close()

    def reconnect(self, seen: ThreadStreams) -> None:
        """After a call on `seen` failed: wait for the restarted actor, unless another thread already has."""
        with self._lock:
            if self.streams is not seen:
                return
            metrics.EXPERT_WORKER_RESTARTS.labels(self.name).inc()
            where = self.name, self.address
            if self._frozen():  # alive to Ray, so it would never be restarted
                log.warning("expert worker %s at %s does not answer: restarting it", *where)
                ray.kill(self.actor, no_restart=False)
            else:
                log.warning("expert worker %s at %s unavailable: waiting for Ray to restart it", *where)
            self.connect()

    def _frozen(self) -> bool:
        """A crashed actor's port refuses at once; a frozen process (or a host gone from the network) leaves
        the health check unanswered."""
        try:
            check(self.address, timeout=self.keepalive_s)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return False

    def stats(self) -> expert_pb2.StatsResponse:
        return self.stub.Stats(expert_pb2.StatsRequest(), timeout=30)


class RemoteExperts(torch.nn.Module):
    """Drop-in for RoutedExperts: (x [T, h], weights [T, k], ids [T, k]) -> [T, h] from the shards."""

    def __init__(self, layer: int, shards: list[ShardClient], owners: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.shards = layer, shards
        self.owners = owners  # [E, R] shard index of each replica, -1 padded
        self.replicas = (owners >= 0).sum(dim=1)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.submit(x, weights, ids)()

    def submit(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Send every shard its pairs now; the returned function waits for them and adds up the outputs."""
        # Replicated experts: pairs alternate over the replicas by token index.
        token = torch.arange(ids.shape[0], device=ids.device)[:, None]
        shard_of_pair = self.owners[ids, token % self.replicas[ids]]
        calls = []
        start = time.perf_counter()
        for s, shard in enumerate(self.shards):
            mine = shard_of_pair == s
            rows = mine.any(dim=1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            request = expert_pb2.RunExpertsRequest(
                layer=self.layer,
                expert_ids=tensor_to_proto(torch.where(mine[rows], ids[rows], -1).int()),
                weights=tensor_to_proto(weights[rows].float()),
            )
            tensor_to_proto(x[rows], request.hidden)
            streams = shard.streams
            calls.append((shard, rows, request, int(mine.sum()), streams, streams.send(request)))

        def combine() -> torch.Tensor:
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            for shard, rows, request, pairs, streams, stream in calls:
                response = _receive(shard, request, streams, stream)
                metrics.EXPERT_WORKER_TOKENS.labels(shard.name).inc(pairs)
                # Until the router takes the response: a shard that answers first waits for the one before it.
                metrics.EXPERT_WORKER_LATENCY.labels(shard.name).observe(time.perf_counter() - start)
                metrics.EXPERT_WORKER_COMPUTE.labels(shard.name).inc(response.compute_seconds)
                out.index_add_(0, rows, tensor_from_proto(response.output, x.device).float())
            return out.to(x.dtype)

        return combine


def _receive(
    shard: ShardClient, request: expert_pb2.RunExpertsRequest, streams: ThreadStreams, stream: CallStream
) -> expert_pb2.RunExpertsResponse:
    """The shard's response; if its actor is gone, wait for Ray to restart it and send the request again."""
    try:
        return stream.receive()
    except grpc.RpcError as e:
        # CANCELLED: another thread saw the actor go first and closed these streams as it reconnected.
        if e.code() != grpc.StatusCode.UNAVAILABLE and not (
            e.code() == grpc.StatusCode.CANCELLED and shard.streams is not streams
        ):
            raise
        shard.reconnect(streams)
        return shard.stub.RunExperts(request, timeout=CALL_TIMEOUT_S)


def contiguous_shards(num_experts: int, num_workers: int) -> list[list[int]]:
    """Experts 0..E-1 cut into num_workers contiguous, near-equal ranges (the default placement)."""
    bounds = [round(i * num_experts / num_workers) for i in range(num_workers + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(num_workers)]


class ExpertPool:
    """Places one expert actor per shard through a placement group (spread across nodes, a GPU each when the
    cluster has GPUs), started with Ray's restart options; each actor loads only its shard."""

    def __init__(
        self,
        model_dir: str,
        num_workers: int,
        dtype: str = "float32",
        shards: list[list[int]] | None = None,
        host: str | None = None,
        keepalive_s: float = KEEPALIVE_S,
        watchdog_s: float = WATCHDOG_TIMEOUT_S,
    ) -> None:
        """host: the address the actors bind and advertise (default: each node's own IP address); keepalive_s:
        an actor that leaves a ping unanswered this long is restarted (common/rpc/channel.py); watchdog_s: an
        actor whose computation runs longer ends itself (common/torch_thread.py)."""
        self.config = ModelConfig.from_file(model_dir)
        n = self.config.n_routed_experts
        self.expert_map = shards or contiguous_shards(n, num_workers)
        missing = set(range(n)) - {e for shard in self.expert_map for e in shard}
        if missing:
            raise ValueError(f"experts {sorted(missing)} are on no worker")
        gpus = ray.cluster_resources().get("GPU", 0) >= len(self.expert_map)
        bundle = {"CPU": 1, "GPU": 1} if gpus else {"CPU": 1}
        self.placement_group = placement_group([bundle] * len(self.expert_map), strategy="SPREAD")
        ray.get(self.placement_group.ready(), timeout=300)
        self.shards = []
        for i, experts in enumerate(self.expert_map):
            actor = ExpertActor.options(
                num_cpus=1,
                num_gpus=1 if gpus else 0,
                max_restarts=-1,
                max_task_retries=-1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i),
            ).remote(model_dir, experts, dtype, f"expert-{i}", host, watchdog_s)
            self.shards.append(ShardClient(f"expert-{i}", actor, keepalive_s))
        for shard in self.shards:
            shard.connect()
        replicas = max(sum(e in shard for shard in self.expert_map) for e in range(n))
        self.owners = torch.full((n, replicas), -1, dtype=torch.int64)
        for s, experts in enumerate(self.expert_map):
            for e in experts:
                slot = int((self.owners[e] >= 0).sum())
                self.owners[e, slot] = s

    def attach(self, model: torch.nn.Module) -> None:
        """Route every MoE layer of `model` through the actors."""
        for i, layer in enumerate(model.layers):
            if isinstance(layer.mlp, MoE):
                if getattr(layer.mlp.experts, "num_shared", 0):
                    raise ValueError(
                        f"layer {i}: its shared experts were packed with local routed experts; load the "
                        "model without routed experts (expert_ids=[]) to route them through the actors"
                    )
                layer.mlp.experts = RemoteExperts(i, self.shards, self.owners)

    def shutdown(self) -> None:
        for shard in self.shards:
            shard.close()
            ray.kill(shard.actor, no_restart=True)
        remove_placement_group(self.placement_group)
