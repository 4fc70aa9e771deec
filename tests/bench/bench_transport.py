"""gRPC transport on loopback: a unary call against a call on a long-lived stream, side by side in one run.

    python -m tests.bench.bench_transport --output-json out.json

A server process echoes a payload the size of a micro-batch's hidden states (32 tokens x 512 float32 by
default) through a thread-pool server, as the workers do; this process calls it with a unary call and with
ThreadStreams (the router's hot path), and prints latency and CPU per call at both ends. Not a timed test: the
machine is shared and noisy; read the ratios.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import grpc

from common.rpc.server import start_server
from common.rpc.stream import ThreadStreams
from tests.bench.results import write_results
from tests.processes import cpu_seconds

OUT_DIR = Path("bench-results")
SERVICE = "latentmoe.bench.Echo"


def _identity(message: bytes) -> bytes:
    return message


def serve() -> None:
    """The echo server: prints its address, serves until killed."""

    def stream(requests, context):  # noqa: ANN001, ANN202
        yield from requests

    handlers = {
        "Call": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    }
    add = [
        lambda server: server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
    ]
    server, address = start_server(add, [], "127.0.0.1")
    print(address, flush=True)
    server.wait_for_termination()


def measure(call, server_pid: int, calls: int) -> dict[str, float]:  # noqa: ANN001
    for _ in range(50):
        call()
    server_cpu, cpu, start = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    for _ in range(calls):
        call()
    wall = time.perf_counter() - start
    return {
        "latency_us": wall / calls * 1e6,
        "client_cpu_us": (time.process_time() - cpu) / calls * 1e6,
        "server_cpu_us": (cpu_seconds(server_pid) - server_cpu) / calls * 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--payload-bytes", type=int, default=32 * 512 * 4)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--output-json", default=str(OUT_DIR / "transport.json"))
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve()

    server = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.bench_transport", "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        address = server.stdout.readline().strip()
        channel = grpc.insecure_channel(address)
        payload = b"x" * args.payload_bytes
        unary = channel.unary_unary(f"/{SERVICE}/Call", _identity, _identity)
        streams = ThreadStreams(channel.stream_stream(f"/{SERVICE}/Stream", _identity, _identity))
        results = {
            "unary call": measure(lambda: unary(payload, timeout=30), server.pid, args.calls),
            "call on a stream": measure(lambda: streams.send(payload).receive(), server.pid, args.calls),
        }
        streams.close()
        channel.close()
    finally:
        server.kill()
        server.wait()

    print(f"\n{args.calls} echo calls of {args.payload_bytes} bytes on loopback\n")
    print(f"| {'call':<16} | latency us | client CPU us | server CPU us |")
    print(f"|{'-' * 18}|------------|---------------|---------------|")
    for name, r in results.items():
        latency, client, server_cpu = r["latency_us"], r["client_cpu_us"], r["server_cpu_us"]
        print(f"| {name:<16} | {latency:10.0f} | {client:13.0f} | {server_cpu:13.0f} |")
    write_results(args.output_json, args, results)


if __name__ == "__main__":
    main()
