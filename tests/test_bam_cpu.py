"""BAM's CPU speed layer (layers/bam_cpu.py) computes what the definition (layers/bam.py) computes.

Every block check runs the same step twice: through the fast path in float32 (asserting it ran), and through a
float64 deep copy, which the fast path never takes, so it runs the plain definition. Then it compares the output,
the input gradient, every parameter gradient and every BatchNorm buffer, in both memory formats, with every
component of the speed layer on and with each switched off in turn. Tests of the compiled kernels skip where they
are not built (``BAM_ZOO_NATIVE_GATE=0``, no compiler); everything else passes either way. That traced, exported
and compiled graphs run the same op, with the same numbers, is tests/test_fx.py's.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bam_zoo
import bam_zoo.layers.bam as bam_def
from _helpers import randomise_bn
from bam_zoo import fuse_for_inference
from bam_zoo.layers import BAM, bam_cpu
from bam_zoo.layers.bam_cpu import (
    COMPONENTS, component_enabled, components_off, cpu_fast_path_applies, disable_cpu_fast_path, few_channel_conv,
    native_kernels_available)

needs_native = pytest.mark.skipif(not native_kernels_available(), reason="bam_zoo._native not built")

FORMATS = [torch.contiguous_format, torch.channels_last]
FORMAT_IDS = ["nchw", "channels_last"]
NODE = "BamFunctionBackward"


def _assert_close(got, want, tol, name="", floor=1.0):
    """``got`` (float32) against ``want`` (float64) within ``tol`` relative to max(|want|, ``floor``): float32
    rounding scales with the values' size. ``floor`` is the block's largest gradient for gradients that are exactly
    0 in theory (fc1.bias before BatchNorm): their float32 rounding scales with the terms that cancel."""
    assert got.shape == want.shape, name
    scale = max(want.detach().abs().max().item(), floor) if want.numel() else floor
    torch.testing.assert_close(got.detach().double(), want.detach().double(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{name}: {m}")


def _gate_reference(x, channel_logits, spatial_logits, product=False, gamma=None):
    """The definition's gate, written out."""
    logits = channel_logits * spatial_logits if product else channel_logits + spatial_logits
    if gamma is not None:
        return x + gamma[:, None, None] * (x * torch.sigmoid(logits))
    return x * (1 + torch.sigmoid(logits))


class _Gate(torch.autograd.Function):
    """The speed layer's gate on its own: the kernels where they apply, else its ATen formulas."""

    @staticmethod
    def forward(ctx, x, channel_logits, spatial_logits, gamma, product):
        factors = bam_cpu._native_factors(x, channel_logits, spatial_logits, product, gamma)
        ctx.save_for_backward(x, channel_logits, spatial_logits, gamma)
        ctx.product = product
        return bam_cpu._gate_forward(x, channel_logits, spatial_logits, product, factors, gamma)

    @staticmethod
    def backward(ctx, grad_y):
        x, c, s, gamma = ctx.saved_tensors
        factors = bam_cpu._native_factors(x, c, s, ctx.product, gamma)
        grad_x, grad_c, grad_s, grad_gamma = bam_cpu._gate_backward(grad_y, x, c, s, ctx.product, factors, gamma)
        return grad_x, grad_c, grad_s, grad_gamma, None


