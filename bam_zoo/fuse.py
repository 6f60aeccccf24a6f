"""Inference-time folding of BAM's branch BatchNorms into the layers before them.

In eval mode a BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` equals one convolution with
rescaled weights and a bias. Every BAM has ``num_dilated_convs + 2`` such pairs (the channel branch's
``fc1 -> bn`` and the spatial branch's ``conv -> bn`` pairs); folding them removes that many passes and
kernel launches per BAM from every inference call without changing its output beyond float rounding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .layers.bam import BAM, ChannelAttn, SpatialAttn

__all__ = ["fuse_for_inference"]


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Fold the BatchNorms of every BAM branch into the preceding Linear / Conv2d, for inference only.

    The model is switched to eval mode (folding is only exact with running statistics). Each folded
    BatchNorm is replaced by ``nn.Identity`` under the same name, so the module tree still reads like
    the original but the state dict has no ``bn`` keys any more and the reduce convolutions gain a bias:
    keep the unfused model (or its checkpoint) for training, fine-tuning and ``save_pretrained``.
    The backbone's own layers are left as they are, so a fused ``bam_X`` still runs exactly the plain
    ``X`` outside its BAM modules.

    Args:
        model: A model containing :class:`~bam_zoo.layers.BAM` modules, or a single BAM.

    Returns:
        The same model, modified in place and in eval mode.

    Raises:
        ValueError: ``model`` contains no BAM (nothing would be fused; most likely the wrong model).
    """
    bams = [m for m in model.modules() if isinstance(m, BAM)]
    if not bams:
        raise ValueError(
            f"{type(model).__name__} contains no BAM module, so fuse_for_inference has nothing to fold; "
            "pass a bam_zoo model (e.g. bam_zoo.create_model('bam_resnet50')).")
    model.eval()
    for bam in bams:
        _fuse_channel_attn(bam.channel_attn)
        _fuse_spatial_attn(bam.spatial_attn)
    return model


def _fuse_channel_attn(branch: ChannelAttn) -> None:
    if isinstance(branch.bn, nn.BatchNorm1d):
        branch.fc1 = fuse_linear_bn_eval(branch.fc1, branch.bn)
        branch.bn = nn.Identity()


def _fuse_spatial_attn(branch: SpatialAttn) -> None:
    body = branch.body
    names = list(body._modules)
    for conv_name, bn_name in zip(names, names[1:]):
        conv, bn = body._modules[conv_name], body._modules[bn_name]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            body._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
            body._modules[bn_name] = nn.Identity()
