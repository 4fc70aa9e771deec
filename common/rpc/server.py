"""Every latentmoe gRPC server starts the same way: the service itself, the standard health service (so load
balancers, compose healthchecks and `grpc_health_probe` work) and reflection (so grpcurl can discover it).
Asyncio servers front the streaming engine; thread-pool servers host blocking compute (expert shards)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MAX_MESSAGE_BYTES = 512 << 20  # hidden states and KV blocks of a large micro-batch
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Servers take keepalive pings as often as worker channels send them (common/rpc/channel.py). By default gRPC
# answers a client that pings more often than every 5 minutes with GOAWAY, which ends every open stream.
SERVER_OPTIONS = [
    *OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),  # never GOAWAY for pings
]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def _wire(
    server, add_servicers: list[Callable], service_names: list[str], health_servicer, address: str
) -> int:  # type: ignore[no-untyped-def]
    for add in add_servicers:
        add(server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return port


async def start_aio_server(
    add_servicers: list[Callable[[grpc.aio.Server], None]], service_names: list[str], address: str
) -> tuple[grpc.aio.Server, int]:
    """Start an asyncio gRPC server on `address` (port 0 picks a free one); returns it and the bound port."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    port = _wire(server, add_servicers, service_names, health_servicer, address)
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def start_server(
    add_servicers: list[Callable[[grpc.Server], None]],
    service_names: list[str],
    host: str,
    port: int = 0,
    workers: int = 32,
) -> tuple[grpc.Server, str]:
    """The thread-pool twin of start_aio_server, on host:port (0: a free one); returns it and its address
    `host:bound_port`, the one clients dial and ready lines print. Every open stream holds one of the
    `workers` threads (a router keeps one per calling thread), and unary calls need a free one."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS)
    health_servicer = health.HealthServicer()
    bound = _wire(server, add_servicers, service_names, health_servicer, f"{host}:{port}")
    server.start()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, f"{host}:{bound}"


def serve_until_signalled(
    server: grpc.Server, what: str, address: str, host: str, metrics_port: int | None
) -> None:
    """The life of a thread-pool service process: optional Prometheus /metrics on `metrics_port`, the ready
    line `latentmoe <what> ready: grpc=ADDRESS [metrics=URL]` that launchers wait for, then serve until
    SIGINT/SIGTERM and stop gracefully."""
    import signal
    import threading

    import prometheus_client

    ready = f"latentmoe {what} ready: grpc={address}"
    metrics_server = None
    if metrics_port is not None:
        metrics_server, _ = prometheus_client.start_http_server(metrics_port, addr=host)
        ready += f" metrics=http://{host}:{metrics_server.server_port}/metrics"
    print(ready, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logging.getLogger(__name__).info("shutting down")
    server.stop(grace=5).wait()
    if metrics_server is not None:
        metrics_server.shutdown()
