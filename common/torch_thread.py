"""One thread for all of a process' torch work.

On CPUs torch parallelises each op with OpenMP, and libgomp keeps one team of worker threads per thread that
ever ran a parallel op. Once a process holds more OpenMP threads than CPUs, libgomp stops letting idle workers
spin and puts them to sleep after every op, so each op pays a wake-up: measured here, a decode step of the
mini model took 107 ms when the engine ran on a second thread after the weights were loaded on the main one,
and 50 ms when loading and stepping shared a thread. Servers therefore load and compute on one TorchThread,
and their gRPC handler threads only hand it work.

The thread also has a watchdog (armed once the weights are loaded): a computation that hangs (a stuck kernel,
a deadlock) would hold every caller forever while the process still answers pings and health checks. Ending
the process turns the hang into a failure the rest of the system already handles: Ray restarts an expert
actor, the router moves a lost attention worker's sequences elsewhere.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
WATCHDOG_TIMEOUT_S = 300.0
WATCHDOG_EXIT_STATUS = 70  # EX_SOFTWARE


class TorchThread:
    """Runs callables one at a time on a single dedicated thread (which also serialises the computations)."""

    def __init__(self, name: str = "torch") -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._running_since: float | None = None

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the torch thread; blocks until it is done and re-raises what it raised."""
        return self._executor.submit(self._timed, fn, *args).result()

    def watch(self, timeout_s: float = WATCHDOG_TIMEOUT_S) -> None:
        """From now on, a call that runs longer than `timeout_s` ends the process (exit status 70)."""
        threading.Thread(
            target=self._watch, args=(timeout_s,), name=f"{self.name}-watchdog", daemon=True
        ).start()

    def _timed(self, fn: Callable[..., T], *args: object) -> T:
        self._running_since = time.monotonic()
        try:
            return fn(*args)
        finally:
            self._running_since = None

    def _watch(self, timeout_s: float) -> None:
        while True:
            time.sleep(min(1.0, timeout_s / 4))
            since = self._running_since
            if since is not None and time.monotonic() - since > timeout_s:
                log.critical("%s: a computation has run for over %g s: exiting", self.name, timeout_s)
                logging.shutdown()
                os._exit(WATCHDOG_EXIT_STATUS)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
