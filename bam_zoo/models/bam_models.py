"""BAM networks registered in timm: each is its plain timm twin with BAM at every bottleneck.

``bam_<arch>`` builds the registered model ``<arch>`` and appends BAM to the stages :data:`BAM_PLACEMENT` names
for its family; timm's ``build_model_with_cfg`` handles pretrained weights and ``features_only`` as for any model.
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
    **{f"bam_{arch}": "resnet" for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                            "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d",
                                            "resnext101_32x8d")},
    "bam_mobilenetv2_100": "efficientnet",
    "bam_efficientnet_b0": "efficientnet",
    **{f"bam_resnet{depth}": "cifar_resnet" for depth in (20, 32, 44, 56, 110)},
}


def _create_bam_model(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build ``variant`` (``bam_<twin>``) through timm's builder so cfgs, weights and features all work.

    ``bam_args`` (e.g. ``dict(fusion="product")``) goes to every BAM; a tag whose weights need it sets it.
    """
    tag_args = tag_model_args(variant, kwargs)
    placement = BAM_PLACEMENT[BAM_ARCHS[variant]]
    if pretrained:
        prepare_pretrained(variant, kwargs)

    def build(bam_args: Optional[Dict[str, Any]] = None, **kw) -> nn.Module:  # the plain twin, then BAM inserted
        return insert_bam(timm.create_model(variant[len("bam_"):], pretrained=False, **kw), placement.stages,
                          bam_args=bam_args)

    model = build_model_with_cfg(build, variant, pretrained, feature_cfg=dict(placement.feature_cfg), **kwargs)
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
    feature_cfg = {k: v for k, v in feature_cfg.items() if k not in ("features_only", "feature_cls")}
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


_FAMILY_CFGS = {"resnet": _imagenet_cfg(), "cifar_resnet": cifar_cfg(paper_ids="arXiv:1807.06514"),
                "efficientnet": _imagenet_cfg(first_conv="conv_stem", classifier="classifier")}

default_cfgs = generate_default_cfgs({
    # Shipped Fashion-MNIST weights come first: the default tag of an arch is its best weights (timm rule).
    **{name: cfg for name, cfg in FASHION_MNIST_TAGS.items() if name.startswith("bam_")},
    # pytorchcv's ImageNet weights, converted on load (convert.py; sha1 and source in WEIGHT_METADATA). The
    # untagged bam_resnet50 (marked '*') stays the default: plain bam_resnet50 sums.
    "bam_resnet50.imgclsmob_in1k": _imagenet_cfg(
        url="https://github.com/osmr/imgclsmob/releases/download/v0.0.499/bam_resnet50-0547-a04adf3c.pth.zip",
        origin_url="https://github.com/osmr/imgclsmob"),
    **{name + (".*" if name == "bam_resnet50" else ""): _FAMILY_CFGS[family] for name, family in BAM_ARCHS.items()},
    # add_bam's models: the base network's own cfg travels in each export's config.json; the untagged default
    # (marked '*', ahead of the shipped tag) is resnet50's
    INSERTED_ARCH + ".*": _imagenet_cfg(),
})


@register_model
def bam_inserted(pretrained: bool = False, base_model: str = "resnet50", bam_stages: Union[str, Sequence[str]] = "auto",
                 identity_init: bool = True, bam_args: Optional[Dict[str, Any]] = None, **kwargs) -> nn.Module:
    """Any timm CNN with BAM added by :func:`~bam_zoo.add_bam`: exports of such models rebuild through this name,
    from the arguments their ``config.json`` records, and then load the whole state dict."""
    features = {k: kwargs.pop(k) for k in FEATURE_ARGS if k in kwargs}
    tag_model_args(INSERTED_ARCH, kwargs)  # a shipped tag fixes its base network and BAMs; add_bam records them
    base_model, bam_stages = kwargs.pop("base_model", base_model), kwargs.pop("bam_stages", bam_stages)
    identity_init, bam_args = kwargs.pop("identity_init", identity_init), kwargs.pop("bam_args", bam_args)
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
