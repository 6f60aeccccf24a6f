"""Process settings for fast CPU training: keep freed memory instead of handing it back to the OS.

glibc's malloc returns large freed blocks to the OS, so the next tensor of that size is faulted in page by page
again, and PyTorch's CPU allocator has no cache of its own (``scripts/malloc_faults.py --first-touch``). The
same from the environment: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``. The cost: the process keeps
its peak heap size.
"""
import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_MAX = -4
_MAX_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes a C int


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse in this process (no per-tensor ``mmap``, no heap trimming).
    Returns whether it was applied: False off glibc or with ``BAM_ZOO_MALLOC=default`` in the environment."""
    if os.environ.get("BAM_ZOO_MALLOC", "") == "default":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return False
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):  # glibc only
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _MAX_TRIM_THRESHOLD))