def _gate(x, c, s, product=False, gamma=None):
    return _Gate.apply(x, c, s, gamma, product)


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the fast path's runs (BAM.forward calls bam.py's binding of ``bam_cpu_forward``)."""
    calls = []

    def spy(bam, x):
        calls.append(bam)
        return bam_cpu.bam_cpu_forward(bam, x)

    monkeypatch.setattr(bam_def, "bam_cpu_forward", spy)
    return calls


def _spy(fn, calls):
    def wrapper(*args):
        result = fn(*args)
        calls.append(result)
        return result
    return wrapper


# ---- The gate ------------------------------------------------------------------------------------------------------

# (x, channel logits, spatial logits): BAM's shapes, batch 1, 1x1 maps, non-square maps, one channel, rows long
# enough to be split across threads, a large batch of tiny maps.
GATE_SHAPES = [(2, 6, 5, 7), (1, 4, 3, 3), (3, 5, 1, 1), (1, 1, 9, 4), (2, 8, 40, 40), (16, 3, 2, 2)]
GATES = [("sum", False, False), ("product", True, False), ("gamma", False, True)]


def _gate_inputs(shape, dtype=torch.float32, fmt=torch.contiguous_format, scale=2.0, seed=0):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x, cl, sl, dy = (torch.randn(s, generator=g, dtype=dtype) for s in (shape, (n, c, 1, 1), (n, 1, h, w), shape))
    return x.contiguous(memory_format=fmt), cl * scale, sl * scale, dy


def _gamma(channels, dtype=torch.float32):
    return torch.randn(channels, generator=torch.Generator().manual_seed(5), dtype=dtype)


@pytest.mark.parametrize("name,product,scaled", GATES, ids=[g[0] for g in GATES])
@pytest.mark.parametrize("shape", GATE_SHAPES[:4])
def test_gate_gradcheck_float64(shape, name, product, scaled):
    """float64 takes the ATen gate (same formulas as the kernels' fallback)."""
    x, c, s, _ = _gate_inputs(shape, torch.float64)
    leaves = [t.requires_grad_() for t in (x, c, s)] + ([_gamma(shape[1], torch.float64).requires_grad_()]
                                                         if scaled else [])
    assert torch.autograd.gradcheck(lambda *a: _gate(*a[:3], product, *a[3:]), leaves)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("name,product,scaled", GATES, ids=[g[0] for g in GATES])
@pytest.mark.parametrize("scale", [2.0, 30.0, 1e4], ids=["plain", "saturated", "huge"])
@pytest.mark.parametrize("shape", GATE_SHAPES)
def test_gate_matches_float64_reference(shape, scale, name, product, scaled, fmt, monkeypatch):
    """float32 gate (kernels where built, else ATen) against the reference in float64: output and all gradients.
    Logits beyond +-40 would overflow exp(-Mc) * exp(-Ms): those take the ATen gate and still match."""
    calls = []
    monkeypatch.setattr(bam_cpu, "_native_factors", _spy(bam_cpu._native_factors, calls))
    x, c, s, dy = _gate_inputs(shape, fmt=fmt, scale=scale)
    inputs = (x, c, s) + ((_gamma(shape[1]),) if scaled else ())
    leaves = [t.clone(memory_format=torch.preserve_format).requires_grad_() for t in inputs]
    y = _gate(*leaves[:3], product, *leaves[3:])
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.double().requires_grad_() for t in inputs]
    y_ref = _gate_reference(*ref_leaves[:3], product, *ref_leaves[3:])
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    within = max(c.abs().max().item(), s.abs().max().item()) <= 40
    assert within == (scale == 2.0)
    expect_native = native_kernels_available() and name == "sum" and within
    assert calls and (calls[0] is not None) == expect_native, "the kernels ran where they should not, or not"
    assert y.is_contiguous(memory_format=fmt)
    for what, a, b in zip(["y", "dx", "dMc", "dMs", "dgamma"], (y, *grads), (y_ref, *grads_ref)):
        assert a.dtype == torch.float32
        _assert_close(a, b, 1e-5, what)


def test_gate_backward_accepts_a_non_contiguous_gradient():
    x, c, s, _ = _gate_inputs((2, 3, 5, 5))
    leaves = [t.requires_grad_() for t in (x, c, s)]
    dy = torch.randn(5, 5, 3, 2).permute(3, 2, 1, 0)  # x's shape, transposed strides
    grads = torch.autograd.grad(_gate(*leaves), leaves, dy)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    grads_ref = torch.autograd.grad(_gate_reference(*ref), ref, dy.double())
    for a, b in zip(grads, grads_ref):
        _assert_close(a, b, 1e-5)


@pytest.mark.parametrize("name,product,scaled", GATES, ids=[g[0] for g in GATES])
def test_gate_never_writes_its_input(name, product, scaled):
    x, c, s, _ = _gate_inputs((2, 6, 5, 7))
    x_before = x.clone()
    gamma = _gamma(6) if scaled else None
    with torch.no_grad():
        y = _gate(x, c, s, product, gamma)
    _assert_close(y, _gate_reference(x.double(), c.double(), s.double(), product,
                                     gamma.double() if scaled else None), 1e-5)
    assert torch.equal(x, x_before)


