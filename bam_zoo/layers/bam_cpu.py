"""BAM's speed layer: the same function as :class:`bam_zoo.layers.BAM`'s definition, faster on the CPU in eager mode.

Everything here is behind one check, :func:`cpu_fast_path_applies`: float32 maps on the CPU, contiguous or
channels_last, in plain eager mode. CUDA, MPS, autocast, ``torch.compile`` / ``torch.export``, TorchScript,
``torch.jit.trace``, FX, ONNX export and any active ``TorchDispatchMode`` (e.g. ``FlopCounterMode``) get the
plain definition: these paths were measured only on the CPU, and compilers fuse the definition on their own.
Why BAM needs this on a CPU, and the numbers, are in ``docs/performance.md``. The parts:

* the gate ``x * (1 + sigmoid(Mc + Ms))`` as one pass each way (compiled kernels, ``bam_zoo/csrc``), or as
  ATen ops writing into one buffer where the kernels are missing (:class:`BamGateFunction`);
* convolutions with one or two channels as direct loops or matrix products (:func:`few_channel_conv`), where
  oneDNN is several times slower than their size warrants;
* a training step of a BAM as one autograd node (:class:`BamBlockFunction`) that adds the pool's and the reduce
  convolution's input gradients into the gate's in place, on large maps or where the spatial branch is one or two
  channels wide; there the branch after its reduction runs as compiled kernels, one call each way
  (:class:`SpatialChain`);
* a reuse cache for the gate's full-size buffers (in the compiled kernels; :func:`empty_buffer_cache`).

The state dict is the definition's: the fast path reads the same parameters and buffers.
"""
import os
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.activations import Sigmoid as TimmSigmoid
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

if TYPE_CHECKING:
    from .bam import BAM

__all__ = [
    "cpu_fast_path_applies", "bam_cpu_forward", "disable_cpu_fast_path", "native_kernels_available",
    "BufferCacheInfo", "buffer_cache_info", "empty_buffer_cache", "bam_gate", "few_channel_conv",
    "BamGateFunction", "BamBlockFunction",
]


# ---- The compiled kernels (bam_zoo._native) ------------------------------------------------------------------

def _load_native() -> bool:
    """Import the compiled kernels (registers ``torch.ops.bam_zoo.*``); False when absent or disabled."""
    if os.environ.get("BAM_ZOO_NATIVE_GATE", "") == "0":
        return False
    try:
        from .. import _native  # noqa: F401
    except ImportError:  # installed without a compiler, or built for another torch
        return False
    return True


NATIVE = _load_native()


def native_kernels_available() -> bool:
    """Whether the compiled kernels of ``bam_zoo._native`` are loaded (``BAM_ZOO_NATIVE_GATE=0`` turns them off)."""
    return NATIVE


def _cache_limit_mb() -> int:
    """``BAM_ZOO_BUFFER_CACHE_MB`` (default 256, 0 turns the cache off), validated."""
    value = os.environ.get("BAM_ZOO_BUFFER_CACHE_MB", "256")
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"BAM_ZOO_BUFFER_CACHE_MB must be a whole number of MiB (0 turns the cache off), "
                         f"got {value!r}.") from None
    if limit < 0:
        raise ValueError(f"BAM_ZOO_BUFFER_CACHE_MB must be >= 0 (0 turns the cache off), got {limit}.")
    return limit


_CACHE_LIMIT_MB = _cache_limit_mb()  # validated even where the kernels are missing, so a typo never goes unseen
if NATIVE:
    torch.ops.bam_zoo.buffer_cache_set_limit(_CACHE_LIMIT_MB << 20)


class BufferCacheInfo(NamedTuple):
    """Bytes of the gate's buffer cache: in live tensors, kept for reuse, and the most it may keep."""
    allocated: int
    cached: int
    limit: int


def buffer_cache_info() -> BufferCacheInfo:
    """Where the gate kernels' buffer cache stands (all zeros without the compiled kernels)."""
    return BufferCacheInfo(*torch.ops.bam_zoo.buffer_cache_info()) if NATIVE else BufferCacheInfo(0, 0, 0)


