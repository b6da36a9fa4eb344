"""Shared helpers of the data tests (not collected)."""

import os
import tracemalloc

import pytest

needs_proc_accounting = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                           reason="needs Linux /proc read and peak-memory accounting")


def bytes_touched(fn):
    """(fn(), an upper bound of the bytes fn touched): bytes passed by read() calls (/proc/self/io rchar) + the
    growth of the peak resident set (memory-mapped reads) + the peak of traced allocations (numpy's included:
    the resident set does not grow where freed memory is reused). Independent of how fn reads."""
    def proc(path, field):
        with open(path) as f:
            return int(next(line for line in f if line.startswith(field)).split()[1])

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current one
    rss, rchar = proc("/proc/self/status", "VmRSS:"), proc("/proc/self/io", "rchar:")
    tracemalloc.start()
    try:
        result = fn()
        allocated = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    mapped = (proc("/proc/self/status", "VmHWM:") - rss) * 1024
    return result, proc("/proc/self/io", "rchar:") - rchar + mapped + allocated
