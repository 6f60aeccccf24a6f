"""BAM's element-wise gate ``y = x * (1 + sigmoid(Mc (+ or *) Ms))``, the part of BAM that runs at full size.

Kept apart from the module so an optimised kernel can replace it without touching the block's structure.

Why a hand-written gate: written out (:func:`bam_gate_reference`), autograd materialises four full-size
N x C x H x W tensors in the forward (``Mc + Ms``, the sigmoid, ``1 + sigmoid``, the product) and keeps two of
them alive until the backward. :func:`bam_gate` instead

* writes every full-size intermediate into the one fresh output buffer (broadcast add or multiply with
  ``out=``, in-place sigmoid, then ``torch.addcmul(x, x, gate, out=gate)`` = ``x + x * gate``): three passes
  and one allocation instead of four and four;
* saves only ``x`` (which the caller keeps alive anyway) and the two small logit maps for the backward, and
  recomputes the sigmoid there, so BAM's gate adds one full-size tensor (its output) to the training
  memory instead of three;
* skips autograd entirely when no gradient is needed (inference).

With the compiled kernels of ``bam_zoo._native`` (built at install, see ``setup.py``), the sum-fusion gate on
contiguous float32 maps runs as one pass forward and one pass backward (:func:`bam_zoo.layers.native.native_kernels_available`); any
other case, or an install without them, takes the ATen path above. ``BAM_ZOO_NATIVE_GATE=0`` turns them off.

Traced, scripted, compiled and exported graphs get the reference definition instead (a custom
``autograd.Function`` with ``out=`` writes is opaque to them, and compilers fuse the reference on their own).
Both paths compute the same function; the tests hold them to ``allclose`` and ``gradcheck``.
"""
import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from . import native

__all__ = [
    "bam_gate", "bam_gate_reference", "BamGateFunction", "reference_kernels", "use_reference_gate",
]

# The native kernels compute sigmoid(Mc + Ms) as 1 / (1 + exp(-Mc) * exp(-Ms)); with both logits within this
# bound the product stays finite in float32. Larger logits (a saturated gate) take the ATen path.
_NATIVE_MAX_LOGIT = 40.0


