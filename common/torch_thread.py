"""One thread for all of a process' torch work.

On CPUs torch parallelises each op with OpenMP, and libgomp keeps one team of worker threads per thread that
ever ran a parallel op. Once a process holds more OpenMP threads than CPUs, libgomp stops letting idle workers
spin and puts them to sleep after every op, so each op pays a wake-up: measured here, a decode step of the
mini model took 107 ms when the engine ran on a second thread after the weights were loaded on the main one,
and 50 ms when loading and stepping shared a thread. Servers therefore load and compute on one TorchThread,
and their gRPC handler threads only hand it work.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class TorchThread:
    """Runs callables one at a time on a single dedicated thread (which also serialises the computations)."""

    def __init__(self, name: str = "torch") -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the torch thread; blocks until it is done and re-raises what it raised."""
        return self._executor.submit(fn, *args).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
