"""Attention on attention workers: the router's backend that assigns sequences to workers and the drop-in
module that calls them.

`AttentionPool` is the ModelRunner's attention backend in the distributed router. Each sequence sticks to one
worker (the least loaded when it first runs; forks follow their parent), whose hot copy holds its pages. The
pool tracks which blocks each worker's hot copy holds valid: a worker that writes a block makes it valid there
and stale everywhere else (block ids are reused after frees), and a sequence's computed blocks that its worker
lacks (a prefix computed elsewhere, a copy on write, a sequence moved off a lost worker) are pulled from the
KV-cache service before layer 0. `RemoteAttention` has MLA's call signature, so the decoder runs unchanged.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import torch
from torch import nn

from common import metrics
from common.engine.model_runner import PagesDoNotFit, Span, WorkerLost
from common.engine.sequence import Sequence
from common.model.decoder import DeepseekModel
from common.rpc.channel import KEEPALIVE_S, worker_channel
from common.rpc.codec import tensor_from_proto, tensor_to_proto
from common.rpc.stream import ThreadStreams
from latentmoe.v1 import attention_pb2, attention_pb2_grpc
from services.kvcache.client import RemoteBlockManager

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 120.0
PROBE_INTERVAL_S = 2.0  # how often lost workers are asked whether they are back


@dataclass
class WorkerClient:
    name: str
    address: str
    keepalive_s: float = KEEPALIVE_S
    capacity: int = field(default=0, init=False)  # hot-copy pages: the blocks a step may pin there
    channel: grpc.Channel = field(init=False, repr=False)
    stub: attention_pb2_grpc.AttentionStub = field(init=False, repr=False)
    streams: ThreadStreams[attention_pb2.AttendRequest, attention_pb2.AttendResponse] = field(
        init=False, repr=False
    )

    def __post_init__(self) -> None:
        self.channel = worker_channel(self.address, self.keepalive_s)
        self.stub = attention_pb2_grpc.AttentionStub(self.channel)
        self.streams = ThreadStreams(self.stub.AttendStream)

    def close(self) -> None:
        self.streams.close()
        self.channel.close()

    def info(self, timeout: float = 60, wait_for_ready: bool = True) -> attention_pb2.WorkerInfoResponse:
        request = attention_pb2.WorkerInfoRequest()
        return self.stub.WorkerInfo(request, timeout=timeout, wait_for_ready=wait_for_ready)


@dataclass
class _Part:
    """One worker's share of a micro-batch: which rows of the hidden states, and the spans to announce."""

    worker: WorkerClient
    rows: torch.Tensor | None  # None: every row
    batch_id: str
    spec: attention_pb2.AttentionBatchSpec


@dataclass
class RemoteBatch:
    parts: list[_Part]


class RemoteAttention(nn.Module):
    """Drop-in for MLA: each worker attends its rows of the micro-batch, all workers in parallel."""

    def __init__(self, layer: int, pool: AttentionPool) -> None:
        super().__init__()
        self.layer, self.pool = layer, pool

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: RemoteBatch, cache: None
    ) -> torch.Tensor:
        calls = []
        for part in batch.parts:
            request = attention_pb2.AttendRequest(batch_id=part.batch_id, layer=self.layer)
            tensor_to_proto(x if part.rows is None else x[part.rows], request.hidden)
            if self.layer == 0:  # rotary positions are derived from the spans on the worker
                request.batch.CopyFrom(part.spec)
            calls.append((part.worker, request))
        responses = self.pool.attend(calls)
        if len(batch.parts) == 1 and batch.parts[0].rows is None:
            return tensor_from_proto(responses[0].output, x.device).to(x.dtype)
        out = torch.empty_like(x)
        for part, response in zip(batch.parts, responses, strict=True):
            out[part.rows] = tensor_from_proto(response.output, x.device).to(x.dtype)
        return out


