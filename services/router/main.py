"""`latentmoe serve`: the embedded deployment. The engine runs in this process; the Router gRPC API and the
Prometheus metrics are served on loopback (or --host) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import prometheus_client

from common.checkpoint import resolve_model
from common.engine.async_engine import AsyncEngine
from common.engine.engine import LLMEngine
from common.rpc.server import start_aio_server
from latentmoe.v1 import router_pb2_grpc
from services.router.servicer import SERVICE_NAME, RouterServicer

log = logging.getLogger(__name__)


async def serve(args: argparse.Namespace) -> None:
    from services.cli import engine_config

    model_dir = resolve_model(args.model)
    engine = LLMEngine.from_checkpoint(model_dir, engine_config(args))
    front = AsyncEngine(engine)
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
    p.set_defaults(func=lambda args: asyncio.run(serve(args)) or 0)
