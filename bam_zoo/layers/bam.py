"""BAM: Bottleneck Attention Module (Park, Woo, Lee, Kweon, BMVC 2018, arXiv:1807.06514).

``F' = F + F * sigmoid(Mc(F) + Ms(F))``; the paper sums the branches, the official code multiplies them
(``fusion="product"``, offered for its weights). This file is the definition, in standard ops;
:mod:`bam_zoo.layers.bam_cpu` computes the same function faster on the CPU.
"""
from collections import OrderedDict
from typing import Callable, Optional, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_act_layer, make_divisible, register_notrace_function

from .bam_cpu import bam_cpu_forward, cpu_fast_path_applies

LayerType = Union[str, Callable, Type[nn.Module]]

__all__ = ["BAM", "ChannelAttn", "SpatialAttn", "SingleSampleSafeBatchNorm1d", "SingleSampleSafeBatchNorm2d"]

FUSIONS = ("sum", "product")


def single_sample_safe_batch_norm(
        x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor],
        training: bool, momentum: float, eps: float) -> torch.Tensor:
    """``F.batch_norm`` that uses (and keeps) the running statistics where batch ones are undefined: one value
    per channel (batch size 1 in the channel branch, a single 1x1 map in the spatial one)."""
    use_batch_stats = training and x.numel() > x.shape[1]
    if use_batch_stats and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps)


torch.fx.wrap("single_sample_safe_batch_norm")  # a leaf for FX: the test is on the real shape


class _SingleSampleSafeBatchNorm:
    _single_sample_safe = True  # bam_cpu's kernels read its momentum as this forward does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        momentum = self.momentum if self.momentum is not None else 0.1
        return single_sample_safe_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                             self.num_batches_tracked, self.training, momentum, self.eps)


