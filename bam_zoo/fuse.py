"""Inference-time folding of BAM's branch BatchNorms into the layers before them.

In eval mode a BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` is one convolution: folding
removes ``num_dilated_convs + 2`` passes per BAM without changing its output beyond float rounding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .layers.bam import BAM

__all__ = ["fuse_for_inference"]


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Fold the BatchNorms of every BAM branch into the preceding Linear / Conv2d; in place, in eval mode (where
    folding is exact, with running statistics).

    Each folded BatchNorm becomes ``nn.Identity`` under the same name, so the state dict changes: keep the
    unfused model for training and ``save_pretrained``. The backbone's own layers are left as they are.
    """
    bams = [m for m in model.modules() if isinstance(m, BAM)]
    if not bams:
        raise ValueError(
            f"{type(model).__name__} contains no BAM module, so fuse_for_inference has nothing to fold; "
            "pass a bam_zoo model (e.g. bam_zoo.create_model('bam_resnet50')).")
    model.eval()
    for bam in bams:
        channel, body = bam.channel_attn, bam.spatial_attn.body
        if isinstance(channel.bn, nn.BatchNorm1d):
            channel.fc1 = fuse_linear_bn_eval(channel.fc1, channel.bn)
            channel.bn = nn.Identity()
        names = list(body._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = body._modules[conv_name], body._modules[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                body._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                body._modules[bn_name] = nn.Identity()
    return model
