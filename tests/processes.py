"""Starting our servers as real processes in tests: wait for the ready line, stop with SIGTERM. And what
/proc says of processes (Linux): their state, session, parent and CPU time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
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
    group 2: metrics URL when it prints one); the lines before it are kept in `proc.startup_output`, the
    later ones in `proc.output` (read as they come: a full pipe would block the server). A process that dies
    or stays silent fails the test."""
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
    proc.output = []  # type: ignore[attr-defined]
    proc.drain = threading.Thread(target=proc.output.extend, args=(proc.stdout,), daemon=True)  # type: ignore[attr-defined]
    proc.drain.start()  # type: ignore[attr-defined]
    return proc, ready


def stop(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM the process we started, then SIGKILL if it does not exit in time; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    drain = getattr(proc, "drain", None)
    if drain is not None:
        drain.join(timeout=5)  # the pipe ends with the process (and any child still holding it)
    if proc.stdout and (drain is None or not drain.is_alive()):
        proc.stdout.close()
    return proc.returncode


# `latentmoe up` prints one line per service before its ready line: name, gRPC address, /metrics URL, pid.
UP_SUMMARY = re.compile(r"^(\S+): grpc=(\S+)(?:\s+metrics=(\S+))?\s+pid=(\d+)", re.M)


def start_up(model: str, *flags: str) -> tuple[subprocess.Popen, re.Match, dict[str, dict]]:
    """`latentmoe up` on loopback with free ports, 2 expert actors, 2 attention workers (flags may change
    any of it); returns the process, its ready line's match and {service: {"grpc", "metrics", "pid"}}."""
    argv = [sys.executable, "-m", "services.cli", "up", "--model", model, "--dtype", "float32"]
    argv += ["--expert-workers", "2", "--attention-workers", "2", "--port", "0", "--metrics-port", "0"]
    argv += ["--kv-cache-port", "0", "--attention-port", "0", *flags]
    proc, ready = start_until_ready(argv, timeout=300)
    services = {
        m[1]: {"grpc": m[2], "metrics": m[3], "pid": int(m[4])}
        for m in UP_SUMMARY.finditer(proc.startup_output)  # type: ignore[attr-defined]
    }
    return proc, ready, services


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: [0] state, [1] parent pid, [3] session, [11] and
    [12] user and system CPU time in clock ticks. None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # no such process, or it ended meanwhile
        return None


def live_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time of these processes (those that have ended count nothing)."""
    ticks = sum(int(f[11]) + int(f[12]) for f in map(stat_fields, pids) if f)
    return ticks / os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """root and every process under it: a launcher's services, and the Ray actors under its router."""
    children = defaultdict(list)
    for pid in live_pids():
        fields = stat_fields(pid)
        if fields:
            children[int(fields[1])].append(pid)
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children[pid])
    return tree
