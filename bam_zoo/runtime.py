"""Settings for fast CPU training: the channels-last memory format, and keeping freed memory from the OS.

glibc's malloc returns large freed blocks to the OS, so the next tensor of that size is faulted in page by page
again, and PyTorch's CPU allocator has no cache of its own (``scripts/malloc_faults.py --first-touch``). The
same from the environment: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``. The cost: the process keeps
its peak heap size.
"""
import ctypes
import ctypes.util
import os

import torch

__all__ = ["keep_freed_memory", "to_channels_last"]

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


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """``model.to(memory_format=torch.channels_last)``, but strided 1x1 convs on < 8 channels per group (RepVGG's stem)
    stay NCHW: oneDNN's AVX2 weight gradient for them in channels-last crashes, hangs or errs (oneDNN issue 6035)."""
    model.to(memory_format=torch.channels_last)
    for conv in model.modules():
        if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride != (1, 1) \
                and conv.in_channels < 8 * conv.groups:
            conv.weight.data = conv.weight.data.clone(memory_format=torch.contiguous_format)
            conv.register_forward_pre_hook(_nchw_input)
    return model


def _nchw_input(conv: torch.nn.Module, args: tuple) -> tuple:  # a function, not a lambda: spawned DDP pickles the model
    return (args[0].contiguous(), *args[1:])
