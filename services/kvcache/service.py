"""The KV-cache service: one BlockManager (tables, refcounts, prefix index, copy-on-write, LRU) and one
BlockPool (the latent pages of every layer) behind a lock, as a plain class; its gRPC servicer (a thin
adapter that also publishes the KV metrics); and the `python -m services.kvcache.service` entry point.

    python -m services.kvcache.service --model checkpoints/mini --port 50060 --block-size 64 \
        --kv-cache-memory 1073741824 --dtype bfloat16

Attention workers keep hot copies of their sequences' pages and write new latents through to this service
(WriteEntries); a worker that lacks a block pulls it (ReadBlocks). The scheduler drives the block manager
over gRPC through `services.kvcache.client.RemoteBlockManager`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import torch

from common import metrics
from common.config import ModelConfig
from common.kvcache import BlockManager, BlockPool, NoFreeBlocksError
from common.rpc.allocator import reuse_freed_memory
from common.rpc.codec import tensor_from_proto, tensor_to_proto
from common.rpc.server import serve_until_signalled, start_server
from latentmoe.v1 import kvcache_pb2, kvcache_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = kvcache_pb2.DESCRIPTOR.services_by_name["KVCache"].full_name
# Trailing metadata telling an unknown sequence id (KeyError in the BlockManager) from other bad input.
ERROR_METADATA_KEY = "latentmoe-kv-error"
UNKNOWN_SEQUENCE = "unknown-sequence"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A Batch op: (kind, keyword arguments of the matching KVCacheService method).
KVOp = tuple[str, dict[str, Any]]


@dataclass
class OpResult:
    """Outcome of one block-manager op. ok=False with an empty error: no room (state unchanged)."""

    ok: bool = True
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    message: str = ""  # why ok=False (no room)
    # Only set in Batch results:
    executed: bool = True
    error: str = ""  # the op was malformed (ValueError / KeyError message); state unchanged for it
    unknown_sequence: bool = False


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _seq_id(seq_id: str) -> str:
    if not isinstance(seq_id, str) or not seq_id:
        raise ValueError(f"seq_id must be a non-empty string, got {seq_id!r}")
    return seq_id


class KVCacheService:
    """The authoritative latent KV cache. Thread-safe: one lock around the manager and the pool.

    Errors: ValueError for malformed input, KeyError for an unknown sequence id; in both cases the state is
    unchanged. Lack of room is not an error: `allocate` / `append_slots` return ``ok=False``.
    """

    def __init__(
        self,
        num_layers: int,
        entry_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        enable_prefix_caching: bool = True,
    ) -> None:
        self.pool = BlockPool(num_layers, num_blocks, block_size, entry_dim, dtype=dtype, device=device)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self._lock = threading.Lock()
        self._ops: dict[str, Callable[..., OpResult]] = {
            "allocate": self._allocate,
            "append": self._append_slots,
            "mark_computed": self._mark_computed,
            "fork": self._fork,
            "free": self._free,
        }

    @classmethod
    def from_model(
        cls,
        model_dir: str | Path,
        block_size: int = 64,
        num_blocks: int | None = None,
        kv_cache_memory: int | float = 1 << 30,
        dtype: str = "float32",
        device: str = "cpu",
        enable_prefix_caching: bool = True,
    ) -> KVCacheService:
        """Pages sized from the model's config.json: `num_blocks`, or as many as `kv_cache_memory` holds
        (int bytes, or a float in (0, 1] = fraction of free memory)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        config = ModelConfig.from_file(model_dir)
        torch_dtype = DTYPES[dtype]
        if num_blocks is None:
            num_blocks = BlockPool.num_blocks_for_budget(
                kv_cache_memory, config.num_hidden_layers, block_size, config.latent_dim, torch_dtype, device
            )
        return cls(
            config.num_hidden_layers,
            config.latent_dim,
            num_blocks,
            block_size,
            torch_dtype,
            device,
            enable_prefix_caching,
        )

    # ------------------------------------------------------------------ block manager ops (locked)

    def allocate(self, seq_id: str, token_ids: Sequence[int], watermark_blocks: int = 0) -> OpResult:
        with self._lock:
            return self._allocate(seq_id, token_ids, watermark_blocks)

    def append_slots(self, seq_id: str, token_ids: Sequence[int]) -> OpResult:
        with self._lock:
            return self._append_slots(seq_id, token_ids)

    def mark_computed(self, seq_id: str, num_computed_tokens: int) -> OpResult:
        with self._lock:
            return self._mark_computed(seq_id, num_computed_tokens)

    def fork(self, parent_id: str, child_id: str) -> OpResult:
        with self._lock:
            return self._fork(parent_id, child_id)

    def free(self, seq_id: str) -> OpResult:
        with self._lock:
            return self._free(seq_id)

    def batch(self, ops: Sequence[KVOp]) -> list[OpResult]:
        """Run ops in order under one lock; stop at the first op that is not ok (no room or malformed).

        Every op gets a result: the executed ones, the failing one (ok=False) and the rest executed=False.
        """
        results: list[OpResult] = []
        with self._lock:
            for kind, kwargs in ops:
                if results and not results[-1].ok:
                    results.append(OpResult(ok=False, executed=False))
                    continue
                try:
                    op = self._ops.get(kind)
                    if op is None:
                        raise ValueError(f"op kind must be one of {sorted(self._ops)}, got {kind!r}")
                    results.append(op(**kwargs))
                except KeyError as e:
                    results.append(OpResult(ok=False, error=e.args[0], unknown_sequence=True))
                except ValueError as e:
                    results.append(OpResult(ok=False, error=str(e)))
        return results

    # ------------------------------------------------------------------ pure queries

    def can_allocate(self, token_ids: Sequence[int], watermark_blocks: int = 0) -> bool:
        with self._lock:
            return self.blocks.can_allocate(token_ids, watermark_blocks)

    def can_append(self, seq_id: str, num_new_tokens: int = 1) -> bool:
        with self._lock:
            return self.blocks.can_append(_seq_id(seq_id), num_new_tokens)

    def lookup_prefix(self, token_ids: Sequence[int]) -> tuple[int, list[int]]:
        """(cached tokens, their blocks) an allocation of these tokens would reuse; no state change."""
        with self._lock:
            hits = self.blocks.lookup_prefix_blocks(token_ids)
            return len(hits) * self.blocks.block_size, hits

    def stats(self) -> kvcache_pb2.KVStatsResponse:
        with self._lock:
            b = self.blocks
            return kvcache_pb2.KVStatsResponse(
                **dataclasses.asdict(b.stats()),
                block_size=b.block_size,
                entry_dim=self.pool.entry_dim,
                num_layers=self.pool.num_layers,
                dtype=_dtype_name(self.pool.dtype),
                enable_prefix_caching=b.enable_prefix_caching,
                prefix_query_blocks=b.prefix_query_blocks,
                prefix_hit_blocks=b.prefix_hit_blocks,
            )

    # ------------------------------------------------------------------ pages

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """``[num_layers, n, block_size, entry_dim]`` copy of the blocks."""
        ids = self._block_ids(block_ids, distinct=False)
        with self._lock:
            return self.pool.read_blocks(ids)

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        ids = self._block_ids(block_ids, distinct=True)
        self._check_dtype("data", data)
        with self._lock:
            self.pool.write_blocks(ids, data)  # checks the shape before writing anything

    def write_entries(self, layer_start: int, slots: torch.Tensor, entries: torch.Tensor) -> None:
        """Scatter entries ``[layers, T, entry_dim]`` of layers [layer_start, layer_start + layers) into
        slots ``[T]`` (int64, distinct). Validated in full before anything is written."""
        pool = self.pool
        if slots.dtype != torch.int64 or slots.dim() != 1:
            raise ValueError(
                f"slots must be a 1-D int64 tensor, got {_dtype_name(slots.dtype)} {list(slots.shape)}"
            )
        self._check_dtype("entries", entries)
        if entries.dim() != 3 or entries.shape[1:] != (slots.numel(), pool.entry_dim) or entries.shape[0] < 1:
            raise ValueError(
                f"entries must be [layers >= 1, {slots.numel()}, {pool.entry_dim}] to match slots, "
                f"got {list(entries.shape)}"
            )
        if not 0 <= layer_start <= pool.num_layers - entries.shape[0]:
            raise ValueError(
                f"layers [{layer_start}, {layer_start + entries.shape[0]}) are not within the "
                f"{pool.num_layers} layers of this cache"
            )
        num_slots = pool.num_blocks * pool.block_size
        if slots.numel():
            if not 0 <= int(slots.min()) <= int(slots.max()) < num_slots:
                raise ValueError(f"slots must be in [0, {num_slots}) (num_blocks x block_size)")
            if slots.unique().numel() != slots.numel():
                raise ValueError("slots must be distinct")
        with self._lock:
            for i in range(entries.shape[0]):
                pool.write(layer_start + i, slots, entries[i])

    def _block_ids(self, block_ids: Sequence[int], distinct: bool) -> list[int]:
        ids = [int(b) for b in block_ids]
        bad = [b for b in ids if not 0 <= b < self.pool.num_blocks]
        if bad:
            raise ValueError(f"block ids must be in [0, {self.pool.num_blocks}), got {bad[:5]}")
        if distinct and len(set(ids)) != len(ids):
            raise ValueError("block ids must be distinct")
        return ids

    def _check_dtype(self, name: str, t: torch.Tensor) -> None:
        if t.dtype != self.pool.dtype:
            raise ValueError(
                f"{name} must be {_dtype_name(self.pool.dtype)} (this cache's dtype), "
                f"got {_dtype_name(t.dtype)}"
            )

    # ------------------------------------------------------------------ unlocked internals

    def _allocate(self, seq_id: str, token_ids: Sequence[int], watermark_blocks: int = 0) -> OpResult:
        b = self.blocks
        seq_id = _seq_id(seq_id)
        try:
            cached = b.allocate(seq_id, token_ids, watermark_blocks)
        except NoFreeBlocksError as e:
            return OpResult(ok=False, message=str(e))
        return OpResult(num_cached_tokens=cached, block_table=b.block_table(seq_id))

    def _append_slots(self, seq_id: str, token_ids: Sequence[int]) -> OpResult:
        seq_id = _seq_id(seq_id)
        try:
            copies = self.blocks.append_slots(seq_id, token_ids)
        except NoFreeBlocksError as e:
            return OpResult(ok=False, message=str(e))
        self.pool.copy_blocks(copies)  # the authoritative pages follow the copy-on-write at once
        return OpResult(copies=copies, block_table=self.blocks.block_table(seq_id))

    def _mark_computed(self, seq_id: str, num_computed_tokens: int) -> OpResult:
        self.blocks.mark_computed(_seq_id(seq_id), num_computed_tokens)
        return OpResult()

    def _fork(self, parent_id: str, child_id: str) -> OpResult:
        self.blocks.fork(_seq_id(parent_id), _seq_id(child_id))
        return OpResult(block_table=self.blocks.block_table(child_id))

    def _free(self, seq_id: str) -> OpResult:
        self.blocks.free(_seq_id(seq_id))
        return OpResult()