class AttentionPool:
    """The router's attention backend over attention workers that share one KV-cache service."""

    needs_mla_weights = False  # attach() puts RemoteAttention in place of every layer's MLA

    def __init__(
        self,
        addresses: list[str],
        blocks: RemoteBlockManager,
        micro_batches: int = 2,
        micro_batch_min_tokens: int = 0,
        probe_interval_s: float = PROBE_INTERVAL_S,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        """keepalive_s: a worker that leaves a ping unanswered this long is lost (common/rpc/channel.py)."""
        if not addresses:
            raise ValueError("give at least one attention worker address")
        self.blocks = blocks
        self.micro_batches, self.micro_batch_min_tokens = micro_batches, micro_batch_min_tokens
        self.keepalive_s = keepalive_s
        self.workers = [WorkerClient(f"attention-{i}", a, keepalive_s) for i, a in enumerate(addresses)]
        for w in self.workers:
            self._check(w, w.info())
        self.valid: list[set[int]] = [set() for _ in self.workers]  # blocks each hot copy holds up to date
        self.owner: dict[int, int] = {}  # seq_id -> worker index
        self.live: dict[int, Sequence] = {}
        self._batch_ids = itertools.count()
        self._steps = itertools.count()
        self._rotation = itertools.count()  # breaks ties between equally loaded workers
        self._lock = threading.Lock()
        # Lost workers are probed in the background; the ones that answer again rejoin at the next step.
        self.lost: list[WorkerClient] = []
        self._revived: queue.SimpleQueue[WorkerClient] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._prober = threading.Thread(
            target=self._probe_lost, args=(probe_interval_s,), name="attention-probe", daemon=True
        )
        self._prober.start()

    def _check(self, worker: WorkerClient, info: attention_pb2.WorkerInfoResponse) -> None:
        if (info.num_blocks, info.block_size) != (self.blocks.num_blocks, self.blocks.block_size):
            raise ValueError(
                f"attention worker {worker.address} has {info.num_blocks} blocks x {info.block_size} tokens, "
                f"the KV-cache service {self.blocks.num_blocks} x {self.blocks.block_size}: not the same one"
            )
        worker.name = info.worker or worker.name
        worker.capacity = info.hot_copy_blocks or info.num_blocks

    def _probe_lost(self, interval: float) -> None:
        while not self._closed.wait(interval):
            with self._lock:
                lost = list(self.lost)
            for worker in lost:
                fresh = WorkerClient(worker.name, worker.address, self.keepalive_s)
                try:
                    self._check(fresh, fresh.info(timeout=min(interval, 5.0), wait_for_ready=False))
                except (grpc.RpcError, ValueError):
                    fresh.close()
                    continue
                with self._lock:
                    self.lost.remove(worker)
                worker.close()  # no step has used it since it was dropped
                self._revived.put(fresh)

    def _admit_revived(self) -> None:
        """Back with an empty hot copy (a restarted process): it pulls whatever its new sequences lack."""
        while not self._revived.empty():
            worker = self._revived.get()
            log.warning("attention worker %s at %s is back", worker.name, worker.address)
            self.workers.append(worker)
            self.valid.append(set())

    def attach(self, model: DeepseekModel) -> None:
        """Run every layer's attention on the workers."""
        for i, layer in enumerate(model.layers):
            layer.self_attn = RemoteAttention(i, self)

    def attend(
        self, calls: list[tuple[WorkerClient, attention_pb2.AttendRequest]]
    ) -> list[attention_pb2.AttendResponse]:
        """One layer's Attend calls, all in flight at once. A worker that cannot be reached is dropped: its
        sequences move to the others, which pull the pages they lack from the KV-cache service, and the step
        is run again (WorkerLost)."""
        start = time.perf_counter()
        pending = [(worker, worker.streams.send(request)) for worker, request in calls]
        responses = []
        for worker, stream in pending:
            try:
                response = stream.receive()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.drop(worker, f"{e.code().name}: {e.details()}")
                raise WorkerLost(f"attention worker {worker.name} at {worker.address} is gone") from e
            # Until the router takes the response: a worker that answers first waits for the one before it.
            metrics.ATTENTION_WORKER_LATENCY.labels(worker.name).observe(time.perf_counter() - start)
            metrics.ATTENTION_WORKER_COMPUTE.labels(worker.name).inc(response.compute_seconds)
            responses.append(response)
        return responses

    def drop(self, worker: WorkerClient, reason: str) -> None:
        with self._lock:  # both micro-batches may report the same loss
            if worker not in self.workers:
                return
            i = self.workers.index(worker)
            if len(self.workers) == 1:
                raise RuntimeError(f"the last attention worker {worker.name} is gone ({reason})")
            log.error(
                "attention worker %s at %s lost (%s): moving its sequences",
                worker.name,
                worker.address,
                reason,
            )
            metrics.ATTENTION_WORKER_LOSSES.labels(worker.name).inc()
            del self.workers[i], self.valid[i]
            self.owner = {s: w - (w > i) for s, w in self.owner.items() if w != i}
            self.live = {s: seq for s, seq in self.live.items() if s in self.owner}
            self.lost.append(worker)  # its channel stays open: the other micro-batch may still be calling it

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """The service copied these pages itself; no hot copy holds the destinations yet."""
        for _, dst in copies:
            for valid in self.valid:
                valid.discard(dst)

    def prepare(self, parts: list[tuple[list[Span], list[Sequence]]]) -> list[tuple[RemoteBatch, None]]:
        """One RemoteBatch per micro-batch: each worker gets its sequences' rows (prefill tokens first, then
        decodes, as the spans list them) and the blocks it must pull before attending."""
        self._admit_revived()
        self._forget_finished()
        self._fit([s for prefills, decodes in parts for s in [*(s for s, _ in prefills), *decodes]])
        bs = self.blocks.block_size
        # Compare against the hot copies as the step starts: the micro-batches reach a worker in any order.
        valid_at_start = [set(v) for v in self.valid]
        pulled: list[tuple[int, list[int]]] = []
        written: list[tuple[int, list[int]]] = []
        batches = []
        step = next(self._steps)
        for prefills, decodes in parts:
            by_worker: dict[int, tuple[attention_pb2.AttentionBatchSpec, list[int]]] = {}
            row = 0
            for seq, n, is_prefill in [(s, n, True) for s, n in prefills] + [(s, 1, False) for s in decodes]:
                w = self._worker_of(seq)
                spec, rows = by_worker.setdefault(
                    w, (attention_pb2.AttentionBatchSpec(router=self.blocks.namespace, step=step), [])
                )
                table = self.blocks.block_table(seq.seq_id)
                computed = seq.num_computed_tokens if is_prefill else seq.num_tokens - 1
                span = attention_pb2.SequenceSpan(block_table=table, num_computed=computed, num_new=n)
                (spec.prefills if is_prefill else spec.decodes).append(span)
                rows.extend(range(row, row + n))
                row += n
                pull = [b for b in table[: -(-computed // bs)] if b not in valid_at_start[w]]
                spec.pull_block_ids.extend(pull)
                pulled.append((w, pull))
                written.append((w, table[computed // bs : -(-(computed + n) // bs)]))
            single = len(by_worker) == 1
            batch_parts = [
                _Part(
                    self.workers[w], None if single else torch.tensor(rows), f"b{next(self._batch_ids)}", spec
                )
                for w, (spec, rows) in by_worker.items()
            ]
            batches.append((RemoteBatch(batch_parts), None))
        for w, blocks in pulled:
            self.valid[w].update(blocks)
        for w, blocks in written:  # the writer's copy is now the only one that matches the service
            for other, valid in enumerate(self.valid):
                (valid.update if other == w else valid.difference_update)(blocks)
        return batches

    @property
    def max_blocks_per_sequence(self) -> int:
        """A sequence runs on one worker: it may hold no more pages than the smallest hot copy."""
        return min(self.blocks.num_blocks, *(w.capacity for w in self.workers))

    def _fit(self, seqs: list[Sequence]) -> None:
        """Move sequences off a worker whose hot copy cannot hold the pages of this step (its micro-batches
        are open at once) to the worker with the most room; they pull their pages there, as after a loss.
        What still does not fit, the newest sequences first, is preempted (PagesDoNotFit)."""
        if all(w.capacity >= self.blocks.num_blocks for w in self.workers):
            return  # hot copies as large as the service: every page always fits
        tables = {s.seq_id: self.blocks.block_table(s.seq_id) for s in seqs}
        mine: list[list[Sequence]] = [[] for _ in self.workers]
        for s in seqs:
            mine[self._worker_of(s)].append(s)

        def pages(w: int) -> int:
            return len({b for s in mine[w] for b in tables[s.seq_id]})

        for w, worker in enumerate(self.workers):
            while pages(w) > worker.capacity and len(mine[w]) > 1:
                others = [o for o in range(len(self.workers)) if o != w]
                to = max(others, key=lambda o: self.workers[o].capacity - pages(o), default=None)
                room = 0 if to is None else self.workers[to].capacity - pages(to)
                fitting = [s for s in mine[w] if len(tables[s.seq_id]) <= room]
                if not fitting:
                    break
                seq = max(fitting, key=lambda s: len(tables[s.seq_id]))  # the largest that fits
                mine[w].remove(seq)
                mine[to].append(seq)
                self.owner[seq.seq_id] = to
        victims = []
        for w, worker in enumerate(self.workers):
            while pages(w) > worker.capacity and len(mine[w]) > 1:
                victims.append(max(mine[w], key=lambda s: s.seq_id))
                mine[w].remove(victims[-1])
        if victims:
            for seq in victims:  # placed afresh when they run again
                del self.owner[seq.seq_id], self.live[seq.seq_id]
            raise PagesDoNotFit(victims)

    def _worker_of(self, seq: Sequence) -> int:
        """Sticky: a sequence's worker, chosen when it first runs (a fork joins its parent's worker)."""
        w = self.owner.get(seq.seq_id)
        if w is None:
            siblings = [self.owner[s.seq_id] for s in seq.request.seqs if s.seq_id in self.owner]
            if siblings:
                w = siblings[0]
            else:
                load, n, start = Counter(self.owner.values()), len(self.workers), next(self._rotation)
                w = min(range(n), key=lambda i: (load[i], (i - start) % n))
            self.owner[seq.seq_id] = w
            self.live[seq.seq_id] = seq
        return w

    def _forget_finished(self) -> None:
        for seq_id in [i for i, s in self.live.items() if s.finished]:
            del self.live[seq_id], self.owner[seq_id]

    def worker_info(self) -> list[attention_pb2.WorkerInfoResponse]:
        return [w.info() for w in self.workers]

    def close(self) -> None:
        self._closed.set()
        self._prober.join(timeout=10)
        for w in self.workers + self.lost:
            w.close()
