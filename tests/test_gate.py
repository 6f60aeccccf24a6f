"""The fused BAM gate computes exactly the reference gate: outputs and gradients, every layout and dtype."""
import copy

import pytest
import torch

import bam_zoo.layers.bam as bam_module
from bam_zoo.layers import BAM
from bam_zoo.layers import gate as gate_module
from bam_zoo.layers.gate import (
    BamGateFunction, bam_gate, bam_gate_reference, use_reference_gate)
from bam_zoo.layers.native import native_kernels_available

# (x, channel logits, spatial logits): BAM's shapes, batch 1, 1x1 maps, non-square maps, and logits that
# broadcast beyond BAM's own (shared across the batch, or a full-size map).
SHAPES = [
    ((2, 6, 5, 7), (2, 6, 1, 1), (2, 1, 5, 7)),
    ((1, 4, 3, 3), (1, 4, 1, 1), (1, 1, 3, 3)),
    ((3, 5, 1, 1), (3, 5, 1, 1), (3, 1, 1, 1)),
    ((2, 3, 4, 4), (1, 3, 1, 1), (2, 1, 4, 4)),
    ((2, 3, 4, 4), (2, 3, 4, 4), (1, 1, 4, 4)),
    ((2, 3, 4, 4), (3, 1, 1), (4, 4)),
]


def _inputs(shapes, dtype=torch.float64, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=g, dtype=dtype) * 2 for s in shapes]
    if channels_last:
        tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
    return [t.requires_grad_() for t in tensors]


def _fused(x, c, s, product):
    return BamGateFunction.apply(x, c, s, product)


@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("shapes", SHAPES)
def test_gradcheck_float64(shapes, product):
    x, c, s = _inputs(shapes)
    assert torch.autograd.gradcheck(_fused, (x, c, s, product))
    assert torch.autograd.gradgradcheck(bam_gate_reference, (x, c, s, product))  # reference itself is sane


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("shapes", SHAPES[:3])
def test_fp32_outputs_and_gradients_match_reference(shapes, product, channels_last):
    if channels_last and len(shapes[0]) != 4:
        pytest.skip("channels_last needs 4-D")
    x, c, s = _inputs(shapes, torch.float32, channels_last)
    x2, c2, s2 = (t.detach().clone().requires_grad_() for t in (x, c, s))
    y = bam_gate(x, c, s, product)
    y_ref = bam_gate_reference(x2, c2, s2, product)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))  # same upstream gradient for both
    grads = torch.autograd.grad(y, (x, c, s), dy)
    grads_ref = torch.autograd.grad(y_ref, (x2, c2, s2), dy)
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("product", [False, True])
def test_inference_path_needs_no_autograd(product):
    x, c, s = (t.detach() for t in _inputs(SHAPES[0], torch.float32))
    with torch.no_grad():
        y = bam_gate(x, c, s, product)
    assert y.grad_fn is None
    torch.testing.assert_close(y, bam_gate_reference(x, c, s, product))
    x_before = x.clone()
    bam_gate(x, c, s, product)
    assert torch.equal(x, x_before), "the gate must never write into its input"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mixed", [False, True])