def test_gate_propagates_nan_like_the_reference():
    x, c, s, _ = _gate_inputs((1, 3, 4, 4))
    c[0, 1] = float("nan")
    y = _gate(x, c, s)
    assert torch.isnan(y[0, 1]).all() and not torch.isnan(y[0, [0, 2]]).any()


@needs_native
def test_native_ops_reject_bad_input_with_a_message():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="4-D float32 CPU"):
        torch.ops.bam_zoo.gate_forward(x.double(), torch.ones(2, 3), torch.ones(2, 16))
    with pytest.raises(RuntimeError, match="N\\*C"):
        torch.ops.bam_zoo.gate_forward(x, torch.ones(2, 4), torch.ones(2, 16))
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        torch.ops.bam_zoo.gate_forward(x[..., :2], torch.ones(2, 3), torch.ones(2, 8))
    with pytest.raises(RuntimeError, match="pool_reduce: x must be a channels_last"):
        torch.ops.bam_zoo.pool_reduce(x, torch.ones(1, 3), None)
    with pytest.raises(RuntimeError, match="rd x C matrix"):
        torch.ops.bam_zoo.pool_reduce(x.contiguous(memory_format=torch.channels_last), torch.ones(1, 4), None)
    with pytest.raises(RuntimeError, match="spatial_body: reduced must be"):
        torch.ops.bam_zoo.spatial_body_forward(x.double(), [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)],
                                               [torch.ones(3)], [0.1], [1e-5], [], torch.ones(1, 3, 1, 1), None,
                                               [0, 0], [1, 1])


