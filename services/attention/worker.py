"""The attention worker: MLA for every layer of the sequences the router assigns to it, as a plain class, its
gRPC servicer (a thin adapter) and the `python -m services.attention.worker` entry point.

    python -m services.attention.worker --model checkpoints/mini --kv-cache 127.0.0.1:50060 --port 50070

It keeps the latent pages of its sequences locally (the hot copy, services/attention/hot_copy.py: a bounded
cache of the KV-cache service's blocks), pulls the blocks it lacks or the router says are stale, and writes
every new latent entry through to the service after the micro-batch's last layer, so any other worker can
continue from the service's copy.
"""

from __future__ import annotations

import argparse
import collections
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import grpc
import torch

from common import metrics
from common.checkpoint import load_attention_layers, resolve_model
from common.kvcache import BlockPool
from common.model.mla import AttentionBatch
from common.model.rope import RotaryEmbedding
from common.rpc.allocator import reuse_freed_memory
from common.rpc.codec import tensor_from_proto, tensor_to_proto
from common.rpc.server import serve_until_signalled, start_server
from common.torch_thread import WATCHDOG_TIMEOUT_S, TorchThread
from latentmoe.v1 import attention_pb2, attention_pb2_grpc
from services.attention.hot_copy import HotCopy, HotCopyFull
from services.kvcache.client import RemoteBlockManager

log = logging.getLogger(__name__)
SERVICE_NAME = attention_pb2.DESCRIPTOR.services_by_name["Attention"].full_name
MAX_OPEN_BATCHES = 8  # micro-batches announced but not finished (a router that gave up on one leaves it)

# A span: (block table, tokens already computed, new tokens this micro-batch).
Span = tuple[list[int], int, int]


@dataclass
class BatchSpec:
    """What opens a micro-batch (AttentionBatchSpec): its spans, the blocks to pull, whose step it is."""

    prefills: list[Span]
    decodes: list[Span]
    pull: list[int] = field(default_factory=list)
    router: str = ""
    step: int = 0

    @property
    def tables(self) -> list[list[int]]:
        """Every span's block table (the service's ids), prefills first."""
        return [table for table, _, _ in [*self.prefills, *self.decodes]]


@dataclass
class _OpenBatch:
    batch: AttentionBatch  # over local pages
    cos: torch.Tensor
    sin: torch.Tensor
    spec: BatchSpec  # its tables' blocks stay pinned in the hot copy until the batch closes