def test_low_precision_dtypes(dtype, mixed):
    """bf16/fp16 maps, and fp32 logits on a bf16 map (what autocast hands BAM): dtype and values as the reference."""
    x, c, s = _inputs(SHAPES[0], torch.float32)
    x = x.detach().to(dtype).requires_grad_()
    if not mixed:
        c, s = (t.detach().to(dtype).requires_grad_() for t in (c, s))
    y = bam_gate(x, c, s)
    y_ref = bam_gate_reference(x, c, s)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)
    dy = torch.randn(y.shape).to(y.dtype)
    for got, want in zip(torch.autograd.grad(y, (x, c, s), dy), torch.autograd.grad(y_ref, (x, c, s), dy)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def _bam_with_gate(monkeypatch, gate_fn, fusion, channels_last, autocast, seed=0):
    """Output and every gradient (input and parameters) of one BAM training step with a given gate."""
    monkeypatch.setattr(bam_module, "bam_gate", gate_fn)
    torch.manual_seed(seed)
    bam = BAM(32, fusion=fusion).train()
    x = torch.randn(4, 32, 9, 11)
    if channels_last:
        bam = bam.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = bam(x)
    y.float().pow(2).mean().backward()
    return y.detach().float(), [x.grad] + [p.grad for p in bam.parameters()]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fusion", ["sum", "product"])
def test_bam_block_gradients_match_reference(monkeypatch, fusion, channels_last, autocast):
    """Whole block: the fused gate changes no output and no parameter gradient (fp32 and bf16 autocast)."""
    y, grads = _bam_with_gate(monkeypatch, bam_gate, fusion, channels_last, autocast)
    y_ref, grads_ref = _bam_with_gate(monkeypatch, bam_gate_reference, fusion, channels_last, autocast)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    assert len(grads) == len(grads_ref)
    for got, want in zip(grads, grads_ref):
        assert got is not None
        torch.testing.assert_close(got.float(), want.float(), **tol)


def test_saves_only_input_and_logits():
    """Training memory: the fused gate keeps x (alive anyway) and the small logit maps, nothing full-size new."""
    x, c, s = _inputs(((2, 16, 8, 8), (2, 16, 1, 1), (2, 1, 8, 8)), torch.float32)

    def saved(fn):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            fn(x, c, s)
        return packed

    fused = saved(lambda *a: bam_gate(*a))
    assert any(t is x for t in fused)
    # besides x: the logits, or (native kernels) their exp(-logit) factors; never anything full-size
    assert all(t is x or t.numel() <= max(c.numel(), s.numel()) for t in fused)
    full_size_ref = [t for t in saved(bam_gate_reference) if t.numel() == x.numel() and t is not x]
    assert len(full_size_ref) >= 2  # what the fused gate avoids keeping


def test_export_and_tracing_use_the_reference():
    x, c, s = (t.detach() for t in _inputs(SHAPES[0], torch.float32))
    assert not use_reference_gate()
    seen = []

    def probe(x, c, s):
        seen.append(use_reference_gate())
        return bam_gate(x, c, s)

    traced = torch.jit.trace(probe, (x, c, s))
    torch.testing.assert_close(traced(x, c, s), bam_gate_reference(x, c, s))
    compiled = torch.compile(probe, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, c, s), bam_gate_reference(x, c, s))
    assert seen[:2] == [True, True]
    scripted = torch.jit.script(bam_gate)
    torch.testing.assert_close(scripted(x, c, s, True), bam_gate_reference(x, c, s, True))


@pytest.mark.parametrize("gate_layer", ["sigmoid", torch.nn.Sigmoid])
def test_bam_block_takes_the_fused_gate(gate_layer):
    """BAM's default gate (timm resolves "sigmoid" to its own class) runs the fused path: no full-size
    sigmoid output or ``1 + sigmoid`` is kept for the backward."""
    bam = BAM(16, gate_layer=gate_layer).train()
    assert bam.fused_sigmoid
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        bam(x)
    assert [t for t in saved if t.shape == x.shape and t is not x] == []
    assert not BAM(16, gate_layer="hard_sigmoid").fused_sigmoid


