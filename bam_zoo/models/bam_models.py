"""BAM networks registered in timm: each is its plain timm twin with BAM at every bottleneck.

``bam_<arch>`` builds the registered model ``<arch>`` (timm's, or bam_zoo's CIFAR-style ResNets) and
appends BAM to the stages named in :data:`bam_zoo.models.placement.BAM_PLACEMENT` for its family. timm's
``build_model_with_cfg`` then handles pretrained weights and ``features_only`` as for any timm model.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import timm
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import FeatureListNet, build_model_with_cfg, generate_default_cfgs, register_model

from .cifar_resnet import cifar_cfg
from .placement import BAM_PLACEMENT, INSERTED_ARCH, add_bam, insert_bam
from .pretrained import FASHION_MNIST_TAGS, prepare_pretrained, tag_model_args

__all__ = ["BAM_ARCHS", "FEATURE_ARGS", "feature_net"]

# bam arch -> placement family (its plain twin is the name without "bam_").
BAM_ARCHS: Dict[str, str] = {
    "bam_resnet18": "resnet",
    "bam_resnet34": "resnet",
    "bam_resnet50": "resnet",
    "bam_resnet101": "resnet",
    "bam_resnet152": "resnet",
    "bam_wide_resnet50_2": "resnet",
    "bam_wide_resnet101_2": "resnet",
    "bam_resnext50_32x4d": "resnet",
    "bam_resnext101_32x8d": "resnet",
    "bam_mobilenetv2_100": "efficientnet",
    "bam_efficientnet_b0": "efficientnet",
    "bam_resnet20": "cifar_resnet",
    "bam_resnet32": "cifar_resnet",
    "bam_resnet44": "cifar_resnet",
    "bam_resnet56": "cifar_resnet",
    "bam_resnet110": "cifar_resnet",
}


def _build_with_bam(base_arch: str, family: str, bam_args: Optional[Dict[str, Any]] = None, **kwargs) -> nn.Module:
    """Model constructor handed to ``build_model_with_cfg``: the plain twin, then the paper's BAM inserted."""
    model = timm.create_model(base_arch, pretrained=False, **kwargs)
    return insert_bam(model, BAM_PLACEMENT[family].stages, bam_args=bam_args)


