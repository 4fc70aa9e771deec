"""Starting our servers as real processes in tests: wait for the ready line, stop with SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30
READY = re.compile(
    r"ready: grpc=(\S+)(?: metrics=(\S+))?"
)  # `latentmoe ready:` and `latentmoe kvcache ready:`


def start_until_ready(
    argv: list[str], timeout: float = READY_TIMEOUT_S, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, re.Match]:
    """Start argv in its own session; return it and its ready line's match (group 1: gRPC address,
    group 2: metrics URL when it prints one); the lines before it are kept in `proc.startup_output`.
    A process that dies or stays silent fails the test."""
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    seen, ready = [], None
    deadline = time.monotonic() + timeout
    try:
        while ready is None:
            assert time.monotonic() < deadline, "no ready line in time:\n" + "".join(seen[-30:])
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(f"{argv} exited with {proc.returncode}:\n" + "".join(seen[-30:]))
            seen.append(line)
            ready = READY.search(line)
    except BaseException:
        stop(proc)
        raise
    proc.startup_output = "".join(seen)  # type: ignore[attr-defined]
    return proc, ready


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM the process we started, then SIGKILL if it does not exit in time; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
    if proc.stdout:
        proc.stdout.close()
    return proc.returncode
