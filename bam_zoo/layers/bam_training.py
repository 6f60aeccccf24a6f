"""BAM's training step as one autograd node, so its full-size work is a handful of passes over memory.

Run module by module, a BAM training step allocates three full-size N x C x H x W buffers (the output, the
gate's input gradient, the reduce convolution's input gradient) and autograd then adds the three input
gradients (gate, average pool, reduce convolution) with two more full-size passes. On a 2-core CPU these
passes and the page faults of fresh buffers, not the FLOPs, are most of BAM's cost.

:class:`BamBlockFunction` takes the whole block instead:

* forward: pool and reduce ``x`` (a sum and a batched matmul), run the two small branches with autograd
  recording them on their own, then the one-pass native gate;
* backward: the native gate backward writes ``dx`` into one fresh buffer; the small branch graphs are
  differentiated with ``torch.autograd.grad``; and the pool's and reduce convolution's gradients are added
  into ``dx`` in place by one batched matmul (``dx += [W^T | dpool / HW] @ [dred ; 1]``).

Every parameter of the block is an input of the node, so ``torch.autograd.grad``, DDP (with or without
``find_unused_parameters``) and gradient hooks see them as usual. The node gives first derivatives only: a
backward with ``create_graph=True`` raises and names the fix (:func:`bam_zoo.layers.gate.reference_kernels`).
:func:`fused_training_applies` sends eager training of float32 contiguous maps here and everything else
through the modules.
"""
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from . import native
from .gate import _aten_gate_backward, _aten_gate_forward, _native_factors, use_reference_gate

if TYPE_CHECKING:
    from .bam import BAM

__all__ = ["BamBlockFunction", "fused_training_applies", "bam_training_forward"]


def _has_hooks(*modules: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for mod in modules
               for m in mod.modules())


# Measured per block (forward+backward, 2 threads, node / modules, interleaved medians of 25 rounds, with the
# gate's buffer cache): 0.94 at 256 x 16 x 28 x 28 and 0.97 at 16 x 256 x 28 x 28, but 1.02 at 16 x 512 x 14 x 14
# and 1.05 at 16 x 1024 x 7 x 7, where the passes it saves are small and its fixed costs (a nested autograd
# call) are not. So: large maps only.
_NODE_MIN_PIXELS = 400


def fused_training_applies(bam: "BAM", x: torch.Tensor) -> bool:
    """Whether ``bam(x)`` may run as :class:`BamBlockFunction`.

    It needs the compiled kernels, gradients to compute, the paper's sum fusion with a sigmoid gate, a
    contiguous float32 CPU map of at least ``_NODE_MIN_PIXELS`` pixels (where it pays), no autocast, eager
    mode, and no hooks on the branches (the node calls their layers directly).
    """
    if not (native.NATIVE and torch.is_grad_enabled() and bam.fused_sigmoid and bam.fusion == "sum"):
        return False
    if bam.store_attention or x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if not x.is_contiguous() or torch.is_autocast_enabled("cpu"):
        return False
    if x.shape[2] * x.shape[3] < _NODE_MIN_PIXELS:
        return False
    conv = bam.spatial_attn.body.conv_reduce
    if not isinstance(conv, torch.nn.Conv2d) or conv.weight.dtype != torch.float32:
        return False
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.groups != 1:
        return False
    if not (x.requires_grad or any(p.requires_grad for p in bam.parameters())):
        return False
    if use_reference_gate() or _has_hooks(bam.channel_attn, bam.spatial_attn):
        return False
    return True


def bam_training_forward(bam: "BAM", x: torch.Tensor) -> torch.Tensor:
    """``bam(x)`` through :class:`BamBlockFunction` (check :func:`fused_training_applies` first)."""
    conv = bam.spatial_attn.body.conv_reduce
    branch_params = [p for name, p in bam.named_parameters() if not name.startswith("spatial_attn.body.conv_reduce.")]
    return BamBlockFunction.apply(x, conv.weight, conv.bias, bam, *branch_params)


