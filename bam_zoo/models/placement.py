"""Where BAM goes: one table for every backbone family.

The paper puts one BAM at each *bottleneck* of a network, i.e. at the end of every stage whose output is
downsampled next (ResNet: after stages 1, 2 and 3; none after the last stage, none on the stem). Each row
below names, for one family, the stage modules (as in the backbone's ``feature_info``) whose output BAM
refines. :func:`insert_bam` appends a ``bam`` child to each of those ``nn.Sequential`` stages, so the
stage's output -- and so ``forward_features`` and ``features_only`` feature maps -- carry BAM's refinement,
and state-dict keys read ``layer1.bam.*``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from ..layers import BAM

__all__ = ["BamPlacement", "BAM_PLACEMENT", "insert_bam", "bam_modules"]


@dataclass(frozen=True)
class BamPlacement:
    """Where BAM goes in one backbone family.

    Attributes:
        stages: Names of the stage modules (``feature_info[i]['module']``) followed by a BAM.
        feature_cfg: timm ``feature_cfg`` the family needs for ``features_only`` (e.g. flattening).
    """
    stages: Tuple[str, ...]
    feature_cfg: Dict[str, Any] = field(default_factory=dict)


BAM_PLACEMENT: Dict[str, BamPlacement] = {
    # timm ResNet / Wide ResNet / ResNeXt: stages at stride 4, 8, 16 (paper, Fig. 1).
    "resnet": BamPlacement(stages=("layer1", "layer2", "layer3")),
    # CIFAR-style ResNet (three stages at stride 1, 2, 4): after stages 1 and 2.
    "cifar_resnet": BamPlacement(stages=("layer1", "layer2"), feature_cfg=dict(out_indices=(0, 1, 2, 3))),
    # timm EfficientNet-family (MobileNetV2, EfficientNet): the stages ending at stride 4, 8, 16,
    # as for ResNet; ``blocks`` is nested, so features_only flattens it.
    "efficientnet": BamPlacement(
        stages=("blocks.1", "blocks.2", "blocks.4"), feature_cfg=dict(flatten_sequential=True)),
}


def insert_bam(model: nn.Module, placement: BamPlacement, bam_args: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Append a BAM to each stage named in ``placement``, sized from the model's ``feature_info``.

    Args:
        model: A timm-style backbone with ``feature_info`` and ``nn.Sequential`` stages.
        placement: The family's row of :data:`BAM_PLACEMENT`.
        bam_args: Keyword arguments for every :class:`~bam_zoo.layers.BAM` (e.g. ``fusion="product"``).

    Returns:
        The same model, modified in place.
    """
    channels_of = {info["module"]: info["num_chs"] for info in model.feature_info}
    for name in placement.stages:
        if name not in channels_of:
            raise ValueError(
                f"BAM placement names stage {name!r}, which is not in {type(model).__name__}.feature_info "
                f"(stages: {sorted(channels_of)}); fix the BAM_PLACEMENT row for this family.")
        stage = model.get_submodule(name)
        if not isinstance(stage, nn.Sequential):
            raise TypeError(f"Stage {name!r} is a {type(stage).__name__}, not an nn.Sequential: cannot append BAM.")
        param = next(stage.parameters())
        stage.add_module("bam", BAM(channels_of[name], **(bam_args or {}), device=param.device, dtype=param.dtype))
    return model


def bam_modules(model: nn.Module) -> List[Tuple[str, BAM]]:
    """All BAM modules of a model with their qualified names, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BAM)]
