"""BAM: Bottleneck Attention Module.

Park, Woo, Lee, Kweon, "BAM: Bottleneck Attention Module", BMVC 2018, arXiv:1807.06514.

BAM refines a feature map ``F`` (N x C x H x W) with a 3-D attention map built from two cheap branches:

    F' = F + F * sigmoid(Mc(F) + Ms(F)) = F * (1 + sigmoid(Mc(F) + Ms(F)))

* ``Mc`` (:class:`ChannelAttn`): global average pool over the whole H x W -> MLP with a C/r bottleneck and
  BatchNorm -> C values, broadcast over H x W.
* ``Ms`` (:class:`SpatialAttn`): 1x1 conv to C/r -> ``num_dilated_convs`` x 3x3 dilated conv -> 1x1 conv to
  one map, broadcast over C.

The paper *sums* the two branches (``fusion="sum"``, the default here); the official code multiplies them
(``fusion="product"``), which is offered so weights trained with the official code can be used.

Design decisions where the official code falls short:

* Non-square maps are pooled over the full H x W (the official code pools a square window of size H).
* One value per channel in training (batch size 1 through the channel branch, or a 1x1 map with batch
  size 1 in the spatial branch) makes batch statistics undefined. Instead of crashing, those BatchNorms
  normalise with their running statistics and leave them untouched for that step
  (:class:`SingleSampleSafeBatchNorm1d` / ``2d``). With two or more values they behave exactly like
  ``nn.BatchNorm``.
* The reduced width is never 0: ``rd_channels >= 1`` for any ``channels``.
"""

from collections import OrderedDict
from typing import Callable, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_act_layer, make_divisible
from timm.layers.activations import Sigmoid as TimmSigmoid

from .gate import bam_gate, use_reference_gate
from .native import small_conv, small_conv_applies
from .bam_training import bam_training_forward, fused_training_applies

LayerType = Union[str, Callable, Type[nn.Module]]

__all__ = ["BAM", "ChannelAttn", "SpatialAttn", "SingleSampleSafeBatchNorm1d", "SingleSampleSafeBatchNorm2d"]

FUSIONS = ("sum", "product")


def _is_sigmoid(gate: object) -> bool:
    """Whether ``gate`` is a logistic sigmoid, module or function (timm resolves ``"sigmoid"`` to its own class)."""
    return isinstance(gate, (nn.Sigmoid, TimmSigmoid)) or gate in (torch.sigmoid, F.sigmoid)


class _SingleSampleSafeBatchNorm:
    """BatchNorm forward that uses (and keeps) running statistics when there is one value per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training and x.numel() > x.shape[1]
        if use_batch_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 0.1
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, use_batch_stats, momentum, self.eps)


class SingleSampleSafeBatchNorm1d(_SingleSampleSafeBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that trains with batch size 1 by using running statistics for that step.

    ``SyncBatchNorm.convert_sync_batchnorm`` converts it like any BatchNorm (statistics then come from all
    ranks, so one sample per GPU is fine there).
    """


