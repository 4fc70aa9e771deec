"""`latentmoe serve`: the embedded deployment. The engine runs in this process; the Router gRPC API and the
Prometheus metrics are served on loopback (or --host) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal

import prometheus_client

from common.checkpoint import resolve_model
from common.config import EngineConfig
from common.engine.async_engine import AsyncEngine
from common.engine.engine import LLMEngine
from common.rpc.channel import KEEPALIVE_S
from common.rpc.server import start_aio_server
from common.torch_thread import WATCHDOG_TIMEOUT_S
from latentmoe.v1 import router_pb2_grpc
from services.router.servicer import SERVICE_NAME, RouterServicer

log = logging.getLogger(__name__)
# Per micro-batch, below which ping-pong on CPU cores loses: measured in tests/bench/bench_distributed.py.
CPU_MICRO_BATCH_MIN_TOKENS = 512


async def serve(args: argparse.Namespace) -> None:
    from services.cli import engine_config

    model_dir = resolve_model(args.model)
    config = engine_config(args)
    if args.micro_batch_min_tokens is None:  # ping-pong hides GPU and network hops; on CPU cores, where
        # every call costs core time, only large steps (prefill) gain from it
        args.micro_batch_min_tokens = 0 if config.torch_device.type == "cuda" else CPU_MICRO_BATCH_MIN_TOKENS
    if args.micro_batches < 1 or args.micro_batch_min_tokens < 0:
        raise SystemExit("--micro-batches must be >= 1 and --micro-batch-min-tokens >= 0")
    attention = connect_attention_workers(args) if args.attention_workers else None
    experts = start_expert_actors(args, str(model_dir), config) if args.expert_workers else None

    def build() -> LLMEngine:  # on the engine thread: loading and stepping share one OpenMP team
        engine = LLMEngine.from_checkpoint(
            model_dir, config, local_experts=experts is None, attention=attention
        )
        for pool in (attention, experts):
            if pool is not None:
                pool.attach(engine.runner.model)
        return engine

    front = AsyncEngine(build)
    engine = front.engine
    # The loaded model's objects live as long as the process: frozen out of the collector's view, as vLLM
    # does after start-up, a full collection no longer walks them (82-110 ms with mini loaded, every stream
    # stalled meanwhile).
    gc.collect()
    gc.freeze()
    if attention is not None:
        log.info(
            "attention on %d workers (%s), KV cache at %s: %d blocks of %d tokens",
            len(attention.workers),
            ", ".join(w.address for w in attention.workers),
            args.kv_cache,
            attention.blocks.num_blocks,
            attention.blocks.block_size,
        )
    servicer = RouterServicer(front, model_name=str(args.model), max_pending=args.max_pending)
    server, port = await start_aio_server(
        [lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        f"{args.host}:{args.port}",
    )
    metrics_server, _ = prometheus_client.start_http_server(args.metrics_port, addr=args.host)
    metrics_port = metrics_server.server_port
    dtype = str(engine.config.torch_dtype).removeprefix("torch.")
    print(f"model: {model_dir} ({engine.model_config.model_type}, {dtype}, {engine.device})", flush=True)
    print(f"grpc: {args.host}:{port} (latentmoe.v1.Router, grpc.health.v1.Health, reflection)", flush=True)
    print(f"metrics: http://{args.host}:{metrics_port}/metrics", flush=True)
    print(
        f"latentmoe ready: grpc={args.host}:{port} metrics=http://{args.host}:{metrics_port}/metrics",
        flush=True,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop(grace=5)
    front.shutdown()
    metrics_server.shutdown()
    if attention is not None:
        attention.close()
    if experts is not None:
        import ray

        experts.shutdown()
        ray.shutdown()


def connect_attention_workers(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The KV-cache service hosts the block manager; the workers hold the pages and run MLA."""
    import uuid

    from services.kvcache.client import RemoteBlockManager
    from services.router.attention import AttentionPool

    if not args.kv_cache:
        raise SystemExit("--attention-workers needs --kv-cache HOST:PORT (the service the workers use)")
    blocks = RemoteBlockManager(args.kv_cache, namespace=f"router-{uuid.uuid4().hex[:8]}/")
    addresses = [a for a in args.attention_workers.split(",") if a]
    return AttentionPool(
        addresses, blocks, args.micro_batches, args.micro_batch_min_tokens, keepalive_s=args.worker_keepalive
    )


