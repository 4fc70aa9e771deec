"""TorchThread's watchdog: once armed, a call that runs past the timeout ends the process; loading before it
is armed, and calls that finish in time, are left alone."""

from __future__ import annotations

import subprocess
import sys
import time

from common.torch_thread import WATCHDOG_EXIT_STATUS

SCRIPT = """
import time
from common.torch_thread import TorchThread
thread = TorchThread("worker")
thread.call(time.sleep, 1.0)  # loading: not watched yet
thread.watch(0.5)
for _ in range(3):
    thread.call(time.sleep, 0.1)  # in time
print("served", flush=True)
thread.call(time.sleep, 30)  # hangs
print("not reached", flush=True)
"""


def test_a_hung_call_ends_the_process_after_the_timeout():
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert done.returncode == WATCHDOG_EXIT_STATUS, done.stderr
    assert done.stdout.split() == ["served"]
    assert "worker: a computation has run for over 0.5 s: exiting" in done.stderr
    assert elapsed < 20  # the hung call was cut short