@needs_native
@pytest.mark.parametrize("channels,rd,size,bias", [
    (16, 1, (28, 28), False),  # bam_resnet20's first BAM
    (32, 2, (14, 14), True),   # its second, with a folded bias
    (24, 2, (5, 3), True),     # rows not a multiple of the 8-pixel blocks, channels not of the vector width
])
def test_pool_reduce_kernels_match_float64(channels, rd, size, bias):
    """The one-pass pool + 1x1 reduction of a channels_last map and its backward, against the same sums in
    float64 (the node uses them for narrow reductions)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, channels, *size, generator=g).contiguous(memory_format=torch.channels_last)
    weight, b = torch.randn(rd, channels, generator=g), torch.randn(rd, generator=g) if bias else None
    pooled, reduced = torch.ops.bam_zoo.pool_reduce(x, weight, b)
    x64, w64 = x.double(), weight.double()
    want_reduced = torch.einsum("nchw,rc->nrhw", x64, w64) + (b.double().view(1, -1, 1, 1) if bias else 0)
    _assert_close(pooled, x64.mean((2, 3)), 1e-5, "pooled")
    _assert_close(reduced, want_reduced, 1e-5, "reduced")
    assert reduced.is_contiguous()

    grad_x = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
    grad_reduced, grad_pooled = torch.randn(reduced.shape, generator=g), torch.randn(3, channels, generator=g)
    want_dx = (grad_x.double() + torch.einsum("nrhw,rc->nchw", grad_reduced.double(), w64)
               + grad_pooled.double()[:, :, None, None])
    want_dw = torch.einsum("nrhw,nchw->rc", grad_reduced.double(), x64)
    got_dw = torch.ops.bam_zoo.pool_reduce_backward_(grad_x, x, grad_reduced, weight, grad_pooled)
    _assert_close(grad_x, want_dx, 1e-5, "grad_x (in place)")
    _assert_close(got_dw, want_dw, 1e-5, "grad_weight")


# ---- Few-channel convolutions --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("in_ch,out_ch,kernel,dilation,size,bias", [
    (1, 1, 1, 1, (6, 5), True), (1, 1, 1, 1, (6, 5), False), (16, 1, 1, 1, (6, 5), True),
    (32, 2, 1, 1, (6, 5), False), (16, 8, 1, 1, (6, 5), False), (32, 8, 1, 1, (20, 21), False),  # >= 400 px
    (1, 1, 3, 4, (9, 7), False),   # bam_resnet20's first BAM
    (2, 2, 3, 4, (6, 5), False),   # its second
    (1, 1, 3, 4, (6, 5), True), (1, 2, 3, 2, (5, 5), True), (1, 1, 5, 4, (6, 5), True),
    (4, 1, 1, 1, (4, 6), True),
    (2, 2, 3, 4, (3, 3), False),   # map smaller than the dilation: only the centre tap ever overlaps
    (1, 1, (2, 3), (1, 2), (5, 6), True),  # non-square kernel, unequal dilation
    (4, 4, 3, 4, (6, 5), False),   # oneDNN's
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_few_channel_convs_match_float64_conv2d(in_ch, out_ch, kernel, dilation, size, bias, fmt, dtype):
    """The spatial branch's rewrites (direct loops, element-wise, shifted adds, matrix products) give conv2d's
    outputs and gradients, against conv2d in float64."""
    torch.manual_seed(0)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    conv = nn.Conv2d(in_ch, out_ch, (kh, kw), padding=((kh // 2) * dh, (kw // 2) * dw), dilation=(dh, dw),
                     bias=bias).to(dtype)
    conv64 = copy.deepcopy(conv).double()
    x = torch.randn(3, in_ch, *size, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    y = few_channel_conv(x, conv.weight, conv.bias, conv.padding, conv.dilation)
    x64 = x.detach().double().requires_grad_()
    y_ref = conv64(x64)
    _assert_close(y, y_ref, 1e-5, "y")
    dy = torch.randn(y.shape, dtype=dtype)
    got = torch.autograd.grad(y, [x] + list(conv.parameters()), dy)
    want = torch.autograd.grad(y_ref, [x64] + list(conv64.parameters()), dy.double())
    for name, a, b in zip(["dx", "dw", "db"], got, want):
        assert a.dtype == dtype
        _assert_close(a, b, 1e-5, name)
    with torch.no_grad():  # inference skips autograd, same numbers
        torch.testing.assert_close(few_channel_conv(x, conv.weight, conv.bias, conv.padding, conv.dilation),
                                   y.detach(), rtol=0, atol=0)


# ---- Whole blocks against the definition in float64 ---------------------------------------------------------------

# Each component of the speed layer off in turn ("node" off runs the definition, which the float64 reference
# already is, so it is not among them).
VARIANTS = ["all", "gate", "chain", "pool_reduce", "conv"]


def _step(bam, x, dy):
    """One forward/backward; returns (output, input grad, {param: grad}, {buffer: value}, grad_fn name)."""
    y = bam(x)
    if y.requires_grad:
        y.backward(dy.to(y.dtype).contiguous(memory_format=torch.preserve_format))
    return (y.detach(), x.grad, {n: p.grad for n, p in bam.named_parameters()},
            {n: b.clone() for n, b in bam.named_buffers()}, type(y.grad_fn).__name__)


def _compare(bam, x, fmt=torch.contiguous_format, variant="all", tol=1e-4, calls=None):
    """The fast path's step (with ``variant`` switched off) against the float64 definition's."""
    if fmt == torch.channels_last:
        bam = bam.to(memory_format=torch.channels_last)
    reference = copy.deepcopy(bam).double()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    x32 = x.detach().clone().contiguous(memory_format=fmt).requires_grad_(x.requires_grad)
    x64 = x.detach().double().contiguous(memory_format=fmt).requires_grad_(x.requires_grad)
    assert cpu_fast_path_applies(bam, x32) and not cpu_fast_path_applies(reference, x64)
    with components_off(*([variant] if variant != "all" else [])):
        got = _step(bam, x32, dy)
    assert len(calls) == 1, "the fast path did not run"
    want = _step(reference, x64, dy.double())
    assert len(calls) == 1, "the float64 reference took the fast path"
    any_grad = x.requires_grad or any(p.requires_grad for p in bam.parameters())
    assert got[4] == (NODE if any_grad else "NoneType"), got[4]
    assert got[0].is_contiguous(memory_format=fmt)
    _assert_close(got[0], want[0], tol, "output")
    if x.requires_grad:
        _assert_close(got[1], want[1], tol, "input grad")
    assert got[2].keys() == want[2].keys() and got[3].keys() == want[3].keys()
    block_scale = max([1.0] + [g.abs().max().item() for g in want[2].values() if g is not None])
    for name in got[2]:
        if want[2][name] is None:
            assert got[2][name] is None, name
        else:
            zero_in_theory = want[2][name].abs().max().item() < 1e-9 * block_scale
            _assert_close(got[2][name], want[2][name], tol, name, block_scale if zero_in_theory else 1.0)
    for name in got[3]:
        _assert_close(got[3][name], want[3][name], tol, name)


def _variants():
    return [pytest.param(v, marks=[needs_native] if v in ("gate", "chain", "pool_reduce") else [], id=v)
            for v in VARIANTS]


BLOCKS = [
    (16, (4, 16, 12, 12)),    # rd_channels 1 (bam_resnet20's first BAM): few-channel convs, the chain
    (32, (3, 32, 9, 11)),     # rd_channels 2, non-square
    (64, (2, 64, 7, 7)),      # rd_channels 4, map smaller than twice the dilation
    (128, (2, 128, 6, 6)),    # rd_channels 8 on a small map: conv_reduce through oneDNN, not a matmul
    (256, (2, 256, 20, 20)),  # rd_channels 16, ResNet-50's first BAM: conv_reduce on a >= 400-pixel map
    (32, (2, 32, 1, 1)),      # 1x1 maps
    (32, (1, 32, 6, 6)),      # batch 1: the channel branch's BatchNorm takes running stats
]
BLOCK_IDS = ["rd1", "rd2-nonsquare", "rd4", "rd8", "rd16-400px", "1x1", "batch1"]


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("fusion", ["sum", "product"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("channels,shape", BLOCKS, ids=BLOCK_IDS)
def test_block_matches_float64_definition(channels, shape, fmt, train, fusion, variant, fast_calls):
    torch.manual_seed(0)
    bam = BAM(channels, fusion=fusion).train(train)
    randomise_bn(bam)
    _compare(bam, torch.randn(shape, requires_grad=True), fmt, variant, calls=fast_calls)


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("channels,shape", [BLOCKS[0], BLOCKS[4]], ids=["rd1", "rd16-400px"])
def test_identity_init_block_matches_float64_definition(channels, shape, fmt, train, variant, fast_calls):
    """``identity_init=True`` (``y = x + gamma * x * g``) takes the same op, with the ATen gate; at its zero start it
    is the identity, and with a trained ``gamma`` it matches the definition, ``gamma``'s gradient included."""
    torch.manual_seed(0)
    bam = BAM(channels, identity_init=True).train(train)
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(bam(x), x)
    assert len(fast_calls) == 1
    fast_calls.clear()
    randomise_bn(bam)
    with torch.no_grad():
        bam.gamma.copy_(_gamma(channels))
    _compare(bam, x.requires_grad_(), fmt, variant, calls=fast_calls)


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("num_dilated_convs", [0, 1, 3])
def test_block_of_any_depth(num_dilated_convs, fmt, variant, fast_calls):
    torch.manual_seed(0)
    bam = BAM(32, num_dilated_convs=num_dilated_convs, dilation=2).train()
    _compare(bam, torch.randn(2, 32, 8, 8, requires_grad=True), fmt, variant, calls=fast_calls)