class SingleSampleSafeBatchNorm1d(_SingleSampleSafeBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that trains at batch size 1 (the channel branch sees one value per sample)."""


class SingleSampleSafeBatchNorm2d(_SingleSampleSafeBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that trains on a single 1x1 map."""


class ChannelAttn(nn.Module):
    """``Mc``: global average pool -> Linear(C, C/r) -> BN -> act -> Linear(C/r, C), as N x C x 1 x 1 logits."""

    def __init__(self, channels: int, rd_channels: int, act_layer: LayerType = nn.ReLU, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(channels, rd_channels, **dd)
        self.bn = SingleSampleSafeBatchNorm1d(rd_channels, **dd)
        self.act = get_act_layer(act_layer)(inplace=True)
        self.fc2 = nn.Linear(rd_channels, channels, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3))  # the whole H x W, whatever its aspect ratio
        return self.fc2(self.act(self.bn(self.fc1(pooled))))[:, :, None, None]


class SpatialAttn(nn.Module):
    """``Ms``: 1x1 conv to C/r -> ``num_dilated_convs`` x dilated 3x3 -> 1x1 conv to 1, as N x 1 x H x W logits;
    each convolution but the last is followed by BatchNorm and the activation."""

    def __init__(self, channels: int, rd_channels: int, dilation: int = 4, num_dilated_convs: int = 2,
                 act_layer: LayerType = nn.ReLU, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        act_layer = get_act_layer(act_layer)
        layers = OrderedDict(conv_reduce=nn.Conv2d(channels, rd_channels, 1, bias=False, **dd),
                             bn_reduce=SingleSampleSafeBatchNorm2d(rd_channels, **dd),
                             act_reduce=act_layer(inplace=True))
        for i in range(num_dilated_convs):
            layers[f"conv{i}"] = nn.Conv2d(
                rd_channels, rd_channels, 3, padding=dilation, dilation=dilation, bias=False, **dd)
            layers[f"bn{i}"] = SingleSampleSafeBatchNorm2d(rd_channels, **dd)
            layers[f"act{i}"] = act_layer(inplace=True)
        layers["conv_final"] = nn.Conv2d(rd_channels, 1, 1, **dd)
        self.body = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@register_notrace_function  # a leaf for FX: its checks run on real shapes, also in traced graphs
def check_bam_input(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``x`` itself, after checking it is an N x ``channels`` x H x W map (a clear error instead of a matmul's)."""
    if x.dim() != 4:
        raise ValueError(f"BAM expects a 4-D input (N, C, H, W) with C={channels}, got shape {list(x.shape)}.")
    if x.shape[1] != channels:
        raise ValueError(f"BAM was built for {channels} channels but got an input with {x.shape[1]} channels "
                         f"(shape {list(x.shape)}); build it with BAM({x.shape[1]}) or fix the input.")
    return x


torch.fx.wrap("check_bam_input")  # plain torch.fx.symbolic_trace and torchvision's feature extraction too


class BAM(nn.Module):
    """Bottleneck Attention Module: ``y = x * (1 + gate(Mc(x) + Ms(x)))``, the paper's block.

    With ``identity_init=True`` a learned per-channel scale starting at zero makes the block start as the identity,
    ``y = x + gamma * x * gate(Mc(x) + Ms(x))`` (as ReZero, LayerScale), so it can be added to a trained network
    (:func:`bam_zoo.add_bam`). Same signature as timm's attention layers: it goes wherever timm takes an ``attn_layer``.

    Args:
        channels: Input (and output) channels C.
        rd_ratio: Reduction 1/r of both branches (paper: r = 16).
        rd_channels: Explicit reduced width; overrides ``rd_ratio``. Never below 1.
        rd_divisor: Round the reduced width to a multiple of this.
        dilation: Dilation d of the spatial branch's 3x3 convolutions (paper: 4).
        num_dilated_convs: Dilated 3x3 convolutions in the spatial branch (paper: 2).
        fusion: ``"sum"`` (paper) or ``"product"`` (official code).
        act_layer: Activation inside both branches.
        gate_layer: Gate on the merged logits (paper: sigmoid).
        identity_init: Add the zero-initialised scale ``gamma`` (C values); the paper's block has none.

    Set ``store_attention = True`` (or use :func:`bam_zoo.capture_attention`) to keep the last attention map
    ``gate(Mc + Ms)`` (N x C x H x W, detached) in ``attention_map``.
    """
    attention_map: Optional[torch.Tensor]

    def __init__(self, channels: int, rd_ratio: float = 1. / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 1, dilation: int = 4, num_dilated_convs: int = 2, fusion: str = "sum",
                 act_layer: LayerType = nn.ReLU, gate_layer: LayerType = "sigmoid", identity_init: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"BAM: channels must be a positive int, got {channels!r}.")
        if fusion not in FUSIONS:
            raise ValueError(f"BAM: fusion must be one of {FUSIONS}, got {fusion!r}.")
        if num_dilated_convs < 0:
            raise ValueError(f"BAM: num_dilated_convs must be >= 0, got {num_dilated_convs}.")
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.channels, self.rd_channels, self.fusion = channels, max(1, int(rd_channels)), fusion
        dd = dict(device=device, dtype=dtype)
        self.channel_attn = ChannelAttn(channels, self.rd_channels, act_layer=act_layer, **dd)
        self.spatial_attn = SpatialAttn(channels, self.rd_channels, dilation, num_dilated_convs, act_layer, **dd)
        gate = get_act_layer(gate_layer)
        self.gate = gate() if isinstance(gate, type) else gate
        self.gamma = nn.Parameter(torch.zeros(channels, **dd)) if identity_init else None
        self.store_attention = False
        self.attention_map = None
        self._cpu_fast_path_disabled = False  # bam_cpu.disable_cpu_fast_path's switch

    def extra_repr(self) -> str:
        scale = ", identity_init=True" if self.gamma is not None else ""
        return f"channels={self.channels}, rd_channels={self.rd_channels}, fusion={self.fusion!r}{scale}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_bam_input(x, self.channels)
        if not torch.jit.is_scripting() and self._cpu_fast_path_applies(x):
            return self._cpu_fast_forward(x)  # the same function, faster; one op in traced graphs (bam_cpu)
        channel_logits = self.channel_attn(x)
        spatial_logits = self.spatial_attn(x)
        logits = channel_logits * spatial_logits if self.fusion == "product" else channel_logits + spatial_logits
        attention = self.gate(logits)
        if self.store_attention:
            self.attention_map = attention.detach()
        if self.gamma is not None:
            return x + self.gamma[:, None, None] * (x * attention)
        return x * (1 + attention)

    @torch.jit.unused  # TorchScript compiles the definition only
    def _cpu_fast_path_applies(self, x: torch.Tensor) -> bool:
        return cpu_fast_path_applies(self, x)

    @torch.jit.unused
    def _cpu_fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        return bam_cpu_forward(self, x)
