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

    Args:
        model: Any model containing :class:`~bam_zoo.layers.BAM` modules.

    Yields:
        A dict from module name to its latest attention map, filled as the model runs.
    """
    bams = bam_modules(model)
    if not bams:
        raise ValueError(f"{type(model).__name__} contains no BAM module: there is no attention map to capture.")
    maps: Dict[str, torch.Tensor] = {}

    def _keeper(name: str):
        def hook(module: nn.Module, _inputs, _output) -> None:
            maps[name] = module.attention_map
        return hook

    handles = []
    for name, bam in bams:
        bam.store_attention = True
        handles.append(bam.register_forward_hook(_keeper(name)))
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
    """Multiply-accumulates of one forward pass on a single image of ``input_size`` (C, H, W).

    Counted by PyTorch's own ``FlopCounterMode`` (convolutions and matrix products; element-wise ops are
    not counted, as in the papers' numbers), in eval mode, then divided by two (1 MAC = 2 FLOPs). Under the
    counter BAM runs its plain definition (its CPU speed layer steps aside for any dispatch mode), so the fast
    paths, which trade convolutions for element-wise work, do not hide MACs.
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
