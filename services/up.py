"""`latentmoe up`: the whole distributed topology on this machine, as separate processes on loopback.

    latentmoe up --model mini --expert-workers 2 --attention-workers 2

starts the KV-cache service, the attention workers (which use it) and the router (with a local Ray and its
expert actors, wired to both), waits for each one's ready line, prints every endpoint and a ready line, and
tears everything down in reverse order on Ctrl-C, or when the router, the KV-cache service or every attention
worker has exited (the router carries on without a lost attention worker).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)
READY = re.compile(r"ready: grpc=(\S+)(?: metrics=(\S+))?")
READY_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30


class Child:
    """One service process: started in its own session (Ctrl-C reaches `up`, which stops it in order)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True, env=env)
        self.grpc = self.metrics = ""

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Read stdout up to the ready line, then forward the rest with the service's name."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.proc.returncode} before it was ready"
                )
            match = READY.search(line)
            if match:
                self.grpc, self.metrics = match.group(1), match.group(2) or ""
                threading.Thread(target=self._forward, daemon=True).start()
                return
            if line:
                print(f"[{self.name}] {line}", end="", flush=True)
        raise RuntimeError(f"{self.name} printed no ready line within {timeout:.0f}s")

    def _forward(self) -> None:
        for line in self.proc.stdout:
            print(f"[{self.name}] {line}", end="", flush=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %ds: killing it", self.name, STOP_TIMEOUT_S)
                self.proc.kill()
                self.proc.wait()


def _metrics_port(base: int, offset: int) -> str:
    return str(base + offset if base else 0)


def up(args: argparse.Namespace) -> int:
    from common.checkpoint import resolve_model
    from services.cli import engine_config

    model = str(resolve_model(args.model))
    config = engine_config(args)
    dtype = str(config.torch_dtype).removeprefix("torch.")  # one concrete dtype for every process
    python = [sys.executable, "-m"]
    host = args.host
    # The processes share this machine's cores: OpenMP teams larger than their share spin against each other.
    share = max(1, (os.cpu_count() or 1) // (1 + args.attention_workers + args.expert_workers))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(share))}
    children: list[Child] = []
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        kv = Child(
            "kvcache",
            [
                *python,
                "services.kvcache.service",
                "--model", model,
                "--host", host,
                "--port", str(args.kv_cache_port),
                "--metrics-port", _metrics_port(args.metrics_port, 1),
                "--dtype", dtype,
                "--device", str(config.torch_device),
                "--block-size", str(args.block_size),
                "--kv-cache-memory", str(args.kv_cache_memory),
                *(["--no-prefix-caching"] if args.no_prefix_caching else []),
            ],
            env,
        )  # fmt: skip
        children.append(kv)
        kv.wait_ready()
        workers = []
        for i in range(args.attention_workers):
            port = args.attention_port + i if args.attention_port else 0
            worker = Child(
                f"attention-{i}",
                [
                    *python,
                    "services.attention.worker",
                    "--model", model,
                    "--kv-cache", kv.grpc,
                    "--host", host,
                    "--port", str(port),
                    "--name", f"attention-{i}",
                    *(["--hot-copy-blocks", str(args.hot_copy_blocks)] if args.hot_copy_blocks else []),
                    "--watchdog-timeout", str(args.watchdog_timeout),
                    "--metrics-port", _metrics_port(args.metrics_port, 2 + i),
                ],
                env,
            )  # fmt: skip
            children.append(worker)
            workers.append(worker)
        for worker in workers:
            worker.wait_ready()
        router_argv = [
            *python,
            "services.cli",
            "serve",
            "--model", model,
            "--host", host,
            "--port", str(args.port),
            "--metrics-port", str(args.metrics_port),
            "--dtype", dtype,
            "--device", args.device,
            "--block-size", str(args.block_size),
            "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--expert-workers", str(args.expert_workers),
            *(["--micro-batches", str(args.micro_batches)] if args.micro_batches is not None else []),
            *(
                ["--micro-batch-min-tokens", str(args.micro_batch_min_tokens)]
                if args.micro_batch_min_tokens is not None
                else []
            ),
            "--worker-keepalive", str(args.worker_keepalive),
            "--watchdog-timeout", str(args.watchdog_timeout),
            *(["--max-model-len", str(args.max_model_len)] if args.max_model_len else []),
        ]  # fmt: skip
        if workers:
            router_argv += ["--attention-workers", ",".join(w.grpc for w in workers), "--kv-cache", kv.grpc]
        router = Child("router", router_argv, env)
        children.append(router)
        router.wait_ready()

        for child in children:
            metrics = f"  metrics={child.metrics}" if child.metrics else ""
            print(f"{child.name}: grpc={child.grpc}{metrics}  pid={child.proc.pid}", flush=True)
        print(f"latentmoe up ready: grpc={router.grpc} metrics={router.metrics}", flush=True)
        # The router moves a lost attention worker's sequences to the others; without the router or the KV
        # cache nothing can be served.
        vital = [kv, router]
        lost: set[str] = set()
        while not stop.wait(0.5):
            for child in workers:
                if child.proc.poll() is not None and child.name not in lost:
                    lost.add(child.name)
                    log.error("%s exited with status %s", child.name, child.proc.returncode)
            dead = [c for c in vital if c.proc.poll() is not None]
            if dead or len(lost) == len(workers) > 0:
                gone = dead[0] if dead else workers[-1]
                log.error("%s exited with status %s: stopping the topology", gone.name, gone.proc.returncode)
                return 1
        return 0
    finally:
        for child in reversed(children):
            child.stop()


def add_parser(sub: argparse._SubParsersAction) -> None:
    from common.rpc.channel import KEEPALIVE_S
    from common.torch_thread import WATCHDOG_TIMEOUT_S
    from services.cli import add_engine_args
    from services.router.main import CPU_MICRO_BATCH_MIN_TOKENS

    p = sub.add_parser(
        "up", help="start the distributed topology on this machine (KV cache, attention workers, router)"
    )
    add_engine_args(p, model_help="checkpoint directory, or a preset (tiny, mini) written once to the cache")
    p.add_argument(
        "--expert-workers", type=int, default=2, help="routed-expert Ray actors (0: in the router)"
    )
    p.add_argument(
        "--attention-workers", type=int, default=2, help="attention worker processes (0: in the router)"
    )
    p.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="micro-batches in flight per step (2: ping-pong, the default)",
    )
    p.add_argument(
        "--micro-batch-min-tokens",
        type=int,
        default=None,
        metavar="N",
        help="cut a step into micro-batches only of at least N tokens each (default 0 on a GPU, else "
        f"{CPU_MICRO_BATCH_MIN_TOKENS})",
    )
    p.add_argument(
        "--hot-copy-blocks",
        type=int,
        default=None,
        help="pages each attention worker caches from the KV-cache service (default: as many as it has)",
    )
    p.add_argument(
        "--worker-keepalive",
        type=float,
        default=KEEPALIVE_S,
        metavar="SECONDS",
        help="the router's pings to its workers (latentmoe serve --worker-keepalive)",
    )
    p.add_argument(
        "--watchdog-timeout",
        type=float,
        default=WATCHDOG_TIMEOUT_S,
        metavar="SECONDS",
        help="a worker whose computation runs longer exits (latentmoe serve --watchdog-timeout)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="the router's gRPC port (0: any free port)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9400,
        help="the router's /metrics port; the KV-cache service uses +1 and attention worker i +2+i (0: any)",
    )
    p.add_argument("--kv-cache-port", type=int, default=50060, help="the KV-cache service (0: any free port)")
    p.add_argument(
        "--attention-port", type=int, default=50070, help="attention worker i listens on this + i (0: any)"
    )
    p.set_defaults(func=up)
