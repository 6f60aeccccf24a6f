"""Process settings for fast CPU training: keep freed memory instead of handing it back to the OS.

glibc's malloc returns large freed blocks to the OS (``munmap``, heap trimming), so the next tensor of that
size is faulted in page by page again. PyTorch's CPU allocator has no cache of its own, so on CPU every
training or inference step pays for it (``python scripts/malloc_faults.py --first-touch`` measures a first
touch against a reuse), and how much depends on the order of earlier allocations, which makes CPU timings drift between runs.

``cli.py`` (``bam-zoo``) applies :func:`keep_freed_memory` at start, as does ``python scripts/benchmark.py``
by default; a program of your own can call it, or set the equivalent environment variables before Python
starts (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``), or preload a caching
malloc (jemalloc, tcmalloc). The cost: the process keeps its peak heap size instead of shrinking after it.
"""
import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_MAX = -4
_MAX_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes a C int


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse in this process: allocations come from the heap (no per-tensor
    ``mmap``), and the heap is not trimmed. Returns whether it was applied: False off glibc (macOS, Windows,
    musl) or with ``BAM_ZOO_MALLOC=default`` in the environment."""
    if os.environ.get("BAM_ZOO_MALLOC", "") == "default":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _MAX_TRIM_THRESHOLD))