@pytest.mark.parametrize("fusion", ["sum", "product"])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_folded_block_in_eval_mode(fmt, fusion, fast_calls):
    """After fuse_for_inference conv_reduce has a bias and act_reduce follows it directly (in place);
    gradients in eval mode (e.g. saliency maps) still take the fast path and match."""
    torch.manual_seed(0)
    bam = BAM(32, num_dilated_convs=0, fusion=fusion)
    randomise_bn(bam)
    fuse_for_inference(bam)
    assert bam.spatial_attn.body.conv_reduce.bias is not None
    _compare(bam, torch.randn(2, 32, 5, 5, requires_grad=True), fmt, calls=fast_calls)


@pytest.mark.parametrize("fusion", ["sum", "product"])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_saturated_logits(fmt, fusion, fast_calls):
    """Logits beyond the kernels' +-40 take the ATen gate; the block still matches."""
    torch.manual_seed(0)
    bam = BAM(32, fusion=fusion).train()
    with torch.no_grad():
        bam.channel_attn.fc2.bias.fill_(60.0)
    _compare(bam, torch.randn(2, 32, 6, 6, requires_grad=True), fmt, calls=fast_calls)


@pytest.mark.parametrize("fusion", ["sum", "product"])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_frozen_parameters_and_input_without_grad(fmt, fusion, fast_calls):
    """Fine-tuning with part of the block frozen, and an input that needs no gradient."""
    torch.manual_seed(0)
    bam = BAM(32, fusion=fusion).train()
    for p in bam.channel_attn.parameters():
        p.requires_grad_(False)
    bam.spatial_attn.body.conv_reduce.weight.requires_grad_(False)
    _compare(bam, torch.randn(2, 32, 6, 6), fmt, calls=fast_calls)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_whole_model_training_step(fmt, fast_calls):
    """A whole bam_resnet20 step at 28 px (both BAMs take the node and its chain kernels): every gradient and
    running statistic equals the float64 definition's."""
    torch.manual_seed(0)
    model = bam_zoo.create_model("bam_resnet20", in_chans=1, num_classes=10).train()
    model = model.to(memory_format=fmt)
    reference = copy.deepcopy(model).double()
    x, target = torch.randn(4, 1, 28, 28).contiguous(memory_format=fmt), torch.tensor([0, 3, 5, 9])
    F.cross_entropy(model(x), target).backward()
    assert len(fast_calls) == 2
    F.cross_entropy(reference(x.double()), target).backward()
    assert len(fast_calls) == 2
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        _assert_close(p.grad, p_ref.grad, 1e-3, name)
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers()):
        _assert_close(b, b_ref, 1e-4, name)