class SingleSampleSafeBatchNorm2d(_SingleSampleSafeBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that trains on a single 1x1 sample by using running statistics for that step."""


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over the full H x W of an N x C x H x W map, whatever its aspect ratio, as N x C.

    Written as sum / HW: mean's backward runs a full-size division, sum's is a broadcast view (about 10x
    cheaper on a 256 x 28 x 28 map).
    """
    return x.sum((2, 3)) / (x.shape[2] * x.shape[3])


class ChannelAttn(nn.Module):
    """BAM channel branch ``Mc``: global average pool -> Linear(C, C/r) -> BN -> act -> Linear(C/r, C).

    Returns an ``N x C x 1 x 1`` map (pre-gate logits) that broadcasts over H x W.
    """

    def __init__(
            self,
            channels: int,
            rd_channels: int,
            act_layer: LayerType = nn.ReLU,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(channels, rd_channels, **dd)
        self.bn = SingleSampleSafeBatchNorm1d(rd_channels, **dd)
        self.act = get_act_layer(act_layer)(inplace=True)
        self.fc2 = nn.Linear(rd_channels, channels, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(global_avg_pool(x))

    def forward_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The MLP on already pooled ``N x C`` values (BAM's one-node training path pools by itself)."""
        x = self.fc2(self.act(self.bn(self.fc1(pooled))))
        return x.unsqueeze(-1).unsqueeze(-1)


class SpatialAttn(nn.Module):
    """BAM spatial branch ``Ms``: 1x1 conv to C/r -> ``num_dilated_convs`` x 3x3 dilated conv -> 1x1 conv to 1.

    Every convolution but the last is followed by BatchNorm and the activation. Returns ``N x 1 x H x W``
    (pre-gate logits) that broadcasts over C.
    """

    def __init__(
            self,
            channels: int,
            rd_channels: int,
            dilation: int = 4,
            num_dilated_convs: int = 2,
            act_layer: LayerType = nn.ReLU,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        act_layer = get_act_layer(act_layer)
        layers: OrderedDict[str, nn.Module] = OrderedDict({
            "conv_reduce": nn.Conv2d(channels, rd_channels, 1, bias=False, **dd),
            "bn_reduce": SingleSampleSafeBatchNorm2d(rd_channels, **dd),
            "act_reduce": act_layer(inplace=True),
        })
        for i in range(num_dilated_convs):
            layers[f"conv{i}"] = nn.Conv2d(
                rd_channels, rd_channels, 3, padding=dilation, dilation=dilation, bias=False, **dd)
            layers[f"bn{i}"] = SingleSampleSafeBatchNorm2d(rd_channels, **dd)
            layers[f"act{i}"] = act_layer(inplace=True)
        layers["conv_final"] = nn.Conv2d(rd_channels, 1, 1, **dd)
        self.body = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.body(x)
        if use_reference_gate():  # traced / compiled / exported: standard convolutions only
            return self.body(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``self.body[start:](x)`` with the few-channel convolutions routed around oneDNN's slow kernels."""
        for layer in list(self.body)[start:]:
            x = _few_channel_conv(layer, x) if isinstance(layer, nn.Conv2d) else layer(x)
        return x

    @torch.jit.unused
    def forward_reduced(self, reduced: torch.Tensor) -> torch.Tensor:
        """Everything after ``conv_reduce``, on its output (BAM's one-node training path reduces by itself).

        ``reduced`` may be a leaf that requires grad; an in-place first layer (``act_reduce`` once
        :func:`bam_zoo.fuse_for_inference` turned ``bn_reduce`` into an identity) then gets a copy instead.
        """
        first = next((layer for layer in list(self.body)[1:] if not isinstance(layer, nn.Identity)), None)
        if getattr(first, "inplace", False) and reduced.requires_grad and reduced.is_leaf:
            reduced = reduced.clone()
        return self._forward_eager(reduced, start=1)


# 1x1 convolutions with at most this many output channels, or on maps of at least this many pixels, run as a
# matrix product (see _few_channel_conv).
_MATMUL_MAX_OUT_CHANNELS = 4
_MATMUL_MIN_PIXELS = 400


def _few_channel_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` computed the fast way for the one- and two-channel convolutions of small BAMs.

    With ``r = 16`` a 16- or 32-channel stage (CIFAR ResNets) gets ``rd_channels`` of 1 or 2, and oneDNN
    runs 1x1 convolutions with one input or output channel at large batch several times slower than their
    size warrants (measured on a 2-core CPU, batch 256, 28x28: a 16->1 1x1 conv forward+backward ~90 ms, as
    a matmul ~14 ms), and its 1-channel 3x3 dilated convolutions likewise.
    The rewrites below compute the same sums:

    * 1x1 with one input and one output channel: ``x * w + b``, element-wise.
    * kxk (dilated) with one input and one output channel: shifted multiply-adds (:func:`_single_channel_conv`).
    * 1x1 with few outputs (``conv_final``, ``conv_reduce`` when ``rd_channels <= 4``), or on a large map
      (``conv_reduce`` of ResNet-50's first BAM, 256 -> 16 at 28 x 28 or more: forward+backward 5.6 ms as a
      matmul against 15.9 ms in oneDNN, batch 16, 2 threads): a batched matmul.

    With the compiled kernels (:mod:`bam_zoo.layers.native`), convolutions of at most four channel pairs
    (``rd_channels`` of 1 or 2) run as direct loops instead: 0.4 ms against 14 ms in oneDNN for the 1 -> 1
    dilated 3x3 above, 0.5 against 1.2 ms for a 2 -> 2 one at 256 x 14 x 14.

    Anything else (or a layout the rewrite would have to copy) takes ``conv(x)``.
    """
    if small_conv_applies(conv, x):
        return small_conv(conv, x)
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return conv(x)
    n, c, h, w = x.shape
    weight, bias = conv.weight, conv.bias
    one_by_one = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
    if one_by_one and c == 1 and conv.out_channels == 1:
        y = x * weight.view(1, 1, 1, 1)
        return y if bias is None else y + bias.view(1, 1, 1, 1)
    if c == 1 and conv.out_channels == 1 and conv.stride == (1, 1):
        return _single_channel_conv(x, weight, bias, conv.padding, conv.dilation)
    few_outputs = conv.out_channels <= _MATMUL_MAX_OUT_CHANNELS
    if one_by_one and (few_outputs or h * w >= _MATMUL_MIN_PIXELS) and x.is_contiguous():
        # bmm against the broadcast weight; torch.matmul would fold x into a transposed copy and save it.
        # A bias (BatchNorm folded by fuse_for_inference) goes in as baddbmm's input: no second buffer.
        weight = weight.view(1, conv.out_channels, c).expand(n, -1, -1)
        if bias is None:
            y = torch.bmm(weight, x.view(n, c, h * w))
        else:
            y = torch.baddbmm(bias.view(1, -1, 1).expand(n, -1, h * w), weight, x.view(n, c, h * w))
        return y.view(n, conv.out_channels, h, w)
    return conv(x)


def _single_channel_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         padding: Tuple[int, ...], dilation: Tuple[int, ...]) -> torch.Tensor:
    """A 1 -> 1 channel stride-1 convolution as k*k shifted multiply-adds of the zero-padded map.

    For the spatial branch of BAMs with ``rd_channels == 1`` (bam_resnet20's first BAM): its 3x3 dilated
    convolution at batch 256, 28 x 28 takes 16 ms forward+backward in oneDNN and 3 ms this way (2 threads).
    """
    kh, kw = weight.shape[2], weight.shape[3]
    (ph, pw), (dh, dw) = padding, dilation
    h_out = x.shape[2] + 2 * ph - dh * (kh - 1)
    w_out = x.shape[3] + 2 * pw - dw * (kw - 1)
    padded = F.pad(x, (pw, pw, ph, ph))
    y = None
    for i in range(kh):
        for j in range(kw):
            tap = padded[:, :, i * dh:i * dh + h_out, j * dw:j * dw + w_out] * weight[0, 0, i, j]
            y = tap if y is None else y + tap
    return y if bias is None else y + bias.view(1, 1, 1, 1)


class BAM(nn.Module):
    """Bottleneck Attention Module: ``y = x * (1 + gate(Mc(x) + Ms(x)))``.

    Plugs in wherever timm takes an ``attn_layer`` (same signature as ``timm.layers.CbamModule``).

    Args:
        channels: Number of input (and output) channels C.
        rd_ratio: Reduction ratio 1/r of both branches (paper: r = 16).
        rd_channels: Explicit reduced width; overrides ``rd_ratio``.
        rd_divisor: Round the reduced width to a multiple of this.
        dilation: Dilation d of the spatial branch's 3x3 convolutions (paper: 4).
        num_dilated_convs: Number of dilated 3x3 convolutions in the spatial branch (paper: 2).
        fusion: ``"sum"`` (paper) or ``"product"`` (official code) to merge the two branches.
        act_layer: Activation inside both branches.
        gate_layer: Gate applied to the merged logits (paper: sigmoid).
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Set ``store_attention = True`` (or use :func:`bam_zoo.capture_attention`) to keep the last attention map
    ``gate(Mc + Ms)`` (N x C x H x W, detached) in ``attention_map``; it costs nothing when unset.
    """

    def __init__(
            self,
            channels: int,
            rd_ratio: float = 1. / 16,
            rd_channels: Optional[int] = None,
            rd_divisor: int = 1,
            dilation: int = 4,
            num_dilated_convs: int = 2,
            fusion: str = "sum",
            act_layer: LayerType = nn.ReLU,
            gate_layer: LayerType = "sigmoid",
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"BAM: channels must be a positive int, got {channels!r}.")
        if fusion not in FUSIONS:
            raise ValueError(f"BAM: fusion must be one of {FUSIONS}, got {fusion!r}.")
        if num_dilated_convs < 0:
            raise ValueError(f"BAM: num_dilated_convs must be >= 0, got {num_dilated_convs}.")
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        rd_channels = max(1, int(rd_channels))
        self.channels = channels
        self.rd_channels = rd_channels
        self.fusion = fusion
        self.channel_attn = ChannelAttn(channels, rd_channels, act_layer=act_layer, device=device, dtype=dtype)
        self.spatial_attn = SpatialAttn(
            channels, rd_channels, dilation=dilation, num_dilated_convs=num_dilated_convs,
            act_layer=act_layer, device=device, dtype=dtype)
        gate = get_act_layer(gate_layer)
        self.gate = gate() if isinstance(gate, type) else gate
        # The fused kernel hard-codes the sigmoid; any other gate takes the plain path.
        self.fused_sigmoid = _is_sigmoid(self.gate)
        self.store_attention = False
        self.attention_map: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return f"channels={self.channels}, rd_channels={self.rd_channels}, fusion={self.fusion!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"BAM expects a 4-D input (N, C, H, W) with C={self.channels}, got shape {list(x.shape)}.")
        if x.shape[1] != self.channels:
            raise ValueError(
                f"BAM was built for {self.channels} channels but got an input with {x.shape[1]} channels "
                f"(shape {list(x.shape)}); build it with BAM({x.shape[1]}) or fix the input.")
        if not torch.jit.is_scripting() and self._takes_training_node(x):
            return self._training_node(x)  # one autograd node, far fewer full-size passes
        channel_logits = self.channel_attn(x)
        spatial_logits = self.spatial_attn(x)
        if self.store_attention:
            self._store_attention(channel_logits, spatial_logits)
        if self.fused_sigmoid:
            return bam_gate(x, channel_logits, spatial_logits, self.fusion == "product")
        return x * (1 + self.attention(channel_logits, spatial_logits))

    @torch.jit.unused
    def _takes_training_node(self, x: torch.Tensor) -> bool:
        return fused_training_applies(self, x)

    @torch.jit.unused
    def _training_node(self, x: torch.Tensor) -> torch.Tensor:
        """Training through :class:`bam_zoo.layers.bam_training.BamBlockFunction` (eager mode only)."""
        return bam_training_forward(self, x)

    @torch.jit.unused
    def _store_attention(self, channel_logits: torch.Tensor, spatial_logits: torch.Tensor) -> None:
        """Keep the attention map for visualisation (eager mode only; TorchScript compiles it out)."""
        self.attention_map = self.attention(channel_logits, spatial_logits).detach()

    def attention(self, channel_logits: torch.Tensor, spatial_logits: torch.Tensor) -> torch.Tensor:
        """The full attention map ``gate(Mc (+ or *) Ms)``, materialised (N x C x H x W)."""
        if self.fusion == "product":
            return self.gate(channel_logits * spatial_logits)
        return self.gate(channel_logits + spatial_logits)
