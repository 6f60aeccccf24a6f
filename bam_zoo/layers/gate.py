"""BAM's element-wise gate ``y = x * (1 + sigmoid(Mc (+ or *) Ms))``, the part of BAM that runs at full size.

Kept apart from the module so an optimised kernel can replace it without touching the block's structure.
"""
from __future__ import annotations

import torch

__all__ = ["bam_gate", "bam_gate_reference"]


def bam_gate_reference(
        x: torch.Tensor,
        channel_logits: torch.Tensor,
        spatial_logits: torch.Tensor,
        product: bool = False,
) -> torch.Tensor:
    """Straightforward unfused gate: the definition every faster path must match.

    Args:
        x: Input feature map, N x C x H x W.
        channel_logits: Channel branch output, N x C x 1 x 1.
        spatial_logits: Spatial branch output, N x 1 x H x W.
        product: Multiply the branches (official code) instead of summing them (paper).
    """
    logits = channel_logits * spatial_logits if product else channel_logits + spatial_logits
    return x * (1 + torch.sigmoid(logits))


def bam_gate(
        x: torch.Tensor,
        channel_logits: torch.Tensor,
        spatial_logits: torch.Tensor,
        product: bool = False,
) -> torch.Tensor:
    """BAM gate used by :class:`bam_zoo.layers.BAM` (same arguments as :func:`bam_gate_reference`)."""
    return bam_gate_reference(x, channel_logits, spatial_logits, product)
