"""`latentmoe health`: the probe of every latentmoe gRPC server (compose healthchecks, exec probes).

latentmoe health --address 127.0.0.1:50051
latentmoe health --address 127.0.0.1:50052 --service latentmoe.v1.KVCache

Calls the standard `grpc.health.v1.Health/Check` that every server registers (common/rpc/server.py) and prints
the status. Exit status 0 when SERVING; 1 for anything else (NOT_SERVING, an unknown service, an unreachable
server, a timeout), because container runtimes read exactly 0 as healthy and 1 as unhealthy.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 5.0) -> str:
    """The health status name of `service` ("" = the whole server) at `address`; raises grpc.RpcError."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def cmd_health(args: argparse.Namespace) -> int:
    target = f"{args.address} ({args.service})" if args.service else args.address
    try:
        status = check(args.address, args.service, args.timeout)
    except grpc.RpcError as e:
        print(f"{target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"{target}: {status}")
    return 0 if status == "SERVING" else 1


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, help="HOST:PORT of the gRPC server")
    p.add_argument("--service", default="", help="a service name, e.g. latentmoe.v1.Router (default: server)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("health", help="probe a latentmoe gRPC server's health service (exit 0 when SERVING)")
    _add_arguments(p)
    p.set_defaults(func=cmd_health)


def main(argv: list[str] | None = None) -> int:
    """`python -m services.health --address ...`: the same probe without the CLI's imports (torch)."""
    parser = argparse.ArgumentParser(prog="python -m services.health", description="gRPC health probe")
    _add_arguments(parser)
    return cmd_health(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
