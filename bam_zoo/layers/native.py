"""The compiled CPU kernels of ``bam_zoo._native`` (``bam_zoo/csrc``), and autograd for the ones BAM calls.

They are built at install time against the installed torch (``setup.py``; ``pip install --no-build-isolation``).
Where they are missing (no compiler at install, another torch) or disabled with ``BAM_ZOO_NATIVE_GATE=0``,
every caller takes its ATen path, which computes the same function more slowly.
"""
import os
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    "BufferCacheInfo", "buffer_cache_info", "empty_buffer_cache", "native_kernels_available", "small_conv",
    "small_conv_applies", "SmallConvFunction",
]


def _load() -> bool:
    """Import the compiled kernels (registers ``torch.ops.bam_zoo.*``); False when absent or disabled."""
    if os.environ.get("BAM_ZOO_NATIVE_GATE", "") == "0":
        return False
    try:
        from .. import _native  # noqa: F401
    except ImportError:  # installed without a compiler, or built for another torch
        return False
    return True


NATIVE = _load()

# The gate kernels return their full-size buffers from a small cache (see bam_zoo/csrc: a fresh 12.8 MB buffer
# costs ~3 ms of page faults, a reused one 0.3 ms). BAM_ZOO_BUFFER_CACHE_MB sets how much freed memory it may
# keep for reuse (default 256; 0 turns caching off).
_DEFAULT_CACHE_MB = 256


def _cache_limit_mb() -> int:
    value = os.environ.get("BAM_ZOO_BUFFER_CACHE_MB", str(_DEFAULT_CACHE_MB))
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"BAM_ZOO_BUFFER_CACHE_MB must be a whole number of MiB (0 turns the cache off), "
                         f"got {value!r}.") from None
    if limit < 0:
        raise ValueError(f"BAM_ZOO_BUFFER_CACHE_MB must be >= 0 (0 turns the cache off), got {limit}.")
    return limit


if NATIVE:
    torch.ops.bam_zoo.buffer_cache_set_limit(_cache_limit_mb() << 20)


class BufferCacheInfo(NamedTuple):
    """Bytes of the gate's buffer cache: in live tensors, kept for reuse, and the most it may keep."""
    allocated: int
    cached: int
    limit: int


def buffer_cache_info() -> BufferCacheInfo:
    """Where the gate kernels' buffer cache stands (all zeros without the compiled kernels)."""
    if not NATIVE:
        return BufferCacheInfo(0, 0, 0)
    return BufferCacheInfo(*torch.ops.bam_zoo.buffer_cache_info())


def empty_buffer_cache() -> None:
    """Free every buffer the cache keeps for reuse (live tensors are untouched), like ``torch.cuda.empty_cache``."""
    if NATIVE:
        torch.ops.bam_zoo.buffer_cache_empty()

# oneDNN is slow on convolutions this small (channels in x channels out); the direct loops are not on larger ones
# (4 -> 4 at 7 x 7 is already a tie, 16 -> 16 is 5x slower).
_SMALL_CONV_MAX_CHANNEL_PAIRS = 4


def native_kernels_available() -> bool:
    """Whether the compiled kernels of ``bam_zoo._native`` are loaded."""
    return NATIVE


def small_conv_applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether :func:`small_conv` can run ``conv(x)``: a stride-1, zero-padded, ungrouped conv with at most
    four (input, output) channel pairs on a contiguous float32 CPU map."""
    return (NATIVE and conv.in_channels * conv.out_channels <= _SMALL_CONV_MAX_CHANNEL_PAIRS
            and conv.groups == 1 and conv.stride == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype == conv.weight.dtype == torch.float32 and x.is_contiguous())


class SmallConvFunction(torch.autograd.Function):
    """Autograd for ``torch.ops.bam_zoo.small_conv_*`` (direct loops for convolutions of one to four channels)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: List[int],
                dilation: List[int]) -> torch.Tensor:
        weight = weight.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.geometry = (padding, dilation)
        ctx.has_bias = bias is not None
        return torch.ops.bam_zoo.small_conv_forward(x, weight, bias, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b = torch.ops.bam_zoo.small_conv_backward(
            grad_out.contiguous(), x, weight, *ctx.geometry)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None


def small_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` through the direct-loop kernels; check :func:`small_conv_applies` first."""
    bias = conv.bias.contiguous() if conv.bias is not None else None
    padding, dilation = list(conv.padding), list(conv.dilation)
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return SmallConvFunction.apply(x, conv.weight, bias, padding, dilation)
    return torch.ops.bam_zoo.small_conv_forward(x, conv.weight.contiguous(), bias, padding, dilation)
