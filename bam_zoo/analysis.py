"""Looking inside BAM models: attention maps for visualisation, parameter and MAC counts."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .models.placement import bam_modules

__all__ = ["capture_attention", "count_params", "count_macs"]


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[Dict[str, torch.Tensor]]:
    """Collect every BAM's attention map (``sigmoid(Mc + Ms)``, N x C x H x W, detached) during forwards.

    Example::

        with bam_zoo.capture_attention(model) as maps:
            model(images)
        maps["layer1.bam"].shape  # (N, 16, 28, 28)

    Outside the ``with`` block BAM keeps nothing, so inference pays nothing for this feature.
    """
    bams = bam_modules(model)
    if not bams:
        raise ValueError(f"{type(model).__name__} contains no BAM module: there is no attention map to capture.")
    maps: Dict[str, torch.Tensor] = {}
    names = {bam: name for name, bam in bams}

    def keep(module: nn.Module, _inputs, _output) -> None:
        maps[names[module]] = module.attention_map

    handles = []
    for _, bam in bams:
        bam.store_attention = True
        handles.append(bam.register_forward_hook(keep))
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()
        for _, bam in bams:
            bam.store_attention = False
            bam.attention_map = None


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass in eval mode on a single image of ``input_size`` (C, H, W).

    Counted by PyTorch's ``FlopCounterMode`` (convolutions and matrix products, as in the papers' numbers),
    under which BAM runs its plain definition, so its fast paths do not hide MACs.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
