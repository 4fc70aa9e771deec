"""How every latentmoe process allocates: message buffers are reused, not mapped fresh each time."""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters


def reuse_freed_memory() -> None:
    """Make glibc's malloc keep freed buffers for the next message; call it first thing in a process.

    By default malloc maps every block over 128 KiB fresh from the kernel, returns freed memory at the top
    of a heap at once, and gives threads heaps of their own that come and go. A prefill chunk's hidden
    states are megabytes, copied several times per call, and each fresh block faults in and zeroes its
    pages anew: on loopback a 4 MiB tensor's round trip took 31 ms, against 18 ms with the blocks kept.
    torch's operators fault the same way with every fresh tensor (transformers' generate() of 64 sequences
    runs 1.6-2x faster so); the engine's kernels keep their working memory and run the same either way.
    One arena for all threads (set before they start) keeps the torch thread's blocks too; threads that
    allocate at once then queue on it, so the C++ kernels keep their threads' working memory from call to
    call instead of allocating inside parallel regions (common/kernels/csrc/scratch.h). Only glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_ARENA_MAX, 1)
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's upper bound for this setting
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)