def empty_buffer_cache() -> None:
    """Free every buffer the cache keeps for reuse (live tensors are untouched), like ``torch.cuda.empty_cache``."""
    if NATIVE:
        torch.ops.bam_zoo.buffer_cache_empty()


# ---- The one applicability check ------------------------------------------------------------------------------

def _plain_eager() -> bool:
    """False while anything records or transforms the program instead of running it op by op."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or is_fx_symbolic_tracing():
        return False
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return False
    return torch._C._len_torch_dispatch_stack() == 0  # FlopCounterMode, FakeTensorMode, ... see the definition


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in module.modules())


def cpu_fast_path_applies(bam: "BAM", x: torch.Tensor) -> bool:
    """Whether ``bam(x)`` may run :func:`bam_cpu_forward` instead of the definition.

    Plain eager mode (checked first, before ``x`` is looked at, so tracers see no control flow on it), a
    float32 CPU map, contiguous or channels_last, a sigmoid gate, no autocast, the attention map not asked for,
    no hooks on the branches (the fast path calls their layers directly), and not opted out with
    :func:`disable_cpu_fast_path`.
    """
    if not _plain_eager() or getattr(bam, "_cpu_fast_path_disabled", False):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return False
    if bam.store_attention or not _is_sigmoid(bam.gate):
        return False
    return not (_has_hooks(bam.channel_attn) or _has_hooks(bam.spatial_attn))


def disable_cpu_fast_path(model: nn.Module, disabled: bool = True) -> nn.Module:
    """Make every BAM in ``model`` run its plain definition on the CPU too (or again the fast path).

    For second derivatives (``create_graph=True``, e.g. a gradient penalty): the training node computes first
    derivatives only. Returns ``model``.
    """
    for module in model.modules():
        if hasattr(module, "_cpu_fast_path_disabled"):  # every BAM has this switch (BAM.__init__ sets it)
            module._cpu_fast_path_disabled = disabled
    return model


def _is_sigmoid(gate: object) -> bool:
    """A logistic sigmoid, module or function (timm resolves ``"sigmoid"`` to its own class)."""
    return isinstance(gate, (nn.Sigmoid, TimmSigmoid)) or gate in (torch.sigmoid, F.sigmoid)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out N x H x W x C (a channels_last map with more than one channel)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def bam_cpu_forward(bam: "BAM", x: torch.Tensor) -> torch.Tensor:
    """``bam(x)`` the fast way; check :func:`cpu_fast_path_applies` first."""
    if _takes_training_node(bam, x):
        conv = bam.spatial_attn.body.conv_reduce
        others = [p for name, p in bam.named_parameters() if not name.startswith("spatial_attn.body.conv_reduce.")]
        return BamBlockFunction.apply(x, conv.weight, conv.bias, bam, *others)
    channel_logits = _channel_logits(bam.channel_attn, global_avg_pool(x))
    spatial_logits = _spatial_logits(bam.spatial_attn.body, x)
    return bam_gate(x, channel_logits, spatial_logits, bam.fusion == "product")


def _channel_logits(channel_attn: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """``ChannelAttn``'s MLP on already pooled N x C values, as N x C x 1 x 1 logits."""
    return channel_attn.fc2(channel_attn.act(channel_attn.bn(channel_attn.fc1(pooled))))[:, :, None, None]


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """``x.mean((2, 3))`` as sum / HW: mean's backward runs a full-size division, sum's is a broadcast view."""
    return x.sum((2, 3)) / (x.shape[2] * x.shape[3])