def _create_bam_model(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build ``variant`` (``bam_<twin>``) through timm's builder so cfgs, weights and features all work.

    ``bam_args`` (a dict of :class:`~bam_zoo.layers.BAM` arguments, e.g. ``dict(fusion="product")``) is
    passed through to every BAM; a tag whose weights need one (``imgclsmob_in1k``) sets it.
    """
    tag_args = tag_model_args(variant, kwargs)
    family = BAM_ARCHS[variant]
    placement = BAM_PLACEMENT[family]
    feature_cfg = dict(placement.feature_cfg)
    if pretrained:
        prepare_pretrained(variant, kwargs)
    model = build_model_with_cfg(
        lambda **kw: _build_with_bam(variant[len("bam_"):], family, **kw),
        variant,
        pretrained,
        feature_cfg=feature_cfg,
        **kwargs,
    )
    model._model_args = tag_args  # timm's create_model adds the caller's arguments; exports record both
    return model


#: ``create_model`` arguments that ask for a features-only wrapper rather than shape the network.
FEATURE_ARGS = ("features_only", "out_indices", "feature_cls", "output_fmt", "feature_cfg")


def feature_net(model: nn.Module, out_indices: Optional[Sequence[int]] = None, **feature_cfg: Any) -> nn.Module:
    """``features_only`` for a built (and loaded, and BAM-inserted) model: timm's ``FeatureListNet`` over it.

    Why not timm's own ``features_only``: timm wraps the model before anything can be inserted into it. The
    stages are called in order, flattening a nested ``nn.Sequential`` where ``feature_info`` names its children.
    """
    modules = [f["module"] for f in model.feature_info]
    if out_indices is None:
        out_indices = tuple(i for i, m in enumerate(modules) if m)  # '' (the whole model) is no stage
    feature_cfg.pop("features_only", None)
    feature_cfg.pop("feature_cls", None)
    net = FeatureListNet(model, out_indices=tuple(out_indices), flatten_sequential=any("." in m for m in modules),
                         **feature_cfg)
    net.pretrained_cfg = net.default_cfg = model.pretrained_cfg
    return net


def _imagenet_cfg(**kwargs) -> Dict[str, Any]:
    """ImageNet input and head for timm's tooling: pytorchcv's evaluation (224 px, crop 0.875, bilinear)."""
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "mit",
        "paper_ids": "arXiv:1807.06514", "paper_name": "BAM: Bottleneck Attention Module",
        **kwargs,
    }


_effnet = dict(first_conv="conv_stem", classifier="classifier")

default_cfgs = generate_default_cfgs({
    "bam_resnet18": _imagenet_cfg(),
    "bam_resnet34": _imagenet_cfg(),
    # pytorchcv's ImageNet weights, converted on load (bam_zoo/models/convert.py); sha1 and source in
    # WEIGHT_METADATA. The untagged cfg after it (marked '*') stays the default: plain bam_resnet50 sums.
    "bam_resnet50.imgclsmob_in1k": _imagenet_cfg(
        url="https://github.com/osmr/imgclsmob/releases/download/v0.0.499/bam_resnet50-0547-a04adf3c.pth.zip",
        origin_url="https://github.com/osmr/imgclsmob"),
    "bam_resnet50.*": _imagenet_cfg(),
    "bam_resnet101": _imagenet_cfg(),
    "bam_resnet152": _imagenet_cfg(),
    "bam_wide_resnet50_2": _imagenet_cfg(),
    "bam_wide_resnet101_2": _imagenet_cfg(),
    "bam_resnext50_32x4d": _imagenet_cfg(),
    "bam_resnext101_32x8d": _imagenet_cfg(),
    "bam_mobilenetv2_100": _imagenet_cfg(**_effnet),
    "bam_efficientnet_b0": _imagenet_cfg(**_effnet),
    # Shipped Fashion-MNIST weights come first: the default tag of an arch is its best weights (timm rule).
    **{name: cfg for name, cfg in FASHION_MNIST_TAGS.items() if name.startswith("bam_")},
    "bam_resnet20": cifar_cfg(paper_ids="arXiv:1807.06514"),
    "bam_resnet32": cifar_cfg(paper_ids="arXiv:1807.06514"),
    "bam_resnet44": cifar_cfg(paper_ids="arXiv:1807.06514"),
    "bam_resnet56": cifar_cfg(paper_ids="arXiv:1807.06514"),
    "bam_resnet110": cifar_cfg(paper_ids="arXiv:1807.06514"),
    # add_bam's models: the base network's own cfg travels in each export's config.json; this is resnet50's
    INSERTED_ARCH: _imagenet_cfg(),
})


@register_model
def bam_inserted(pretrained: bool = False, base_model: str = "resnet50", bam_stages: Union[str, Sequence[str]] = "auto",
                 identity_init: bool = True, bam_args: Optional[Dict[str, Any]] = None, **kwargs) -> nn.Module:
    """Any timm CNN with BAM added by :func:`~bam_zoo.add_bam`: exports of such models rebuild through this name.

    ``config.json`` of an export records the arguments; ``timm.create_model("local-dir:..." or "hf-hub:...",
    pretrained=True)`` then builds ``base_model``, inserts BAM at ``bam_stages`` and loads the whole state dict.
    """
    features = {k: kwargs.pop(k) for k in FEATURE_ARGS if k in kwargs}
    if pretrained:
        prepare_pretrained(INSERTED_ARCH, kwargs)
    model = build_model_with_cfg(
        lambda **kw: add_bam(timm.create_model(base_model, **kw), bam_stages, identity_init, **(bam_args or {})),
        INSERTED_ARCH, pretrained, **kwargs)
    return feature_net(model, **features) if features.get("features_only") else model


@register_model
def bam_resnet18(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-18 with BAM after stages 1-3 (11.71M parameters)."""
    return _create_bam_model("bam_resnet18", pretrained, **kwargs)


@register_model
def bam_resnet34(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-34 with BAM after stages 1-3."""
    return _create_bam_model("bam_resnet34", pretrained, **kwargs)


@register_model
def bam_resnet50(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-50 with BAM after stages 1-3 (25.92M parameters, paper Table 4)."""
    return _create_bam_model("bam_resnet50", pretrained, **kwargs)


@register_model
def bam_resnet101(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-101 with BAM after stages 1-3 (44.91M parameters, paper Table 4)."""
    return _create_bam_model("bam_resnet101", pretrained, **kwargs)


@register_model
def bam_resnet152(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-152 with BAM after stages 1-3."""
    return _create_bam_model("bam_resnet152", pretrained, **kwargs)


@register_model
def bam_wide_resnet50_2(pretrained: bool = False, **kwargs) -> nn.Module:
    """Wide ResNet-50-2 with BAM after stages 1-3."""
    return _create_bam_model("bam_wide_resnet50_2", pretrained, **kwargs)


@register_model
def bam_wide_resnet101_2(pretrained: bool = False, **kwargs) -> nn.Module:
    """Wide ResNet-101-2 with BAM after stages 1-3."""
    return _create_bam_model("bam_wide_resnet101_2", pretrained, **kwargs)


@register_model
def bam_resnext50_32x4d(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNeXt-50 (32x4d) with BAM after stages 1-3."""
    return _create_bam_model("bam_resnext50_32x4d", pretrained, **kwargs)


@register_model
def bam_resnext101_32x8d(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNeXt-101 (32x8d) with BAM after stages 1-3."""
    return _create_bam_model("bam_resnext101_32x8d", pretrained, **kwargs)


@register_model
def bam_mobilenetv2_100(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNetV2 (width 1.0) with BAM after the stages ending at stride 4, 8 and 16."""
    return _create_bam_model("bam_mobilenetv2_100", pretrained, **kwargs)


@register_model
def bam_efficientnet_b0(pretrained: bool = False, **kwargs) -> nn.Module:
    """EfficientNet-B0 with BAM after the stages ending at stride 4, 8 and 16."""
    return _create_bam_model("bam_efficientnet_b0", pretrained, **kwargs)


@register_model
def bam_resnet20(pretrained: bool = False, **kwargs) -> nn.Module:
    """CIFAR-style ResNet-20 with BAM after stages 1 and 2."""
    return _create_bam_model("bam_resnet20", pretrained, **kwargs)


@register_model
def bam_resnet32(pretrained: bool = False, **kwargs) -> nn.Module:
    """CIFAR-style ResNet-32 with BAM after stages 1 and 2."""
    return _create_bam_model("bam_resnet32", pretrained, **kwargs)


@register_model
def bam_resnet44(pretrained: bool = False, **kwargs) -> nn.Module:
    """CIFAR-style ResNet-44 with BAM after stages 1 and 2."""
    return _create_bam_model("bam_resnet44", pretrained, **kwargs)


@register_model
def bam_resnet56(pretrained: bool = False, **kwargs) -> nn.Module:
    """CIFAR-style ResNet-56 with BAM after stages 1 and 2."""
    return _create_bam_model("bam_resnet56", pretrained, **kwargs)


@register_model
def bam_resnet110(pretrained: bool = False, **kwargs) -> nn.Module:
    """CIFAR-style ResNet-110 with BAM after stages 1 and 2."""
    return _create_bam_model("bam_resnet110", pretrained, **kwargs)