class BamBlockFunction(torch.autograd.Function):
    """``BAM(x)`` (sum fusion, sigmoid gate) as one node: inputs ``x``, the reduce conv's weight and bias,
    the module (not a tensor), then every other parameter of the block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, reduce_weight: torch.Tensor, reduce_bias: Optional[torch.Tensor],
                bam: "BAM", *branch_params: torch.Tensor) -> torch.Tensor:
        from .bam import _few_channel_conv, global_avg_pool  # bam.py imports this module

        saved_x, x = x, x.detach()
        # Pool and reduce outside autograd (grad mode is off here), through the same kernels the modules use;
        # the branches below start from these two as leaves.
        pooled = global_avg_pool(x)
        reduced = _few_channel_conv(bam.spatial_attn.body.conv_reduce, x)
        pooled.requires_grad_()
        reduced.requires_grad_()
        with torch.enable_grad():
            channel_logits = bam.channel_attn.forward_pooled(pooled)
            spatial_logits = bam.spatial_attn.forward_reduced(reduced)
        factors = _native_factors(x, channel_logits, spatial_logits, False)
        ctx.native = factors is not None
        if ctx.native:
            out = torch.ops.bam_zoo.gate_forward(x, *factors)
        else:  # saturated logits: the ATen gate (same function); the backward then takes the logits
            factors = (channel_logits.detach(), spatial_logits.detach())
            out = _aten_gate_forward(x, *factors, False)
        ctx.save_for_backward(saved_x, reduce_weight, *factors)
        ctx.graph = (pooled, reduced, channel_logits, spatial_logits, branch_params)
        ctx.has_bias = reduce_bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "BAM's fused training node computes first derivatives only, and this backward asked for a graph "
                "(create_graph=True, e.g. a gradient penalty). Run that step inside "
                "`with bam_zoo.layers.gate.reference_kernels():` to use BAM's plain, twice-differentiable ops.")
        x, reduce_weight, factor_c, factor_s = ctx.saved_tensors
        pooled, reduced, channel_logits, spatial_logits, branch_params = ctx.graph
        del ctx.graph  # the branch graphs are freed with this call, as autograd frees saved tensors
        n, c, h, w = x.shape
        rd = reduce_weight.shape[0]
        if ctx.native:
            grad_x, grad_c, grad_s = torch.ops.bam_zoo.gate_backward(grad_out.contiguous(), x, factor_c, factor_s)
        else:
            grad_x, grad_c, grad_s = _aten_gate_backward(grad_out, x, factor_c, factor_s, False, (True, True, True))
        trainable = [p for p in branch_params if p.requires_grad]
        grads = torch.autograd.grad(
            (channel_logits, spatial_logits), [pooled, reduced] + trainable,
            (grad_c.view_as(channel_logits), grad_s.view_as(spatial_logits)), allow_unused=True)
        grad_pooled, grad_reduced = grads[0], grads[1]
        trainable_grads = iter(grads[2:])
        grad_params: List[Optional[torch.Tensor]] = [next(trainable_grads) if p.requires_grad else None
                                                     for p in branch_params]
        grad_reduced = grad_reduced.reshape(n, rd, h * w)
        weight_t = reduce_weight.reshape(1, rd, c).transpose(1, 2).expand(n, -1, -1)  # a view, no copy
        grad_pooled = (grad_pooled / (h * w)).unsqueeze(2)
        if (rd + 1) * 8 <= h * w:
            # dx += [W^T | dpool/HW] @ [dred ; 1]: one in-place pass; the concatenated W^T (N x C x (rd+1))
            # is small next to the map
            lhs = torch.cat([weight_t, grad_pooled], dim=2)
            rhs = torch.cat([grad_reduced, grad_reduced.new_ones(n, 1, h * w)], dim=1)
            grad_x.view(n, c, h * w).baddbmm_(lhs, rhs)
        else:  # small maps: copying W^T per sample would cost more than a second pass for the pool term
            grad_x.view(n, c, h * w).baddbmm_(weight_t, grad_reduced).add_(grad_pooled)
        grad_weight = torch.bmm(grad_reduced, x.view(n, c, h * w).transpose(1, 2)).sum(0).view_as(reduce_weight)
        grad_bias = grad_reduced.sum((0, 2)) if ctx.has_bias else None
        return (grad_x, grad_weight, grad_bias, None, *grad_params)