def test_training_keeps_nothing_full_size_but_the_input():
    """Training memory: the node keeps x (alive anyway) and the branches' small maps, nothing of x's size new (the
    definition keeps several)."""
    torch.manual_seed(0)
    bam = BAM(64).train()
    x = torch.randn(2, 64, 20, 20, requires_grad=True)

    def saved(module):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            module(x)
        return packed

    kept = saved(bam)
    assert any(t is x for t in kept)
    assert all(t is x or t.numel() < x.numel() for t in kept)
    full_size = [t for t in saved(disable_cpu_fast_path(copy.deepcopy(bam))) if t.numel() >= x.numel() and t is not x]
    assert len(full_size) >= 2  # what the node avoids keeping


# ---- Where the fast path runs, and where it must not ---------------------------------------------------------------

@pytest.mark.parametrize("gate_layer", ["sigmoid", nn.Sigmoid, torch.sigmoid])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_fast_path_runs_by_default(gate_layer, fmt, fast_calls):
    """float32 CPU maps in either format, any spelling of the sigmoid gate: no switch needed."""
    bam = BAM(16, gate_layer=gate_layer).train()
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=fmt)
    assert cpu_fast_path_applies(bam, x)
    bam(x)
    assert len(fast_calls) == 1


def test_fast_path_does_not_run_on_other_strides(fast_calls):
    bam = BAM(16)
    x = torch.randn(2, 16, 8, 16)[..., ::2]
    assert not cpu_fast_path_applies(bam, x)
    torch.testing.assert_close(bam(x), bam(x.contiguous()))
    assert len(fast_calls) == 1


def _plain_runs(name, bam, x):
    """Run ``bam`` on ``x`` under the setting ``name``; returns the output."""
    if name == "float64":
        return bam.double()(x.double())
    if name == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return bam(x).float()
    if name == "flop_counter":
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False):
            return bam(x)
    if name == "jit_script":
        return torch.jit.script(bam)(x)
    if name == "store_attention":
        bam.store_attention = True
        return bam(x)
    if name == "capture_attention":
        with bam_zoo.capture_attention(bam):
            return bam(x)
    if name == "hook":
        bam.channel_attn.register_forward_hook(lambda m, i, o: None)
        return bam(x)
    if name == "hard_sigmoid_gate":
        bam.gate = bam_def.get_act_layer("hard_sigmoid")()
        return bam(x)
    if name == "silu_branches":
        bam.spatial_attn.body.act_reduce = nn.SiLU()
        return bam(x)
    if name == "disable_cpu_fast_path":
        disable_cpu_fast_path(bam)
        return bam(x)
    raise AssertionError(name)


@pytest.mark.parametrize("name", [
    "float64", "autocast", "flop_counter", "jit_script", "store_attention", "capture_attention", "hook",
    "hard_sigmoid_gate", "silu_branches", "disable_cpu_fast_path"])
