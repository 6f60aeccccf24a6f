"""Process settings for fast CPU training: keep freed memory instead of handing it back to the OS.

glibc's malloc returns large freed blocks to the OS (``munmap``, heap trimming), so the next tensor of that
size is faulted in page by page again. PyTorch's CPU allocator has no cache of its own, so on CPU every
training or inference step pays for it (``python -m bam_zoo.runtime`` measures a first touch against a
reuse), and how much depends on the order of earlier allocations, which makes CPU timings drift between runs.

``cli.py`` (``bam-zoo``) applies :func:`keep_freed_memory` at start, as does ``python -m bam_zoo.benchmark``
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


def _first_touch_cost(numel: int = 3_200_000, rounds: int = 8) -> tuple:
    """(ms to fill a fresh tensor, ms to fill it again): the price of a page fault per tensor, measured."""
    import statistics
    import time

    import torch

    fresh, reused, keep = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        t = torch.empty(numel)
        t.fill_(1.0)
        fresh.append(time.perf_counter() - start)
        start = time.perf_counter()
        t.fill_(2.0)
        reused.append(time.perf_counter() - start)
        keep.append(t)  # kept alive, so the next tensor needs new memory
    return statistics.median(fresh) * 1e3, statistics.median(reused) * 1e3


if __name__ == "__main__":
    first, again = _first_touch_cost()
    print(f"filling a fresh 12.8 MB float32 tensor: {first:.2f} ms; filling it again: {again:.2f} ms "
          f"(median of 8; the difference is page faults on first touch)")