class AttentionWorker:
    """MLA of all layers over a local hot copy of the pages (the KV-cache service has the master)."""

    def __init__(
        self,
        model_dir: str,
        kv_cache: str,
        device: str = "cpu",
        name: str = "attention-worker",
        hot_copy_blocks: int | None = None,
    ) -> None:
        """hot_copy_blocks: local pages (default: as many as the KV-cache service has blocks)."""
        self.name = name
        self.kv = RemoteBlockManager(kv_cache, timeout=120.0)  # used for pages only: no sequence of its own
        self.kv_cache_address = kv_cache
        self.device = torch.device(device)
        self.dtype = self.kv.dtype  # the pages' dtype is the serving dtype
        self.config, self.layers = load_attention_layers(model_dir, self.dtype, self.device, progress=False)
        if (self.kv.num_layers, self.kv.entry_dim) != (self.config.num_hidden_layers, self.config.latent_dim):
            raise ValueError(
                f"the KV-cache service at {kv_cache} has {self.kv.num_layers} layers x {self.kv.entry_dim}, "
                f"this model needs {self.config.num_hidden_layers} x {self.config.latent_dim}"
            )
        self.rotary = RotaryEmbedding(self.config).to(self.device)
        pool = BlockPool(
            self.config.num_hidden_layers,
            hot_copy_blocks or self.kv.num_blocks,
            self.kv.block_size,
            self.config.latent_dim,
            self.dtype,
            self.device,
        )
        self.hot = HotCopy(pool, self.kv)
        self.batches: collections.OrderedDict[str, _OpenBatch] = collections.OrderedDict()
        self.tokens_computed = self.entries_written = 0
        self.busy_seconds = 0.0
        self._tokens = metrics.ATTENTION_TOKENS.labels(name)
        self._pulled = metrics.ATTENTION_BLOCKS_PULLED.labels(name)

    def attend(
        self,
        batch_id: str,
        layer: int,
        hidden: torch.Tensor,
        spec: BatchSpec | None,
    ) -> torch.Tensor:
        """MLA output [T, hidden] of one layer; `spec` opens the batch (with its first layer)."""
        if not 0 <= layer < self.config.num_hidden_layers:
            raise ValueError(f"layer {layer} outside 0..{self.config.num_hidden_layers - 1}")
        if hidden.dim() != 2 or hidden.shape[1] != self.config.hidden_size:
            raise ValueError(f"hidden must be [T, {self.config.hidden_size}], got {list(hidden.shape)}")
        start = time.perf_counter()
        with torch.inference_mode():
            if spec is not None:
                self._open(batch_id, spec)
            open_batch = self.batches.get(batch_id)
            if open_batch is None:
                raise ValueError(f"unknown batch_id {batch_id!r}: send its spans with its first layer")
            batch = open_batch.batch
            if hidden.shape[0] != batch.num_tokens:
                raise ValueError(
                    f"batch {batch_id!r} has {batch.num_tokens} tokens, hidden has {hidden.shape[0]}"
                )
            out = self.layers[layer](
                hidden.to(self.device, self.dtype), open_batch.cos, open_batch.sin, batch, self.hot.pool
            )
            if layer == self.config.num_hidden_layers - 1:
                self._write_through(batch)
                self.hot.close(self.batches.pop(batch_id).spec.tables)
        self.busy_seconds += time.perf_counter() - start
        return out

    def _open(self, batch_id: str, spec: BatchSpec) -> None:
        bs, n = self.kv.block_size, self.kv.num_blocks
        prefills, decodes, pull = spec.prefills, spec.decodes, spec.pull
        spans = [*prefills, *decodes]
        for table, computed, new in spans:
            if new < 1 or len(table) * bs < computed + new:
                raise ValueError(f"a span of {computed} + {new} tokens does not fit its {len(table)} blocks")
            if any(not 0 <= b < n for b in table):
                raise ValueError(f"block ids must be in 0..{n - 1}")
            if computed + new > (limit := self.config.max_position_embeddings):
                raise ValueError(f"a span reaches past the model's {limit} positions")
        if any(new != 1 for _, _, new in decodes):
            raise ValueError("a decode computes exactly one new token")
        if any(not 0 <= b < n for b in pull):
            raise ValueError(f"block ids to pull must be in 0..{n - 1}")
        over = [
            i
            for i, b in self.batches.items()
            if i == batch_id or (b.spec.router == spec.router and b.spec.step < spec.step)
        ]
        for done in over:  # finished, or abandoned by a failed step (or announced again)
            self.hot.close(self.batches.pop(done).spec.tables)
        filled = [b for table, computed, _ in spans for b in table[: -(-computed // bs)]]
        pulled = self.hot.pulled
        local = self.hot.open(spec.tables, filled, pull)
        self._pulled.inc(self.hot.pulled - pulled)
        local_prefills = [(t, c, k) for t, (_, c, k) in zip(local[: len(prefills)], prefills, strict=True)]
        local_decodes = [(t, c + 1) for t, (_, c, _) in zip(local[len(prefills) :], decodes, strict=True)]
        batch = AttentionBatch.build(local_prefills, local_decodes, bs, self.device)
        positions = [p for _, c, k in prefills for p in range(c, c + k)] + [c for _, c, _ in decodes]
        cos, sin = self.rotary(torch.tensor(positions, device=self.device))
        self.batches[batch_id] = _OpenBatch(batch, cos, sin, spec)
        while len(self.batches) > MAX_OPEN_BATCHES:  # abandoned by its router
            self.hot.close(self.batches.popitem(last=False)[1].spec.tables)
        self.tokens_computed += batch.num_tokens
        self._tokens.inc(batch.num_tokens)

    def _write_through(self, batch: AttentionBatch) -> None:
        """Every layer's new entries of the micro-batch to the service, in one call."""
        slots = batch.slot_mapping
        entries = self.hot.pool.pages.flatten(1, 2).index_select(1, slots)
        self.kv.write_entries(self.hot.service_slots(slots), entries)
        self.entries_written += slots.numel()

    def info(self) -> attention_pb2.WorkerInfoResponse:
        return attention_pb2.WorkerInfoResponse(
            worker=self.name,
            num_layers=self.config.num_hidden_layers,
            num_blocks=self.kv.num_blocks,
            block_size=self.kv.block_size,
            hot_copy_blocks=self.hot.capacity,
            dtype=str(self.dtype).removeprefix("torch."),
            kv_cache_address=self.kv_cache_address,
            tokens_computed=self.tokens_computed,
            blocks_pulled=self.hot.pulled,
            blocks_evicted=self.hot.evicted,
            entries_written=self.entries_written,
            busy_seconds=self.busy_seconds,
        )


def _spans(msgs: Sequence[attention_pb2.SequenceSpan]) -> list[Span]:
    return [(list(m.block_table), m.num_computed, m.num_new) for m in msgs]


def _batch_spec(spec: attention_pb2.AttentionBatchSpec) -> BatchSpec:
    return BatchSpec(
        _spans(spec.prefills), _spans(spec.decodes), list(spec.pull_block_ids), spec.router, spec.step
    )


class AttentionServicer(attention_pb2_grpc.AttentionServicer):
    """Handler threads decode and encode; the worker computes on its torch thread, one call at a time."""

    def __init__(self, worker: AttentionWorker, torch_thread: TorchThread) -> None:
        self.worker, self.torch_thread = worker, torch_thread

    def Attend(self, request, context):  # noqa: N802
        spec = _batch_spec(request.batch) if request.HasField("batch") else None
        try:
            hidden = tensor_from_proto(request.hidden)
            start = time.perf_counter()
            out = self.torch_thread.call(self.worker.attend, request.batch_id, request.layer, hidden, spec)
            elapsed = time.perf_counter() - start
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except HotCopyFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except grpc.RpcError as e:  # the KV-cache service
            context.abort(grpc.StatusCode.UNAVAILABLE, f"KV-cache service: {e.code().name}: {e.details()}")
        response = attention_pb2.AttendResponse(compute_seconds=elapsed)
        tensor_to_proto(out, response.output)
        return response

    def AttendStream(self, requests, context):  # noqa: N802
        for request in requests:  # an abort in Attend ends the stream with its status
            yield self.Attend(request, context)

    def WorkerInfo(self, request, context):  # noqa: N802
        return self.worker.info()


def serve_worker(
    worker: AttentionWorker, torch_thread: TorchThread, host: str = "127.0.0.1", port: int = 0
) -> tuple[grpc.Server, str]:
    """Serve `worker` (built on `torch_thread`, which then runs all its computations)."""
    servicer = AttentionServicer(worker, torch_thread)
    return start_server(
        [partial(attention_pb2_grpc.add_AttentionServicer_to_server, servicer)], [SERVICE_NAME], host, port
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.attention.worker", description="Serve MLA attention over gRPC."
    )
    p.add_argument("--model", required=True, help="checkpoint directory, or a preset (tiny, mini)")
    p.add_argument("--kv-cache", required=True, help="address of the KV-cache service (HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50070, help="gRPC port (0: any free port)")
    p.add_argument("--name", default="attention-0", help="the worker's name in metrics and logs")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--hot-copy-blocks",
        type=int,
        default=None,
        help="local pages cached from the KV-cache service (default: as many as it has blocks); they must "
        "hold the blocks of the sequences this worker runs in one step",
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (0: any free)"
    )
    p.add_argument(
        "--watchdog-timeout",
        type=float,
        default=WATCHDOG_TIMEOUT_S,
        metavar="SECONDS",
        help="exit if one computation runs longer (a hang; the router then moves its sequences); 0: never",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    reuse_freed_memory()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch_thread = TorchThread()
    worker = torch_thread.call(
        lambda: AttentionWorker(
            str(resolve_model(args.model)), args.kv_cache, args.device, args.name, args.hot_copy_blocks
        )
    )
    if args.watchdog_timeout:
        torch_thread.watch(args.watchdog_timeout)
    server, address = serve_worker(worker, torch_thread, args.host, args.port)
    log.info(
        "%s: %d layers, hot copy of %d blocks x %d tokens (%s), KV cache at %s",
        args.name,
        worker.config.num_hidden_layers,
        worker.hot.capacity,
        worker.kv.block_size,
        worker.dtype,
        args.kv_cache,
    )
    serve_until_signalled(server, "attention", address, args.host, args.metrics_port)
    torch_thread.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
