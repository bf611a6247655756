"""The process's memory allocator, set for batched inference (glibc's mmap and trim thresholds).

Measured on the embedded model (`benchmarks/perf/batch.py`, docs in README "Performance"): with glibc's
defaults, batch 16 page-faults its multi-MB activations back in on every forward (500-2,000 minor faults
and 1-4 ms system time per sample) and is slower per sample than batch 4; with `tune_malloc` the faults
vanish and batch 16 is the fastest. The runner calls it once per process.
"""

from __future__ import annotations

#: glibc ``mallopt`` parameters and the values `tune_malloc` sets (bytes)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest accepted on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 256 * 1024 * 1024


def tune_malloc() -> bool:
    """Keep freed activation buffers in this process instead of handing them back to the OS (glibc only).

    With glibc's defaults a large batch's activations (a few MB each at batch 16 on the embedded model)
    are either mmapped and unmapped per op or trimmed off the heap top when freed, so every forward
    page-faults them in again (zeroed by the kernel: system time, cold caches). Raising the mmap and
    trim thresholds (what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set at start-up)
    removes those faults. Process-wide and not undoable; returns False where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