# ---------------------------------------------------------------------------------------------- gRPC


def _op_from_proto(op: kvcache_pb2.KVOp) -> KVOp:
    kind = op.WhichOneof("op")
    if kind == "allocate":
        a = op.allocate
        return kind, {
            "seq_id": a.seq_id,
            "token_ids": list(a.token_ids),
            "watermark_blocks": a.watermark_blocks,
        }
    if kind == "append":
        return kind, {"seq_id": op.append.seq_id, "token_ids": list(op.append.token_ids)}
    if kind == "mark_computed":
        m = op.mark_computed
        return kind, {"seq_id": m.seq_id, "num_computed_tokens": m.num_computed_tokens}
    if kind == "fork":
        return kind, {"parent_id": op.fork.parent_id, "child_id": op.fork.child_id}
    if kind == "free":
        return kind, {"seq_id": op.free.seq_id}
    return "", {}  # an empty op: reported as malformed by KVCacheService.batch


def _copies(copies: list[tuple[int, int]]) -> list[kvcache_pb2.BlockCopy]:
    return [kvcache_pb2.BlockCopy(src=s, dst=d) for s, d in copies]


class KVCacheServicer(kvcache_pb2_grpc.KVCacheServicer):
    """Thin adapter: protos in and out, ValueError / KeyError -> INVALID_ARGUMENT, KV metrics after
    every mutation."""

    def __init__(self, service: KVCacheService) -> None:
        self.service = service
        self._metrics_lock = threading.Lock()
        self._published = {"prefix_queries": 0, "prefix_hits": 0}
        metrics.KV_BLOCKS.labels("total").set(service.blocks.num_blocks)
        self._publish()

    def _publish(self) -> None:
        # Snapshot and publish under one lock, so a later snapshot is never overwritten by an earlier one.
        with self._metrics_lock:
            s = self.service.stats()
            metrics.KV_BLOCKS.labels("used").set(s.used)
            metrics.KV_BLOCKS.labels("cached").set(s.cached)
            metrics.KV_USAGE.set(s.usage)
            for name, counter, value in (
                ("prefix_queries", metrics.PREFIX_QUERIES, s.prefix_queries),
                ("prefix_hits", metrics.PREFIX_HITS, s.prefix_hits),
            ):
                counter.inc(value - self._published[name])
                self._published[name] = value

    @staticmethod
    def _call(context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except KeyError as e:
            context.set_trailing_metadata(((ERROR_METADATA_KEY, UNKNOWN_SEQUENCE),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e.args[0]))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _mutate(self, context: grpc.ServicerContext, fn: Callable[[], OpResult]) -> OpResult:
        result = self._call(context, fn)
        self._publish()
        return result

    # ------------------------------------------------------------------ block manager

    def Allocate(self, request, context):  # noqa: N802
        s = self.service
        r = self._mutate(
            context, lambda: s.allocate(request.seq_id, list(request.token_ids), request.watermark_blocks)
        )
        return kvcache_pb2.AllocateResponse(
            ok=r.ok, num_cached_tokens=r.num_cached_tokens, block_table=r.block_table, message=r.message
        )

    def AppendSlots(self, request, context):  # noqa: N802
        r = self._mutate(context, lambda: self.service.append_slots(request.seq_id, list(request.token_ids)))
        return kvcache_pb2.AppendSlotsResponse(
            ok=r.ok, copies=_copies(r.copies), block_table=r.block_table, message=r.message
        )

    def MarkComputed(self, request, context):  # noqa: N802
        self._mutate(context, lambda: self.service.mark_computed(request.seq_id, request.num_computed_tokens))
        return kvcache_pb2.MarkComputedResponse()

    def Fork(self, request, context):  # noqa: N802
        r = self._mutate(context, lambda: self.service.fork(request.parent_id, request.child_id))
        return kvcache_pb2.ForkResponse(block_table=r.block_table)

    def Free(self, request, context):  # noqa: N802
        self._mutate(context, lambda: self.service.free(request.seq_id))
        return kvcache_pb2.FreeResponse()

    def Batch(self, request, context):  # noqa: N802
        results = self.service.batch([_op_from_proto(op) for op in request.ops])
        self._publish()
        return kvcache_pb2.BatchResponse(
            results=[
                kvcache_pb2.KVResult(
                    executed=r.executed,
                    ok=r.ok,
                    error=r.error,
                    unknown_sequence=r.unknown_sequence,
                    num_cached_tokens=r.num_cached_tokens,
                    block_table=r.block_table,
                    copies=_copies(r.copies),
                    message=r.message,
                )
                for r in results
            ]
        )

    def CanAllocate(self, request, context):  # noqa: N802
        ok = self._call(
            context, lambda: self.service.can_allocate(list(request.token_ids), request.watermark_blocks)
        )
        return kvcache_pb2.CanAllocateResponse(ok=ok)

    def CanAppend(self, request, context):  # noqa: N802
        ok = self._call(context, lambda: self.service.can_append(request.seq_id, request.num_new_tokens))
        return kvcache_pb2.CanAppendResponse(ok=ok)

    def LookupPrefix(self, request, context):  # noqa: N802
        n, ids = self._call(context, lambda: self.service.lookup_prefix(list(request.token_ids)))
        return kvcache_pb2.LookupPrefixResponse(num_cached_tokens=n, block_ids=ids)

    def Stats(self, request, context):  # noqa: N802
        return self.service.stats()

    # ------------------------------------------------------------------ pages

    def ReadBlocks(self, request, context):  # noqa: N802
        data = self._call(context, lambda: self.service.read_blocks(list(request.block_ids)))
        response = kvcache_pb2.ReadBlocksResponse(block_ids=request.block_ids)
        tensor_to_proto(data, response.data)
        return response

    def WriteBlocks(self, request, context):  # noqa: N802
        self._call(
            context,
            lambda: self.service.write_blocks(list(request.block_ids), tensor_from_proto(request.data)),
        )
        return kvcache_pb2.WriteBlocksResponse()

    def WriteEntries(self, request, context):  # noqa: N802
        self._call(
            context,
            lambda: self.service.write_entries(
                request.layer_start, tensor_from_proto(request.slots), tensor_from_proto(request.entries)
            ),
        )
        return kvcache_pb2.WriteEntriesResponse()


def serve_kvcache(
    service: KVCacheService, host: str = "127.0.0.1", port: int = 0, workers: int = 8
) -> tuple[grpc.Server, str]:
    """Serve `service` on a thread-pool gRPC server (health + reflection); returns it and its address."""
    servicer = KVCacheServicer(service)
    return start_server(
        [partial(kvcache_pb2_grpc.add_KVCacheServicer_to_server, servicer)],
        [SERVICE_NAME],
        host,
        port,
        workers=workers,
    )


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.kvcache.service", description="Serve the latent KV cache over gRPC."
    )
    p.add_argument("--model", required=True, help="checkpoint directory (its config.json sizes the pages)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50060, help="gRPC port (0: any free port)")
    p.add_argument("--block-size", type=int, default=64, help="tokens per KV page (power of two, 1..256)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--num-blocks", type=int, default=None, help="pages (default: from --kv-cache-memory)")
    size.add_argument(
        "--kv-cache-memory",
        type=float,
        default=float(1 << 30),
        help="page budget: bytes, or a fraction (<= 1) of free memory",
    )
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the workers' serving dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (0: any free)"
    )
    p.add_argument("--workers", type=int, default=8, help="gRPC server threads")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from common.checkpoint import resolve_model

    reuse_freed_memory()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    budget = int(args.kv_cache_memory) if args.kv_cache_memory > 1 else float(args.kv_cache_memory)
    service = KVCacheService.from_model(
        resolve_model(args.model),
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_memory=budget,
        dtype=args.dtype,
        device=args.device,
        enable_prefix_caching=not args.no_prefix_caching,
    )
    pool = service.pool
    log.info(
        "KV cache: %d blocks of %d tokens = %d tokens, %d layers x %d, %s (%.1f MiB)",
        pool.num_blocks,
        pool.block_size,
        pool.capacity_tokens,
        pool.num_layers,
        pool.entry_dim,
        _dtype_name(pool.dtype),
        pool.nbytes / 2**20,
    )
    server, address = serve_kvcache(service, args.host, args.port, args.workers)
    serve_until_signalled(server, "kvcache", address, args.host, args.metrics_port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
