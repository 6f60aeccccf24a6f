"""bam-zoo: BAM (Bottleneck Attention Module) networks for timm and PyTorch Lightning.

Importing ``bam_zoo`` registers every BAM model (and the CIFAR-style ResNet baselines) in timm, so
``timm.create_model("bam_resnet50")`` works too.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, List, Mapping, Union

import timm
import torch.nn as nn
from timm.models import get_arch_pretrained_cfgs, is_model, split_model_name_tag

from . import models  # noqa: F401  (registers the models)
from .analysis import capture_attention, count_macs, count_params
from .errors import UnknownModelError, UnknownPretrainedTagError
from .fuse import fuse_for_inference
from .layers import BAM
from .model_args import check_model_args
from .models import BAM_ARCHS, BAM_PLACEMENT, add_bam, bam_modules, list_pretrained
from .models.bam_models import FEATURE_ARGS, feature_net

__version__ = "0.1.0"

__all__ = [
    "BAM", "BAM_ARCHS", "BAM_PLACEMENT", "add_bam", "bam_modules", "capture_attention", "count_macs", "count_params",
    "create_model", "fuse_for_inference", "list_models", "list_pretrained", "__version__",
]

_OWN_MODELS = tuple(BAM_ARCHS) + tuple(name[len("bam_"):] for name, family in BAM_ARCHS.items()
                                      if family == "cifar_resnet")


def list_models(pattern: str = "*", include_baselines: bool = False) -> List[str]:
    """Names of the models bam-zoo registers, sorted.

    Args:
        pattern: Shell-style wildcard, e.g. ``"bam_resnet*"``.
        include_baselines: Also list the CIFAR-style plain ResNets bam-zoo registers (``resnet20`` ...).
    """
    names = _OWN_MODELS if include_baselines else tuple(BAM_ARCHS)
    return sorted(fnmatch.filter(names, pattern))


def create_model(model_name: str, pretrained: bool = False, add_bam: Union[bool, Mapping[str, Any]] = False,
                 **kwargs: Any) -> nn.Module:
    """Create a model by name: bam-zoo's, any timm model, ``arch.tag``, or ``hf-hub:ORG/NAME``.

    Args:
        model_name: e.g. ``"bam_resnet50"``, ``"bam_resnet20.fmnist"``, ``"resnet50"``, ``"hf-hub:org/repo"``.
        pretrained: Load the weights: a tag's from the Hub, else the repository's offline mirror; an
            ``hf-hub:`` repo's ``model.safetensors`` (never a pickle), at its ``@revision`` if given.
        add_bam: Insert BAM into the (pretrained) network, starting as the identity (:func:`bam_zoo.add_bam`);
            a mapping passes its arguments, e.g. ``dict(stages=["layer3"], dilation=2)``.
        **kwargs: Passed to timm (``num_classes``, ``in_chans``, ``features_only``, ``drop_path_rate``,
            ``bam_args=dict(fusion="product")`` for BAM models, ...).

    Raises:
        UnknownModelError: ``model_name`` names no registered architecture (closest names suggested).
        UnknownPretrainedTagError: the architecture exists but has no such tag.
        InvalidModelArgumentError: ``num_classes`` / ``in_chans`` is not a whole number in range.
    """
    check_model_args(kwargs)
    if ":" not in model_name:  # hf-hub: and local-dir: names are timm's to resolve
        arch, tag = split_model_name_tag(model_name)
        if not is_model(arch):
            candidates = sorted(set(_OWN_MODELS) | set(timm.list_models()))
            raise UnknownModelError(model_name, difflib.get_close_matches(arch, candidates, n=5, cutoff=0.6))
        tags = [split_model_name_tag(name)[1] for name in get_arch_pretrained_cfgs(arch)]
        if tag and tag not in tags:
            raise UnknownPretrainedTagError(arch, tag, [t for t in tags if t])
    if not add_bam:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    features = {k: kwargs.pop(k) for k in FEATURE_ARGS if k in kwargs}  # wrap after BAM is in
    model = models.add_bam(timm.create_model(model_name, pretrained=pretrained, **kwargs),
                           **(dict(add_bam) if isinstance(add_bam, Mapping) else {}))
    if pretrained and hasattr(model, "bam_insertion"):
        model.bam_insertion["base_weights"] = model_name
    return feature_net(model, **features) if features.get("features_only") else model
