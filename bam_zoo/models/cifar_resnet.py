"""CIFAR-style ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2).

For 28-32 px inputs: a 3x3 stride-1 stem with 16 channels and no max-pool, three stages of widths
16/32/64 with n BasicBlocks each (depth 6n + 2), and zero-padding identity shortcuts (the paper's option A),
so ``resnet20`` has the paper's 0.27M parameters. Blocks are timm's ``BasicBlock``, so ``attn_layer``,
``drop_path_rate`` and the rest of timm's model API work as for timm's own ResNets.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, create_classifier, get_act_layer, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock

from .pretrained import FASHION_MNIST_TAGS, prepare_pretrained

__all__ = ["CifarResNet", "cifar_cfg"]


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and zero-pad the new channels; no parameters."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # x[:, :, ::s, ::s] as a pooling, whose backward keeps a channels_last gradient channels_last (slicing's
            # comes back NCHW, and every layer below then pays for the mixed layouts)
            x = F.avg_pool2d(x, 1, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.pad))


class CifarResNet(nn.Module):
    """ResNet for small images, with timm's model interface and arguments.

    ``layers`` counts the BasicBlocks per stage (n, n, n for depth 6n + 2); ``block_args`` goes to every block
    (e.g. ``attn_layer``); ``drop_path_rate`` increases linearly over the blocks.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (3, 3, 3),
            channels: Tuple[int, ...] = (16, 32, 64),
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = "avg",
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: Union[str, type] = nn.ReLU,
            block_args: Optional[Dict[str, Any]] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if len(layers) != 3 or len(channels) != 3:
            raise ValueError(f"A CIFAR-style ResNet has three stages: got layers={layers}, channels={channels}; "
                             f"pass three values for each.")
        dd = dict(device=device, dtype=dtype)
        act_layer = get_act_layer(act_layer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(channels[0], **dd)
        self.act1 = act_layer(inplace=True)
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=channels[0], reduction=1, module="act1")]

        total_blocks = sum(layers)
        block_idx = 0
        in_chs = channels[0]
        reduction = 1
        for stage_idx, (depth, out_chs) in enumerate(zip(layers, channels)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for i in range(depth):
                block_stride = stride if i == 0 else 1
                downsample = (ZeroPadShortcut(in_chs, out_chs, block_stride)
                              if block_stride != 1 or in_chs != out_chs else None)
                dpr = drop_path_rate * block_idx / max(total_blocks - 1, 1)
                blocks.append(BasicBlock(
                    in_chs, out_chs, stride=block_stride, downsample=downsample, act_layer=act_layer,
                    drop_path=DropPath(dpr) if dpr > 0. else None, **(block_args or {}), **dd))
                in_chs = out_chs
                block_idx += 1
            name = f"layer{stage_idx + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=name))

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming-normal convolutions, unit BatchNorm, and zero-init of each block's last BN gamma."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if hasattr(m, "zero_init_last"):
                m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head on the network's device and dtype, in its train/eval mode (the pool kept unless named)."""
        self.num_classes = num_classes
        pool_type = global_pool if global_pool is not None else self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool_type,
                                                      **get_device_dtype(self))
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    if pretrained:
        prepare_pretrained(variant, kwargs)
    # stem + three stages: four feature levels, not timm's default five
    return build_model_with_cfg(CifarResNet, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


def cifar_cfg(**kwargs) -> Dict[str, Any]:
    """CIFAR-10 defaults; Fashion-MNIST tags override input size, mean/std."""
    return {
        "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
        "first_conv": "conv1", "classifier": "fc", "license": "mit",
        "paper_ids": "arXiv:1512.03385", "paper_name": "Deep Residual Learning for Image Recognition",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{name: cfg for name, cfg in FASHION_MNIST_TAGS.items() if not name.startswith("bam_")},
    **{f"resnet{depth}": cifar_cfg() for depth in (20, 32, 44, 56, 110)},
})


@register_model
def resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR-size images (n=3, 0.27M parameters)."""
    return _create_cifar_resnet("resnet20", pretrained, **dict(layers=(3, 3, 3), **kwargs))


@register_model
def resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR-size images (n=5, 0.46M parameters)."""
    return _create_cifar_resnet("resnet32", pretrained, **dict(layers=(5, 5, 5), **kwargs))


@register_model
def resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR-size images (n=7, 0.66M parameters)."""
    return _create_cifar_resnet("resnet44", pretrained, **dict(layers=(7, 7, 7), **kwargs))


@register_model
def resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR-size images (n=9, 0.85M parameters)."""
    return _create_cifar_resnet("resnet56", pretrained, **dict(layers=(9, 9, 9), **kwargs))


@register_model
def resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR-size images (n=18, 1.7M parameters)."""
    return _create_cifar_resnet("resnet110", pretrained, **dict(layers=(18, 18, 18), **kwargs))