def start_expert_actors(args: argparse.Namespace, model_dir: str, config: EngineConfig):  # type: ignore[no-untyped-def]
    """Routed experts on Ray actors: joins --ray-address, or starts a local Ray sized for the actors (whose
    servers then bind --host, like the rest of this process)."""
    import ray

    from services.router.experts import ExpertPool

    if args.ray_address:
        ray.init(address=args.ray_address)
        host = None  # each actor advertises its node's address
    else:
        # On a busy machine its GCS or raylet may not be up in time (Ray raises RuntimeError for the GCS and a
        # bare Exception for the raylet): one more try.
        try:
            ray.init(num_cpus=args.expert_workers, include_dashboard=False)
        except Exception as e:  # noqa: BLE001
            log.warning("starting a local Ray failed (%s): trying again", e)
            ray.shutdown()
            ray.init(num_cpus=args.expert_workers, include_dashboard=False)
        host = args.host
    dtype = str(config.torch_dtype).removeprefix("torch.")
    pool = ExpertPool(
        model_dir,
        args.expert_workers,
        dtype,
        host=host,
        keepalive_s=args.worker_keepalive,
        watchdog_s=args.watchdog_timeout,
    )
    log.info(
        "routed experts on %d Ray actors: %s", len(pool.shards), ", ".join(s.address for s in pool.shards)
    )
    return pool


def add_parser(sub: argparse._SubParsersAction) -> None:
    from services.cli import add_engine_args

    p = sub.add_parser("serve", help="serve a model in this process: gRPC API + Prometheus metrics")
    add_engine_args(p, model_help="checkpoint directory, or a preset (tiny, mini) written once to the cache")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    p.add_argument(
        "--metrics-port", type=int, default=9400, help="Prometheus /metrics port (0: any free port)"
    )
    p.add_argument(
        "--max-pending", type=int, default=1024, help="requests in flight before RESOURCE_EXHAUSTED"
    )
    p.add_argument(
        "--expert-workers",
        type=int,
        default=0,
        help="run the routed experts on this many Ray actors (0: here)",
    )
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster to join (default: a local Ray when asked)"
    )
    p.add_argument(
        "--attention-workers",
        default="",
        metavar="HOST:PORT,...",
        help="run attention on these attention workers (default: here); needs --kv-cache",
    )
    p.add_argument("--kv-cache", default="", metavar="HOST:PORT", help="the KV-cache service the workers use")
    p.add_argument(
        "--micro-batches",
        type=int,
        default=2,
        help="with attention workers: micro-batches in flight per step (2: ping-pong, the default)",
    )
    p.add_argument(
        "--micro-batch-min-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"cut a step into micro-batches only of at least N tokens each (default 0 on a GPU, else "
        f"{CPU_MICRO_BATCH_MIN_TOKENS})",
    )
    p.add_argument(
        "--worker-keepalive",
        type=float,
        default=KEEPALIVE_S,
        metavar="SECONDS",
        help="ping attention workers and expert actors this often; one that leaves a ping unanswered as long "
        "is lost (an attention worker: its sequences move) or restarted (an expert actor)",
    )
    p.add_argument(
        "--watchdog-timeout",
        type=float,
        default=WATCHDOG_TIMEOUT_S,
        metavar="SECONDS",
        help="an expert actor whose computation runs longer exits and is restarted by Ray (0: never)",
    )
    p.set_defaults(func=lambda args: asyncio.run(serve(args)) or 0)
