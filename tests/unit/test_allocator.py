"""Freed message buffers are reused: a thread handling megabytes per call stops faulting in fresh pages."""

import subprocess
import sys

import pytest

PAGES = 8 * (4 << 20) // 4096  # one call's worth of buffers: eight 4 MiB copies of a prefill chunk
CALLS = """
import resource, sys, threading
if sys.argv[1] == "tuned":
    from common.rpc.allocator import reuse_freed_memory
    reuse_freed_memory()

def calls():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        buffers = [bytearray(4 << 20) for _ in range(8)]
        del buffers
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=calls)  # a handler thread, with a heap of its own by default
thread.start()
thread.join()
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CALLS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tunes glibc's malloc")
def test_freed_message_buffers_are_reused_not_faulted_in_again():
    assert _page_faults("default") > 10 * PAGES  # glibc maps and zeroes fresh pages call after call
    assert _page_faults("tuned") < 2 * PAGES  # the first call faults its pages in; the others reuse them