def _native_factors(
        x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor, product: bool
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(exp(-Mc), exp(-Ms))`` as N x C and N x HW matrices when the native kernels apply, else None.

    They apply to the sum fusion of float32 CPU tensors with ``x`` contiguous (N x C x H x W), logits of the
    usual N x C x 1 x 1 and N x 1 x H x W shapes, and every logit within +-``_NATIVE_MAX_LOGIT`` (NaN fails
    that test too, so NaNs propagate through the ATen path exactly as in the reference).
    """
    if not native.NATIVE or product or x.dim() != 4 or x.device.type != "cpu":
        return None
    n, c, h, w = x.shape
    if not (x.dtype == channel_logits.dtype == spatial_logits.dtype == torch.float32):
        return None
    if channel_logits.shape != (n, c, 1, 1) or spatial_logits.shape != (n, 1, h, w) or not x.is_contiguous():
        return None
    bound = torch.maximum(channel_logits.detach().abs().amax(), spatial_logits.detach().abs().amax())
    if not bool(bound <= _NATIVE_MAX_LOGIT):
        return None
    with torch.no_grad():
        return (torch.exp(-channel_logits.detach()).reshape(n, c).contiguous(),
                torch.exp(-spatial_logits.detach()).reshape(n, h * w).contiguous())


def bam_gate_reference(
        x: torch.Tensor,
        channel_logits: torch.Tensor,
        spatial_logits: torch.Tensor,
        product: bool = False,
) -> torch.Tensor:
    """Straightforward unfused gate: the definition every faster path must match.

    Args:
        x: Input feature map, N x C x H x W.
        channel_logits: Channel branch output, N x C x 1 x 1.
        spatial_logits: Spatial branch output, N x 1 x H x W.
        product: Multiply the branches (official code) instead of summing them (paper).
    """
    logits = channel_logits * spatial_logits if product else channel_logits + spatial_logits
    return x * (1 + torch.sigmoid(logits))


def _gate_buffer(x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor) -> torch.Tensor:
    """A fresh, uninitialised tensor of the broadcast output shape and promoted dtype, in ``x``'s layout."""
    shape = torch.broadcast_shapes(x.shape, channel_logits.shape, spatial_logits.shape)
    dtype = torch.promote_types(x.dtype, torch.promote_types(channel_logits.dtype, spatial_logits.dtype))
    if shape == x.shape:
        return torch.empty_like(x, dtype=dtype)  # keeps channels_last (or any dense layout) of x
    return torch.empty(shape, dtype=dtype, device=x.device)


def _sigmoid_into(
        out: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor, product: bool) -> torch.Tensor:
    """``out = sigmoid(Mc (+ or *) Ms)`` in two passes over ``out`` and no other full-size allocation.

    The logits are combined in their own promoted dtype (as the reference does) before being written to ``out``.
    """
    logit_dtype = torch.promote_types(channel_logits.dtype, spatial_logits.dtype)
    logit_shape = torch.broadcast_shapes(channel_logits.shape, spatial_logits.shape)
    if logit_dtype == out.dtype and logit_shape == out.shape:
        if product:
            torch.mul(channel_logits, spatial_logits, out=out)
        else:
            torch.add(channel_logits, spatial_logits, out=out)
    else:  # bf16 logits on an fp32 map, or logits smaller than x: combine as the reference does, then broadcast
        out.copy_(channel_logits * spatial_logits if product else channel_logits + spatial_logits)
    return out.sigmoid_()


def _gate_forward(
        x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor, product: bool) -> torch.Tensor:
    """``x * (1 + sigmoid(logits))``: one pass in the native kernel, else :func:`_aten_gate_forward`."""
    factors = _native_factors(x, channel_logits, spatial_logits, product)
    if factors is not None:
        return torch.ops.bam_zoo.gate_forward(x, *factors)
    return _aten_gate_forward(x, channel_logits, spatial_logits, product)


def _aten_gate_forward(
        x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor, product: bool) -> torch.Tensor:
    """The gate with ATen ops, written into one fresh buffer: three full-size passes, one allocation."""
    out = _sigmoid_into(_gate_buffer(x, channel_logits, spatial_logits), channel_logits, spatial_logits, product)
    # out = x + x * sigmoid; element-wise ops may write over an input they read at the same index.
    return torch.addcmul(x, x, out, out=out)


def _aten_gate_backward(
        grad_out: torch.Tensor, x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor,
        product: bool, needs_grad: Tuple[bool, ...],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of the gate for ``(x, channel_logits, spatial_logits)`` with ATen ops (see BamGateFunction)."""
    need_x, need_c, need_s = needs_grad
    gate = _sigmoid_into(_gate_buffer(x, channel_logits, spatial_logits), channel_logits, spatial_logits, product)
    grad_x = grad_c = grad_s = None
    if need_c or need_s:
        # dz = (dy * x) * g * (1 - g): one product pass, then aten's fused sigmoid_backward in place
        dz = torch.mul(grad_out, x)
        torch.ops.aten.sigmoid_backward.grad_input(dz, gate, grad_input=dz)
        if need_c:
            grad_c = (dz * spatial_logits if product else dz).sum_to_size(channel_logits.shape)
            grad_c = grad_c.to(channel_logits.dtype)
        if need_s:
            grad_s = (dz * channel_logits if product else dz).sum_to_size(spatial_logits.shape)
            grad_s = grad_s.to(spatial_logits.dtype)
        del dz  # freed before dx is written, so the backward never holds more than two full-size buffers
    if need_x:
        grad_x = torch.addcmul(grad_out, grad_out, gate, out=gate)  # dy * (1 + g), over the gate buffer
        if grad_x.shape != x.shape:
            grad_x = grad_x.sum_to_size(x.shape)
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_c, grad_s


class BamGateFunction(torch.autograd.Function):
    """Autograd for the fused gate, saving only ``x`` and the small logit maps.

    Backward, with ``g = sigmoid(z)`` recomputed from the logits and ``dz = dy * x * g * (1 - g)``:

    * ``dx = dy * (1 + g)``
    * sum fusion (``z = Mc + Ms``): ``dMc = sum_HW dz``, ``dMs = sum_C dz``
    * product fusion (``z = Mc * Ms``): ``dMc = sum_HW dz * Ms``, ``dMs = sum_C dz * Mc``

    Two full-size buffers are allocated in the backward (``dz``, and the recomputed gate, later overwritten by
    ``dx``); the reference allocates four.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor,
                product: bool) -> torch.Tensor:
        ctx.product = product
        factors = _native_factors(x, channel_logits, spatial_logits, product)
        if factors is not None:  # one pass each way; the small exp(-logit) factors are kept for the backward
            ctx.save_for_backward(x, *factors)
            ctx.native = True
            return torch.ops.bam_zoo.gate_forward(x, *factors)
        ctx.save_for_backward(x, channel_logits, spatial_logits)
        ctx.native = False
        return _aten_gate_forward(x, channel_logits, spatial_logits, product)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        if ctx.native:
            x, channel_factor, spatial_factor = ctx.saved_tensors
            grad_x, grad_c, grad_s = torch.ops.bam_zoo.gate_backward(
                grad_out.contiguous(), x, channel_factor, spatial_factor)
            n, c, h, w = x.shape
            return grad_x, grad_c.view(n, c, 1, 1), grad_s.view(n, 1, h, w), None
        x, channel_logits, spatial_logits = ctx.saved_tensors
        grads = _aten_gate_backward(grad_out, x, channel_logits, spatial_logits, ctx.product,
                                    ctx.needs_input_grad[:3])
        return (*grads, None)


_FORCE_REFERENCE = False


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run BAM with its plain definitions (standard convolutions, unfused gate) inside this block.

    For tools that read the operator stream rather than the numbers, e.g. ``bam_zoo.count_macs``: the fast
    eager paths compute the same function with fewer or different operators.
    """
    global _FORCE_REFERENCE
    previous, _FORCE_REFERENCE = _FORCE_REFERENCE, True
    try:
        yield
    finally:
        _FORCE_REFERENCE = previous


def use_reference_gate() -> bool:
    """Whether the caller is being traced, scripted, compiled or exported, where the plain definition is needed.

    TorchScript, ``torch.jit.trace``, FX, dynamo (``torch.compile`` / strict ``torch.export``), non-strict
    export and ONNX export cannot see inside a custom ``autograd.Function`` that writes with ``out=``, or
    record it as one opaque node; the reference is a handful of standard ops they all know (and compilers
    fuse it into one kernel anyway).
    """
    if _FORCE_REFERENCE or torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    return is_fx_symbolic_tracing()


@torch.jit.unused
def _bam_gate_fused(
        x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor, product: bool) -> torch.Tensor:
    """Eager fast path: no autograd bookkeeping when nothing needs a gradient, else :class:`BamGateFunction`.
    """
    if torch.is_grad_enabled() and (
            x.requires_grad or channel_logits.requires_grad or spatial_logits.requires_grad):
        return BamGateFunction.apply(x, channel_logits, spatial_logits, product)
    return _gate_forward(x, channel_logits, spatial_logits, product)


def bam_gate(
        x: torch.Tensor,
        channel_logits: torch.Tensor,
        spatial_logits: torch.Tensor,
        product: bool = False,
) -> torch.Tensor:
    """BAM gate used by :class:`bam_zoo.layers.BAM`: the fused path in eager mode, the reference elsewhere.

    Same arguments and result as :func:`bam_gate_reference` (any broadcastable shapes and dtypes).
    """
    if torch.jit.is_scripting():
        return bam_gate_reference(x, channel_logits, spatial_logits, product)
    if use_reference_gate():
        return bam_gate_reference(x, channel_logits, spatial_logits, product)
    return _bam_gate_fused(x, channel_logits, spatial_logits, product)
