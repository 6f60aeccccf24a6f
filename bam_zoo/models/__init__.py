"""Registered architectures: CIFAR-style ResNets and the BAM networks, plus the placement table."""
from . import cifar_resnet, bam_models  # noqa: F401  (registers the models in timm)
from .bam_models import BAM_ARCHS
from .cifar_resnet import CifarResNet
from .placement import BAM_PLACEMENT, BamPlacement, add_bam, bam_modules, bottleneck_stages, insert_bam
from .pretrained import FASHION_MNIST_TAGS, WEIGHT_METADATA, PretrainedInfo, list_pretrained, mirror_root

__all__ = [
    "BAM_ARCHS", "BAM_PLACEMENT", "BamPlacement", "CifarResNet", "FASHION_MNIST_TAGS", "PretrainedInfo",
    "WEIGHT_METADATA", "add_bam", "bam_modules", "bottleneck_stages", "insert_bam", "list_pretrained", "mirror_root",
]