def _spatial_logits(body: nn.Sequential, x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """``body[start:](x)`` with the few-channel convolutions routed around oneDNN's slow kernels."""
    for layer in list(body)[start:]:
        x = few_channel_conv(layer, x) if isinstance(layer, nn.Conv2d) else layer(x)
    return x


# ---- Few-channel convolutions -----------------------------------------------------------------------------------

_SMALL_CONV_MAX_CHANNEL_PAIRS = 4  # direct loops beat oneDNN up to here (4 -> 4 at 7 x 7 is a tie)
_MATMUL_MAX_OUT_CHANNELS = 4  # 1x1 convolutions with at most this many outputs, or on maps of at least
_MATMUL_MIN_PIXELS = 400  # this many pixels, run as a matrix product


def few_channel_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` computed the fast way for the one- to four-channel convolutions of small BAMs.

    With r = 16 a 16- or 32-channel stage (CIFAR ResNets) has ``rd_channels`` of 1 or 2, and oneDNN runs
    convolutions that narrow several times slower than their size warrants. The same sums, computed as:

    * at most four (input, output) channel pairs: direct loops (compiled kernels);
    * 1x1 with one input and one output channel: ``x * w + b``, element-wise;
    * k x k with one input and one output channel: shifted multiply-adds;
    * 1x1 with few outputs: a matrix product (over C in NCHW, over H x W x C channels_last); NCHW on a large
      map too.

    Anything else takes ``conv(x)``.
    """
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.stride != (1, 1):
        return conv(x)
    n, c, h, w = x.shape
    weight, bias = conv.weight, conv.bias
    if NATIVE and c * conv.out_channels <= _SMALL_CONV_MAX_CHANNEL_PAIRS and weight.dtype == x.dtype == torch.float32:
        return _small_conv(conv, x.contiguous())  # a one- or two-channel map: the copy is negligible
    one_by_one = conv.kernel_size == (1, 1) and conv.padding == (0, 0)
    single = c == 1 and conv.out_channels == 1
    narrow = conv.out_channels <= _MATMUL_MAX_OUT_CHANNELS
    if not single and (not one_by_one or not (narrow or (h * w >= _MATMUL_MIN_PIXELS and not _channels_last(x)))):
        return conv(x)  # channels_last, oneDNN's 1x1 kernels beat a GEMM from a handful of outputs on
    if weight.requires_grad and torch.is_grad_enabled():
        weight = KeepGradStrides.apply(weight)  # the rewrites below reshape it: keep its gradient's strides
    if one_by_one and single:
        y = x * weight.view(1, 1, 1, 1)
        return y if bias is None else y + bias.view(1, 1, 1, 1)
    if single:
        return _single_channel_conv(x, weight, bias, conv.padding, conv.dilation)
    if _channels_last(x):  # (N*H*W) x C rows times C x C_out: one GEMM, output channels_last
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        matrix = weight.view(conv.out_channels, c).t()
        y = rows.mm(matrix) if bias is None else torch.addmm(bias, rows, matrix)
        y = y.view(n, h, w, conv.out_channels).permute(0, 3, 1, 2)
        # a map this narrow is cheaper NCHW for what follows (BatchNorm, ReLU, the direct loops): a small copy
        return y.contiguous()
    if not x.is_contiguous():
        return conv(x)
    # bmm against the broadcast weight; torch.matmul would fold x into a transposed copy and save it
    weight = weight.view(1, conv.out_channels, c).expand(n, -1, -1)
    if bias is None:
        y = torch.bmm(weight, x.view(n, c, h * w))
    else:
        y = torch.baddbmm(bias.view(1, -1, 1).expand(n, -1, h * w), weight, x.view(n, c, h * w))
    return y.view(n, conv.out_channels, h, w)


def _single_channel_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         padding: Tuple[int, ...], dilation: Tuple[int, ...]) -> torch.Tensor:
    """A 1 -> 1 channel stride-1 convolution as k*k shifted multiply-adds of the zero-padded map."""
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


class KeepGradStrides(torch.autograd.Function):
    """Identity whose gradient has its input's exact strides.

    Gradients through ``view``/indexing come back contiguous; for a channels_last weight they then differ from
    the parameter's strides in size-1 dimensions, which autograd accepts but DDP's buckets copy and warn about.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.layout = (tensor.shape, tensor.stride())
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        shape, stride = ctx.layout
        return grad if grad.stride() == stride else torch.empty_strided(shape, stride, dtype=grad.dtype).copy_(grad)


class SmallConvFunction(torch.autograd.Function):
    """Autograd for ``torch.ops.bam_zoo.small_conv_*`` (direct loops for convolutions of one to four channels)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: List[int],
                dilation: List[int]) -> torch.Tensor:
        ctx.weight_strides = weight.stride()
        weight = weight.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.geometry = (padding, dilation)
        ctx.has_bias = bias is not None
        return torch.ops.bam_zoo.small_conv_forward(x, weight, bias, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b = torch.ops.bam_zoo.small_conv_backward(
            grad_out.contiguous(), x, weight, *ctx.geometry)
        # The weight's own strides (channels_last after model.to(memory_format=...)), so DDP's buckets take the
        # gradient without a copy.
        grad_w = torch.empty_strided(grad_w.shape, ctx.weight_strides, dtype=grad_w.dtype).copy_(grad_w)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None


def _small_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` through the direct-loop kernels, on a contiguous ``x``."""
    bias = conv.bias.contiguous() if conv.bias is not None else None
    padding, dilation = list(conv.padding), list(conv.dilation)
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return SmallConvFunction.apply(x, conv.weight, bias, padding, dilation)
    return torch.ops.bam_zoo.small_conv_forward(x, conv.weight.contiguous(), bias, padding, dilation)


# ---- The gate -----------------------------------------------------------------------------------------------------

# The kernels compute sigmoid(Mc + Ms) as 1 / (1 + exp(-Mc) exp(-Ms)); within this bound the product is finite.
_NATIVE_MAX_LOGIT = 40.0


def _native_factors(x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor, product: bool
                    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(exp(-Mc), exp(-Ms))`` as N x C and N x HW matrices when the kernels apply, else None.

    They cover the sum fusion of float32 logits of the usual shapes with every logit within the bound (NaN
    fails that test too, so NaNs propagate through the ATen gate exactly as in the definition).
    """
    if not NATIVE or product:
        return None
    n, c, h, w = x.shape
    if not (channel_logits.dtype == spatial_logits.dtype == torch.float32):
        return None
    if channel_logits.shape != (n, c, 1, 1) or spatial_logits.shape != (n, 1, h, w):
        return None
    bound = torch.maximum(channel_logits.detach().abs().amax(), spatial_logits.detach().abs().amax())
    if not bool(bound <= _NATIVE_MAX_LOGIT):
        return None
    with torch.no_grad():
        return (torch.exp(-channel_logits.detach()).reshape(n, c).contiguous(),
                torch.exp(-spatial_logits.detach()).reshape(n, h * w).contiguous())


def _sigmoid_into(out: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor,
                  product: bool) -> torch.Tensor:
    """``out = sigmoid(Mc (+ or *) Ms)``: two passes over ``out``, no other full-size allocation."""
    if product:
        torch.mul(channel_logits, spatial_logits, out=out)
    else:
        torch.add(channel_logits, spatial_logits, out=out)
    return out.sigmoid_()


def _gate_forward(x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor, product: bool,
                  factors: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``x * (1 + sigmoid(logits))``: one pass in the kernel, else three ATen passes into one buffer."""
    if factors is not None:
        return torch.ops.bam_zoo.gate_forward(x, *factors)
    out = _sigmoid_into(torch.empty_like(x), channel_logits, spatial_logits, product)
    return torch.addcmul(x, x, out, out=out)  # x + x * g; element-wise ops may overwrite what they read


def _gate_backward(grad_out: torch.Tensor, x: torch.Tensor, channel_logits: torch.Tensor,
                   spatial_logits: torch.Tensor, product: bool, factors: Optional[Tuple[torch.Tensor, torch.Tensor]]
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for ``(x, Mc, Ms)``, with ``g`` recomputed and ``dz = dy * x * g * (1 - g)``:
    ``dx = dy * (1 + g)``; sum fusion ``dMc = sum_HW dz``, ``dMs = sum_C dz``; product fusion ``dMc = sum_HW dz Ms``,
    ``dMs = sum_C dz Mc``."""
    n, c, h, w = x.shape
    if factors is not None:
        fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
        grad_x, grad_c, grad_s = torch.ops.bam_zoo.gate_backward(
            grad_out.contiguous(memory_format=fmt), x, *factors)
        return grad_x, grad_c.view(n, c, 1, 1), grad_s.view(n, 1, h, w)
    gate = _sigmoid_into(torch.empty_like(x), channel_logits, spatial_logits, product)
    dz = torch.mul(grad_out, x)
    torch.ops.aten.sigmoid_backward.grad_input(dz, gate, grad_input=dz)  # dz *= g * (1 - g), in place
    grad_c = (dz * spatial_logits if product else dz).sum((2, 3), keepdim=True)
    grad_s = (dz * channel_logits if product else dz).sum(1, keepdim=True)
    del dz  # freed before dx is written: never more than two full-size buffers
    grad_x = torch.addcmul(grad_out, grad_out, gate, out=gate)  # dy * (1 + g), over the gate buffer
    return grad_x, grad_c, grad_s


class BamGateFunction(torch.autograd.Function):
    """The gate, saving ``x`` and the small logit maps (or their exp factors) instead of full-size tensors."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor,
                product: bool) -> torch.Tensor:
        factors = _native_factors(x, channel_logits, spatial_logits, product)
        ctx.product, ctx.native = product, factors is not None
        ctx.save_for_backward(x, *(factors or (channel_logits, spatial_logits)))
        return _gate_forward(x, channel_logits, spatial_logits, product, factors)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, first, second = ctx.saved_tensors
        factors = (first, second) if ctx.native else None
        return (*_gate_backward(grad_out, x, first, second, ctx.product, factors), None)


def bam_gate(x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor,
             product: bool = False) -> torch.Tensor:
    """``x * (1 + sigmoid(Mc (+ or *) Ms))`` for an N x C x H x W float32 ``x`` and logits N x C x 1 x 1,
    N x 1 x H x W, without autograd bookkeeping when nothing needs a gradient."""
    if torch.is_grad_enabled() and (x.requires_grad or channel_logits.requires_grad or spatial_logits.requires_grad):
        return BamGateFunction.apply(x, channel_logits, spatial_logits, product)
    factors = _native_factors(x, channel_logits, spatial_logits, product)
    return _gate_forward(x, channel_logits, spatial_logits, product, factors)


# ---- A training step as one autograd node ------------------------------------------------------------------------

_NODE_MIN_PIXELS = 400  # on smaller maps the node's fixed costs outweigh the passes it saves, ...
_NARROW_NODE_MIN_PIXELS = 1  # ... unless its spatial branch is narrow enough for SpatialChain, which saves more


def _is_narrow(rd_channels: int) -> bool:
    """Whether a spatial branch of this width runs on the direct-loop kernels (``rd_channels`` 1 or 2): then
    :class:`SpatialChain` and the pool-reduce kernels apply, and the node pays off on any map size."""
    return rd_channels * rd_channels <= _SMALL_CONV_MAX_CHANNEL_PAIRS


def _takes_training_node(bam: "BAM", x: torch.Tensor) -> bool:
    """Training with the kernels, the sum fusion, a large map or a narrow spatial branch, and a plain 1x1 reduce
    convolution."""
    if not (NATIVE and torch.is_grad_enabled() and bam.fusion == "sum"):
        return False
    conv = bam.spatial_attn.body.conv_reduce
    if not isinstance(conv, nn.Conv2d) or conv.weight.dtype != torch.float32 or conv.groups != 1:
        return False
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0):
        return False
    min_pixels = _NARROW_NODE_MIN_PIXELS if _is_narrow(conv.out_channels) else _NODE_MIN_PIXELS
    if x.shape[2] * x.shape[3] < min_pixels:
        return False
    return x.requires_grad or any(p.requires_grad for p in bam.parameters())


class SpatialChain:
    """The spatial branch after its reduction, run by the compiled kernels (``spatial_body_*``) in training.

    It applies to the definition's chain on one- or two-channel maps (the CIFAR ResNets' BAMs): BatchNorm with
    batch statistics + ReLU, size-preserving dilated convolutions without bias, a 1x1 convolution to one map. As
    modules that chain is ~15 small ATen calls and autograd nodes each way, and ATen's BatchNorm reduces one channel
    on one thread; the kernels make two or three passes per layer, parallel over samples. The running statistics
    and ``num_batches_tracked`` are updated as the modules would.
    """

    def __init__(self, bns: List[nn.BatchNorm2d], convs: List[nn.Conv2d], final: nn.Conv2d):
        self.bns, self.convs, self.final = bns, convs, final
        self.saved: Tuple = ()

    @classmethod
    def of(cls, body: nn.Sequential, reduced: torch.Tensor) -> Optional["SpatialChain"]:
        """The chain of ``body`` (after ``conv_reduce``) when the kernels compute it exactly, else None."""
        layers = list(body)[1:]
        n, rd, h, w = reduced.shape
        if not NATIVE or not _is_narrow(rd) or n * h * w < 2 or len(layers) % 3 != 0:
            return None
        bns, acts, convs, final = layers[0::3], layers[1::3], layers[2::3][:-1], layers[-1]
        if not all(_is_training_batch_norm(bn, rd) for bn in bns) or not all(type(a) is nn.ReLU for a in acts):
            return None
        if not all(_is_same_size_conv(c, rd, rd) and c.bias is None for c in convs):
            return None
        if len({(c.padding, c.dilation) for c in convs}) > 1:
            return None
        if not (_is_same_size_conv(final, rd, 1) and final.kernel_size == (1, 1)):
            return None
        return cls(bns, convs, final)

    def forward(self, reduced: torch.Tensor) -> torch.Tensor:
        """The spatial logits (N x 1 x H x W) from the N x rd x H x W reduction; keeps what backward needs."""
        bns, convs = self.bns, self.convs
        geometry = (list(convs[0].padding), list(convs[0].dilation)) if convs else ([0, 0], [1, 1])
        with torch.no_grad():
            logits, pres, acts, stats = torch.ops.bam_zoo.spatial_body_forward(
                reduced, [bn.weight for bn in bns], [bn.bias for bn in bns], [bn.running_mean for bn in bns],
                [bn.running_var for bn in bns], [_bn_momentum(bn) for bn in bns], [bn.eps for bn in bns],
                [c.weight.contiguous() for c in convs], self.final.weight.contiguous(), self.final.bias, *geometry)
            for bn in bns:
                bn.num_batches_tracked.add_(1)
        self.saved = (reduced, pres, acts, stats, geometry)
        return logits

    def backward(self, grad_logits: torch.Tensor) -> Tuple[torch.Tensor, dict]:
        """``(d reduced, {id(parameter): gradient})`` for the chain's parameters, in their own strides."""
        (reduced, pres, acts, stats, geometry), self.saved = self.saved, ()
        bns, convs, final = self.bns, self.convs, self.final
        grad_reduced, grad_bn_w, grad_bn_b, grad_convs, grad_final_w, grad_final_b = \
            torch.ops.bam_zoo.spatial_body_backward(
                grad_logits, reduced, pres, acts, stats, [bn.weight for bn in bns],
                [c.weight.contiguous() for c in convs], final.weight.contiguous(), *geometry)
        pairs = [(bn.weight, g) for bn, g in zip(bns, grad_bn_w)] + [(bn.bias, g) for bn, g in zip(bns, grad_bn_b)]
        pairs += [(c.weight, g) for c, g in zip(convs, grad_convs)] + [(final.weight, grad_final_w)]
        if final.bias is not None:
            pairs.append((final.bias, grad_final_b))
        return grad_reduced, {id(p): _in_strides_of(p, g.view(p.shape)) for p, g in pairs}


def _is_training_batch_norm(bn: nn.Module, channels: int) -> bool:
    """A BatchNorm2d that normalises with batch statistics and updates its running ones (what the kernels do)."""
    return (isinstance(bn, nn.BatchNorm2d) and bn.training and bn.affine and bn.track_running_stats
            and bn.running_mean is not None and bn.num_batches_tracked is not None and bn.num_features == channels
            and bn.weight.dtype == torch.float32 and _bn_momentum(bn) is not None)


def _bn_momentum(bn: nn.BatchNorm2d) -> Optional[float]:
    """The momentum of the running statistics: the definition's BatchNorm takes 0.1 for None; plain BatchNorm2d
    then keeps a cumulative average, which the kernels do not (None)."""
    if bn.momentum is None:
        return 0.1 if hasattr(bn, "_single_sample_safe") else None
    return bn.momentum


def _is_same_size_conv(conv: nn.Module, in_channels: int, out_channels: int) -> bool:
    """A float32 stride-1, zero-padded, ungrouped convolution whose output has its input's size."""
    if not isinstance(conv, nn.Conv2d) or conv.weight.dtype != torch.float32:
        return False
    if (conv.in_channels, conv.out_channels, conv.groups, conv.stride) != (in_channels, out_channels, 1, (1, 1)):
        return False
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    return all(k % 2 == 1 and p == d * (k - 1) // 2
               for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation))


