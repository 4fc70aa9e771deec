"""The expert worker: a shard of routed experts (every MoE layer, a subset of the experts), as a plain class,
its gRPC servicer (a thin adapter), and the Ray actor that hosts both and reports its address."""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from functools import partial

import grpc
import ray
import torch

from common.checkpoint import load_expert_shard
from common.rpc.allocator import reuse_freed_memory
from common.rpc.codec import tensor_from_proto, tensor_to_proto
from common.rpc.server import start_server
from common.torch_thread import WATCHDOG_TIMEOUT_S, TorchThread
from latentmoe.v1 import expert_pb2, expert_pb2_grpc

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertShard"].full_name


class ExpertWorker:
    """Loads only its experts from the checkpoint and computes their weighted partial outputs."""

    def __init__(
        self,
        model_dir: str,
        expert_ids: Sequence[int],
        dtype: str = "float32",
        device: str = "cpu",
        name: str = "expert-worker",
    ) -> None:
        self.name = name
        self.dtype = getattr(torch, dtype)
        self.device = torch.device(device)
        self.config, self.layers = load_expert_shard(
            model_dir, expert_ids, self.dtype, self.device, progress=False
        )
        self.expert_ids = list(expert_ids)
        self.calls = 0
        self.pairs_per_expert: collections.Counter[int] = collections.Counter()
        self.busy_seconds = 0.0

    def run(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        experts = self.layers.get(layer)
        if experts is None:
            raise ValueError(
                f"layer {layer} is not a MoE layer of this model (MoE layers: {sorted(self.layers)})"
            )
        if hidden.dim() != 2 or hidden.shape[1] != self.config.hidden_size:
            raise ValueError(f"hidden must be [T, {self.config.hidden_size}], got {list(hidden.shape)}")
        if (
            expert_ids.shape != weights.shape
            or expert_ids.dim() != 2
            or expert_ids.shape[0] != hidden.shape[0]
        ):
            raise ValueError(
                f"expert_ids {list(expert_ids.shape)} and weights {list(weights.shape)} must both be [T, k] "
                f"with T = {hidden.shape[0]}"
            )
        ids = expert_ids.to(self.device, torch.int64)
        if ids.numel() and not -1 <= int(ids.min()) <= int(ids.max()) < self.config.n_routed_experts:
            raise ValueError(f"expert ids must be in -1..{self.config.n_routed_experts - 1} (-1: skip)")
        with torch.inference_mode():
            start = time.perf_counter()
            out = experts(hidden.to(self.device, self.dtype), weights.to(self.device, torch.float32), ids)
            self.busy_seconds += time.perf_counter() - start
            self.calls += 1
            self.pairs_per_expert.update(ids[experts.global_to_local[ids] >= 0].tolist())
        return out


class ExpertShardServicer(expert_pb2_grpc.ExpertShardServicer):
    """Handler threads decode and encode; the worker computes on its torch thread, one call at a time."""

    def __init__(self, worker: ExpertWorker, torch_thread: TorchThread) -> None:
        self.worker, self.torch_thread = worker, torch_thread

    def RunExperts(self, request, context):  # noqa: N802
        try:
            args = [tensor_from_proto(t) for t in (request.hidden, request.expert_ids, request.weights)]
            start = time.perf_counter()
            out = self.torch_thread.call(self.worker.run, request.layer, *args)
            elapsed = time.perf_counter() - start
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        response = expert_pb2.RunExpertsResponse(compute_seconds=elapsed)
        tensor_to_proto(out, response.output)
        return response

    def RunExpertsStream(self, requests, context):  # noqa: N802
        for request in requests:  # an abort in RunExperts ends the stream with its status
            yield self.RunExperts(request, context)

    def ShardInfo(self, request, context):  # noqa: N802
        w = self.worker
        return expert_pb2.ShardInfoResponse(
            expert_ids=w.expert_ids,
            layers=sorted(w.layers),
            dtype=str(w.dtype).removeprefix("torch."),
            hidden_size=w.config.hidden_size,
            worker=w.name,
        )

    def Stats(self, request, context):  # noqa: N802
        w = self.worker
        return expert_pb2.StatsResponse(
            calls=w.calls,
            pairs=sum(w.pairs_per_expert.values()),
            busy_seconds=w.busy_seconds,
            pairs_per_expert=dict(w.pairs_per_expert),
        )


def serve_worker(
    worker: ExpertWorker, torch_thread: TorchThread, host: str = "127.0.0.1", port: int = 0
) -> tuple[grpc.Server, str]:
    """Serve `worker` (built on `torch_thread`, which then runs all its computations)."""
    servicer = ExpertShardServicer(worker, torch_thread)
    return start_server(
        [partial(expert_pb2_grpc.add_ExpertShardServicer_to_server, servicer)], [SERVICE_NAME], host, port
    )


@ray.remote
class ExpertActor:
    """Ray actor hosting one expert worker; on (re)start it serves its shard over gRPC on a fresh port."""

    def __init__(
        self,
        model_dir: str,
        expert_ids: list[int],
        dtype: str,
        name: str,
        host: str | None = None,
        watchdog_s: float = WATCHDOG_TIMEOUT_S,
    ) -> None:
        """watchdog_s: a computation that runs longer ends the actor, which Ray restarts (0: never)."""
        reuse_freed_memory()  # Ray's threads already have their heaps; the torch thread's is new
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.torch_thread = TorchThread(name)
        self.worker = self.torch_thread.call(ExpertWorker, model_dir, expert_ids, dtype, device, name)
        if watchdog_s:
            self.torch_thread.watch(watchdog_s)
        # Reachable from the router on another node: the node's own address unless told otherwise.
        host = host or ray.util.get_node_ip_address()
        self.server, self._address = serve_worker(self.worker, self.torch_thread, host)

    def address(self) -> str:
        return self._address
