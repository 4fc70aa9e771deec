"""Channels from the router to its workers, with keepalive pings: a frozen or vanished worker fails its calls
like a crashed one.

A crashed worker closes its sockets, and every call to it fails at once with UNAVAILABLE. A frozen process
(stopped, swapping, stuck in the kernel) or a host that dropped off the network closes nothing, and a call on
a long-lived stream would wait forever. A worker channel pings its server every `keepalive_s` and, when a
ping is not answered within `keepalive_s`, closes the connection: every call and stream on it ends with
UNAVAILABLE. gRPC's own threads answer the pings, so a worker busy with a long computation still answers.
"""

from __future__ import annotations

import grpc

from common.rpc.server import OPTIONS

KEEPALIVE_S = 10.0


def worker_channel(address: str, keepalive_s: float = KEEPALIVE_S) -> grpc.Channel:
    ms = max(1, round(keepalive_s * 1000))
    keepalive = [
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", ms),
        ("grpc.http2.ping_timeout_ms", ms),  # gRPC >= 1.6x waits this long (default 60 s) for any ping's ack
    ]
    return grpc.insecure_channel(address, options=[*OPTIONS, *keepalive])