def test_plain_definition_runs_where_the_fast_path_was_not_measured(name, monkeypatch):
    monkeypatch.setattr(bam_def, "bam_cpu_forward", _forbidden)
    torch.manual_seed(0)
    bam = BAM(16).eval()
    randomise_bn(bam)
    x = torch.randn(2, 16, 8, 8)
    expected = BAM.forward(copy.deepcopy(bam).double(), x.double())  # the float64 definition
    if name in ("hard_sigmoid_gate", "silu_branches"):
        expected = None
    y = _plain_runs(name, bam, x)
    assert y.shape == x.shape
    if expected is not None:
        _assert_close(y, expected, 2e-2 if name == "autocast" else 1e-5)


def _forbidden(bam, x):
    raise AssertionError("the fast path ran")


def test_disable_cpu_fast_path_can_be_undone(fast_calls):
    model = bam_zoo.create_model("bam_resnet20", in_chans=1).eval()
    x = torch.randn(1, 1, 16, 16)
    assert disable_cpu_fast_path(model) is model
    model(x)
    assert fast_calls == []
    disable_cpu_fast_path(model, False)
    model(x)
    assert len(fast_calls) == 2


def test_node_off_trains_the_definition_and_keeps_inference(fast_calls):
    """``node`` off: training runs the definition's modules; inference keeps the fast path."""
    bam = BAM(16)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    with components_off("node"):
        assert type(bam.train()(x).grad_fn).__name__ != NODE
        assert fast_calls == []
        bam.eval()(x)
        assert len(fast_calls) == 1


# ---- The node ------------------------------------------------------------------------------------------------------

def test_autograd_grad_sees_every_parameter():
    """The parameters are inputs of the node, so the functional API (and DDP's graph walk) finds them."""
    bam = BAM(16).train()
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    y = bam(x)
    assert type(y.grad_fn).__name__ == NODE
    grads = torch.autograd.grad(y.square().sum(), [x] + list(bam.parameters()))
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in bam.parameters())  # nothing accumulated behind the caller's back


def test_double_backward_says_how():
    """create_graph=True (gradient penalties) gets a message naming the fix, and the fix works."""
    bam = BAM(16).train()
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="disable_cpu_fast_path"):
        torch.autograd.grad(bam(x).square().sum(), x, create_graph=True)
    disable_cpu_fast_path(bam)
    (grad_x,) = torch.autograd.grad(bam(x).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    assert all(p.grad is not None for p in bam.parameters())


def test_hooks_on_the_branches_run_the_definition(fast_calls):
    bam = BAM(16).train()
    seen = []
    bam.channel_attn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 16, 20, 20, requires_grad=True)
    assert not cpu_fast_path_applies(bam, x)
    y = bam(x)
    assert seen == [torch.Size([2, 16, 1, 1])] and fast_calls == []
    assert type(y.grad_fn).__name__ != NODE


@pytest.fixture
def chain_calls(monkeypatch):
    """Counts the chain kernels' forward runs."""
    calls = []
    forward = bam_cpu._ChainState.forward.__func__

    def spy(cls, reduced, net):
        calls.append(reduced.shape)
        return forward(cls, reduced, net)

    monkeypatch.setattr(bam_cpu._ChainState, "forward", classmethod(spy))
    return calls


@needs_native
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("channels,kwargs,runs", [
    (16, {}, True),                                   # rd_channels 1, the definition's chain
    (32, dict(num_dilated_convs=3, dilation=1), True),  # rd_channels 2, deeper, dilation 1
    (32, dict(num_dilated_convs=0), True),            # BatchNorm + ReLU + the final 1x1 only
    (64, {}, False),                                  # rd_channels 4: direct loops would lose to oneDNN
], ids=["rd1", "rd2-deep", "rd2-shallow", "rd4"])
def test_narrow_spatial_branch_runs_as_the_chain(channels, kwargs, runs, fmt, fast_calls, chain_calls):
    """The chain kernels run exactly where they compute the definition (BatchNorm with batch statistics, ReLU,
    one or two channels), and the step matches the float64 definition either way."""
    torch.manual_seed(0)
    bam = BAM(channels, **kwargs).train()
    randomise_bn(bam)
    _compare(bam, torch.randn(3, channels, 9, 9, requires_grad=True), fmt, calls=fast_calls)
    assert len(chain_calls) == (1 if runs else 0)