def _in_strides_of(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` laid out like ``param`` (channels_last weights), so DDP's buckets take it without a copy."""
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)


class BamBlockFunction(torch.autograd.Function):
    """A BAM training step (sum fusion, sigmoid gate) as one node.

    Inputs: ``x``, the reduce convolution's weight and bias, the module, then every other parameter, so
    ``autograd.grad``, DDP and gradient hooks see them all. The forward pools and reduces ``x`` outside autograd
    and records the two small branches on their own; the backward runs the gate's kernel, differentiates the
    branches with ``autograd.grad``, and adds the pool's and the reduction's input gradients into ``dx`` in place
    with batched matrix products: ``dx += W^T dred + dpool / HW`` (rows are channels in NCHW, pixels channels_last).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, reduce_weight: torch.Tensor, reduce_bias: Optional[torch.Tensor],
                bam: "BAM", *branch_params: torch.Tensor) -> torch.Tensor:
        saved_x, x = x, x.detach()
        body = bam.spatial_attn.body
        conv = body.conv_reduce
        # A narrow reduction of a channels_last map: the pool and the reduction in one pass over x (and their input
        # gradients and the weight's in one pass over dx and x), instead of a sum and a GEMM (and three passes).
        ctx.pool_reduce = _is_narrow(conv.out_channels) and _channels_last(x)
        if ctx.pool_reduce:
            pooled, reduced = torch.ops.bam_zoo.pool_reduce(x, conv.weight.reshape(conv.out_channels, -1).contiguous(),
                                                            conv.bias)
            pooled.requires_grad_()
        else:
            pooled = global_avg_pool(x).requires_grad_()
            reduced = few_channel_conv(conv, x)
        chain = SpatialChain.of(body, reduced)
        with torch.enable_grad():
            channel_logits = _channel_logits(bam.channel_attn, pooled)
            if chain is not None:  # the kernels, no graph: their backward gives the gradients
                spatial_logits = chain.forward(reduced.contiguous())
            else:
                reduced.requires_grad_()
                first = next((m for m in list(body)[1:] if not isinstance(m, nn.Identity)), None)
                # an in-place first layer (bn_reduce folded away) must not write over the leaf
                spatial_logits = _spatial_logits(
                    body, reduced.clone() if getattr(first, "inplace", False) else reduced, start=1)
        ctx.chain = chain
        factors = _native_factors(x, channel_logits, spatial_logits, False)
        ctx.native = factors is not None
        if not ctx.native:  # saturated logits: the ATen gate (same function); the backward then takes the logits
            factors = (channel_logits.detach(), spatial_logits.detach())
        ctx.save_for_backward(saved_x, reduce_weight, *factors)
        ctx.graph = (pooled, reduced, channel_logits, spatial_logits, branch_params)
        ctx.has_bias = reduce_bias is not None
        return _gate_forward(x, *factors, False, factors if ctx.native else None)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "BAM's fused CPU training node computes first derivatives only, and this backward asked for a "
                "graph (create_graph=True, e.g. a gradient penalty). Call "
                "bam_zoo.layers.disable_cpu_fast_path(model) first to run BAM's plain, twice-differentiable "
                "definition.")
        x, reduce_weight, first, second = ctx.saved_tensors
        pooled, reduced, channel_logits, spatial_logits, branch_params = ctx.graph
        del ctx.graph  # the branch graphs are freed with this call, as autograd frees saved tensors
        grad_x, grad_c, grad_s = _gate_backward(grad_out, x, first, second, False,
                                                (first, second) if ctx.native else None)
        chain, ctx.chain = ctx.chain, None
        if chain is not None:
            grad_reduced, chain_grads = chain.backward(grad_s)
            trainable = [p for p in branch_params if p.requires_grad and id(p) not in chain_grads]
            grads = torch.autograd.grad(channel_logits, [pooled] + trainable, grad_c.view_as(channel_logits),
                                        allow_unused=True)
            grad_pooled, trainable_grads = grads[0], {id(p): g for p, g in zip(trainable, grads[1:])}
            trainable_grads.update(chain_grads)
        else:
            trainable = [p for p in branch_params if p.requires_grad]
            grads = torch.autograd.grad((channel_logits, spatial_logits), [pooled, reduced] + trainable,
                                        (grad_c.view_as(channel_logits), grad_s.view_as(spatial_logits)),
                                        allow_unused=True)
            grad_pooled, grad_reduced = grads[0], grads[1]
            trainable_grads = {id(p): g for p, g in zip(trainable, grads[2:])}
        grad_params = [trainable_grads[id(p)] if p.requires_grad else None for p in branch_params]
        n, c, h, w = x.shape
        rd = reduce_weight.shape[0]
        weight = reduce_weight.reshape(rd, c)
        grad_pooled = grad_pooled / (h * w)
        if ctx.pool_reduce:
            grad_reduced = grad_reduced.contiguous()
            grad_weight = torch.ops.bam_zoo.pool_reduce_backward_(grad_x, x, grad_reduced, weight.contiguous(),
                                                                  grad_pooled.contiguous())
        elif _channels_last(x):  # dX (N x HW x C) += [dred | 1] (N x HW x (rd + 1)) @ [W ; dpool / HW] ((rd + 1) x C)
            rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
            grad_rows = grad_reduced.permute(0, 2, 3, 1).reshape(n, h * w, rd)
            lhs = torch.cat([grad_rows, grad_rows.new_ones(n, h * w, 1)], dim=2)
            rhs = torch.cat([weight.expand(n, -1, -1), grad_pooled.unsqueeze(1)], dim=1)
            grad_x.permute(0, 2, 3, 1).view(n, h * w, c).baddbmm_(lhs, rhs)
            grad_weight = grad_rows.reshape(n * h * w, rd).t().mm(rows.reshape(n * h * w, c))
        else:  # rows are channels: dX (N x C x HW) += [W^T | dpool / HW] @ [dred ; 1]
            grad_rows = grad_reduced.reshape(n, rd, h * w)
            weight_t = weight.t().expand(n, -1, -1)  # a view, no copy
            lhs = torch.cat([weight_t, grad_pooled.unsqueeze(2)], dim=2)
            rhs = torch.cat([grad_rows, grad_rows.new_ones(n, 1, h * w)], dim=1)
            grad_x.view(n, c, h * w).baddbmm_(lhs, rhs)
            grad_weight = torch.bmm(grad_rows, x.view(n, c, h * w).transpose(1, 2)).sum(0)
        grad_weight = _in_strides_of(reduce_weight, grad_weight.view(reduce_weight.shape))
        grad_bias = grad_reduced.sum((0, 2, 3)) if ctx.has_bias else None
        return (grad_x, grad_weight, grad_bias, None, *grad_params)