@pytest.mark.parametrize("in_ch,out_ch,kernel,bias", [
    (1, 1, 1, True), (1, 1, 1, False), (16, 1, 1, True), (32, 2, 1, False), (16, 8, 1, False),
    (1, 1, 3, False), (1, 1, 3, True), (2, 2, 3, False), (1, 1, 5, True),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_few_channel_convs_match_conv2d(in_ch, out_ch, kernel, bias, channels_last):
    """The spatial branch's rewrites of one/two-channel convolutions give conv2d's outputs and gradients."""
    from bam_zoo.layers.bam import _few_channel_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(in_ch, out_ch, kernel, padding=(kernel // 2) * 4, dilation=4 if kernel > 1 else 1,
                           bias=bias).double()
    x = torch.randn(3, in_ch, 6, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y, y_ref = _few_channel_conv(conv, x), conv(x)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, [x] + list(conv.parameters()), dy)
    want = torch.autograd.grad(y_ref, [x] + list(conv.parameters()), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_large_map_reduce_conv_as_matmul_matches_conv2d():
    """conv_reduce on maps of >= 400 pixels runs as a batched matmul; outputs and gradients are conv2d's."""
    from bam_zoo.layers.bam import _MATMUL_MIN_PIXELS, _few_channel_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 8, 1, bias=False).double()
    x = torch.randn(2, 32, 20, 21, dtype=torch.float64, requires_grad=True)
    assert 20 * 21 >= _MATMUL_MIN_PIXELS
    y, y_ref = _few_channel_conv(conv, x), conv(x)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y, [x, conv.weight], dy), torch.autograd.grad(y_ref, [x, conv.weight], dy)):
        torch.testing.assert_close(a, b)


# --- the compiled one-pass kernels (bam_zoo._native) -------------------------------------------------------

needs_native = pytest.mark.skipif(not native_kernels_available(), reason="bam_zoo._native not built")

# BAM's shapes: batch 1, non-square, 1x1 maps, one channel, and rows long enough to be split across threads
NATIVE_SHAPES = [(2, 6, 5, 7), (1, 4, 3, 3), (3, 5, 1, 1), (1, 1, 9, 4), (2, 8, 40, 40), (16, 3, 2, 2)]


def _native_vs_float64(shape, scale=2.0, seed=0):
    """Native fp32 gate against the reference in float64: outputs and all three gradients."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x, cl, sl, dy = (torch.randn(s, generator=g) for s in (shape, (n, c, 1, 1), (n, 1, h, w), shape))
    cl, sl = cl * scale, sl * scale
    leaves = [t.clone().requires_grad_() for t in (x, cl, sl)]
    y = BamGateFunction.apply(*leaves, False)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.double().requires_grad_() for t in (x, cl, sl)]
    y_ref = bam_gate_reference(*ref_leaves)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    return (y, *grads), (y_ref, *grads_ref)


@needs_native
@pytest.mark.parametrize("shape", NATIVE_SHAPES)
def test_native_kernels_match_float64_reference(shape, monkeypatch):
    calls = []
    monkeypatch.setattr(gate_module, "_native_factors", _spy(gate_module._native_factors, calls))
    got, want = _native_vs_float64(shape)
    assert calls and calls[0] is not None, "the native kernels did not run"
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def _spy(fn, calls):
    def wrapper(*args):
        result = fn(*args)
        calls.append(result)
        return result
    return wrapper


@needs_native
@pytest.mark.parametrize("scale", [30.0, 1e4])
def test_native_kernels_hand_saturated_gates_to_aten(scale):
    """Logits beyond +-40 would overflow exp(-Mc) * exp(-Ms): those go through ATen and still match."""
    got, want = _native_vs_float64((2, 4, 6, 6), scale=scale)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@needs_native
def test_native_path_propagates_nan_like_the_reference():
    x = torch.randn(1, 3, 4, 4)
    c = torch.randn(1, 3, 1, 1)
    c[0, 1] = float("nan")
    y = bam_gate(x, c, torch.randn(1, 1, 4, 4))
    assert torch.isnan(y[0, 1]).all() and not torch.isnan(y[0, [0, 2]]).any()


@needs_native
def test_native_inference_and_training_paths_agree():
    x, c, s = (torch.randn(sh) for sh in ((4, 8, 12, 10), (4, 8, 1, 1), (4, 1, 12, 10)))
    with torch.no_grad():
        y_infer = bam_gate(x, c, s)
    y_train = bam_gate(x.requires_grad_(), c, s)
    torch.testing.assert_close(y_infer, y_train.detach(), rtol=0, atol=0)


@needs_native
def test_native_backward_accepts_a_non_contiguous_gradient():
    x, c, s = (torch.randn(sh, requires_grad=True) for sh in ((2, 3, 5, 5), (2, 3, 1, 1), (2, 1, 5, 5)))
    dy = torch.randn(5, 5, 3, 2).permute(3, 2, 1, 0)  # x's shape, transposed strides
    grads = torch.autograd.grad(bam_gate(x, c, s), (x, c, s), dy)
    ref = [t.detach().clone().requires_grad_() for t in (x, c, s)]
    grads_ref = torch.autograd.grad(bam_gate_reference(*ref), ref, dy)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_native
def test_native_ops_reject_bad_input_with_a_message():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="contiguous 4-D float32"):
        torch.ops.bam_zoo.gate_forward(x.double(), torch.ones(2, 3), torch.ones(2, 16))
    with pytest.raises(RuntimeError, match="N\\*C"):
        torch.ops.bam_zoo.gate_forward(x, torch.ones(2, 4), torch.ones(2, 16))


def test_native_kernels_can_be_switched_off():
    """BAM_ZOO_NATIVE_GATE=0 gives the ATen path (for A/B timing and debugging)."""
    import subprocess
    import sys
    code = "import bam_zoo.layers.native as g; print(g.native_kernels_available())"
    env = {**__import__("os").environ, "BAM_ZOO_NATIVE_GATE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_native_kernels_are_built_where_ci_runs():
    """.ci/run sets BAM_ZOO_REQUIRE_NATIVE=1: a build that silently fell back to ATen would hide a regression."""
    import os
    if os.environ.get("BAM_ZOO_REQUIRE_NATIVE") != "1":
        pytest.skip("only enforced where BAM_ZOO_REQUIRE_NATIVE=1 (CI)")
    assert native_kernels_available()


@needs_native
@pytest.mark.parametrize("in_ch,out_ch,kernel,dilation,size,bias", [
    (1, 1, 3, 4, (9, 7), False),   # bam_resnet20's first BAM
    (2, 2, 3, 4, (6, 5), False),   # its second
    (1, 2, 3, 2, (5, 5), True),
    (4, 1, 1, 1, (4, 6), True),    # 1x1
    (2, 2, 3, 4, (3, 3), False),   # map smaller than the dilation: only the centre tap ever overlaps
    (1, 1, (2, 3), (1, 2), (5, 6), True),  # non-square kernel, unequal dilation
])
def test_native_small_conv_matches_float64_conv2d(in_ch, out_ch, kernel, dilation, size, bias):
    """The direct-loop kernels for convolutions of <= 4 channel pairs: outputs and all gradients."""
    from bam_zoo.layers.bam import _few_channel_conv
    from bam_zoo.layers.native import small_conv_applies

    torch.manual_seed(0)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    conv = torch.nn.Conv2d(in_ch, out_ch, (kh, kw), padding=((kh // 2) * dh, (kw // 2) * dw),
                           dilation=(dh, dw), bias=bias)
    conv64 = copy.deepcopy(conv).double()
    x = torch.randn(3, in_ch, *size, requires_grad=True)
    assert small_conv_applies(conv, x)
    y = _few_channel_conv(conv, x)
    x64 = x.detach().double().requires_grad_()
    y_ref = conv64(x64)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(y.shape)
    got = torch.autograd.grad(y, [x] + list(conv.parameters()), dy)
    want = torch.autograd.grad(y_ref, [x64] + list(conv64.parameters()), dy.double())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference skips autograd, same numbers
        torch.testing.assert_close(_few_channel_conv(conv, x), y.detach())


@needs_native
def test_native_small_conv_leaves_larger_convs_to_onednn():
    from bam_zoo.layers.native import small_conv_applies

    x = torch.randn(2, 4, 8, 8)
    assert not small_conv_applies(torch.nn.Conv2d(4, 4, 3, padding=4, dilation=4), x)
    assert not small_conv_applies(torch.nn.Conv2d(2, 2, 3, stride=2), x[:, :2])
    assert not small_conv_applies(torch.nn.Conv2d(2, 2, 3).double(), x[:, :2].double())
    assert not small_conv_applies(torch.nn.Conv2d(2, 2, 3), x[:, :2])  # a channel slice is not contiguous
    assert small_conv_applies(torch.nn.Conv2d(2, 2, 3), x[:, :2].contiguous())


@needs_native
def test_gate_buffers_are_reused_and_accounted():
    """The gate's full-size outputs come from a cache: freed blocks are handed out again, the profiler's
    memory view still counts them, and empty_buffer_cache releases them."""
    from bam_zoo.layers.native import buffer_cache_info, empty_buffer_cache

    x, c, s = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 1, 1), torch.randn(2, 1, 16, 16)
    empty_buffer_cache()
    before = buffer_cache_info()
    y = bam_gate(x, c, s)
    nbytes = y.numel() * 4
    assert buffer_cache_info().allocated == before.allocated + nbytes
    ptr = y.data_ptr()
    del y
    assert buffer_cache_info().cached == before.cached + nbytes
    y2 = bam_gate(x, c, s)
    assert y2.data_ptr() == ptr  # the same block, no fresh pages
    torch.testing.assert_close(y2, bam_gate_reference(x, c, s))
    y2.resize_(4, 8, 16, 16)  # still an ordinary, resizable tensor
    del y2
    empty_buffer_cache()
    assert buffer_cache_info().cached == 0

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        bam_gate(x, c, s)
    reported = [e.cpu_memory_usage for e in prof.events() if e.name == "bam_zoo::gate_forward"]
    assert reported and reported[0] >= nbytes


def test_buffer_cache_limit_is_validated():
    import os
    import subprocess
    import sys
    env = {**os.environ, "BAM_ZOO_BUFFER_CACHE_MB": "lots"}
    out = subprocess.run([sys.executable, "-c", "import bam_zoo"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "BAM_ZOO_BUFFER_CACHE_MB must be a whole number" in out.stderr