@needs_native
def test_chain_is_not_used_with_running_statistics(fast_calls, chain_calls):
    """In eval mode (frozen BatchNorm, e.g. saliency maps) the branch's BatchNorms use running statistics, which the
    chain kernels do not implement: the branch runs as layers inside the node."""
    bam = BAM(16).eval()
    bam(torch.randn(2, 16, 21, 21, requires_grad=True)).sum().backward()
    assert len(fast_calls) == 1 and not chain_calls


# ---- DDP: gradients in the parameters' own layout ----------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("channels", [16, 32, 64, 256])
def test_gradients_have_the_parameters_strides(channels, fmt, train, fast_calls):
    """DDP copies a gradient whose strides differ from its parameter's (and warns `Grad strides do not match
    bucket view strides`); every gradient the fast path produces has exactly its parameter's strides.

    Model and input share a memory format, as ImageClassifier(channels_last=...) arranges (with mixed formats
    oneDNN's own convolutions return gradients in the input's format, in the plain definition too)."""
    bam = BAM(channels).train(train).to(memory_format=fmt)
    x = torch.randn(2, channels, 9, 9).contiguous(memory_format=fmt).requires_grad_()
    y = bam(x)
    assert len(fast_calls) == 1 and type(y.grad_fn).__name__ == NODE
    y.square().sum().backward()
    bad = {n: (tuple(p.shape), p.stride(), p.grad.stride()) for n, p in bam.named_parameters()
           if p.grad.stride() != p.stride()}
    assert not bad, f"gradient strides differ from the parameter's (shape, param, grad): {bad}"


# ---- The switches ------------------------------------------------------------------------------------------------

def test_components_off_switches_and_restores():
    assert all(component_enabled(c) for c in COMPONENTS)
    with components_off("gate", "chain"):
        assert not component_enabled("gate") and not component_enabled("chain") and component_enabled("conv")
        with components_off("conv"):
            assert not component_enabled("conv")
        assert component_enabled("conv") and not component_enabled("gate")
    assert all(component_enabled(c) for c in COMPONENTS)
    with pytest.raises(ValueError, match="unknown components"):
        with components_off("gates"):
            pass


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_components_switch_off_from_the_environment():
    code = "from bam_zoo.layers import bam_cpu; print(bam_cpu.component_enabled('gate'), bam_cpu.component_enabled('node'))"
    out = _python(code, BAM_ZOO_CPU_OFF="gate, chain")
    assert out.returncode == 0 and out.stdout.split() == ["False", "True"], out.stderr[-2000:]
    out = _python("import bam_zoo", BAM_ZOO_CPU_OFF="gate,kernels")
    assert out.returncode != 0 and "BAM_ZOO_CPU_OFF names unknown components ['kernels']" in out.stderr


def test_native_kernels_can_be_switched_off():
    """BAM_ZOO_NATIVE_GATE=0 gives the ATen paths (for A/B timing, and as an install without a compiler runs)."""
    code = ("import torch, bam_zoo; from bam_zoo.layers import bam_cpu; m = bam_zoo.BAM(16).train(); "
            "x = torch.randn(2, 16, 20, 20, requires_grad=True); y = m(x); y.sum().backward(); "
            "print(bam_cpu.native_kernels_available(), type(y.grad_fn).__name__)")
    out = _python(code, BAM_ZOO_NATIVE_GATE="0")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["False", NODE]


def test_native_kernels_are_built_where_ci_runs():
    """.ci/run sets BAM_ZOO_REQUIRE_NATIVE=1: a build that silently fell back to ATen would hide a regression."""
    if os.environ.get("BAM_ZOO_REQUIRE_NATIVE") != "1":
        pytest.skip("only enforced where BAM_ZOO_REQUIRE_NATIVE=1 (CI)")
    assert native_kernels_available()


def test_a_graph_of_another_op_version_fails_loudly():
    """The op's argument layout carries a version: a graph exported or cached by another bam_zoo says so."""
    spec = bam_cpu._spec_of(BAM(16))
    config = [spec.config[0] + 1] + spec.config[1:]
    with pytest.raises(RuntimeError, match="trace, export or compile it again"):
        torch.ops.bam_zoo.bam_forward(torch.randn(2, 16, 4, 4), spec.params, spec.buffers, config, spec.floats)
