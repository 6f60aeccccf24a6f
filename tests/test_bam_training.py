"""BAM's one-node training path (layers/bam_training.py) computes what the modules compute.

Every check runs the same block twice: through :class:`BamBlockFunction` in float32, and module by module
with the plain kernels (``reference_kernels``) in float64, then compares outputs, the input gradient, every
parameter gradient and the BatchNorm running statistics.
"""
import copy

import pytest
import torch

from bam_zoo import fuse_for_inference
from bam_zoo.layers import BAM
from bam_zoo.layers import bam_training
from bam_zoo.layers.gate import reference_kernels
from bam_zoo.layers.native import native_kernels_available

from _helpers import randomise_bn

pytestmark = pytest.mark.skipif(not native_kernels_available(), reason="bam_zoo._native not built")


@pytest.fixture(autouse=True)
def node_on_every_map_size(monkeypatch):
    """The node normally takes maps of >= 400 pixels only; the tests use small maps to stay fast."""
    monkeypatch.setattr(bam_training, "_NODE_MIN_PIXELS", 1)


def _step(bam, x, reference, dy):
    """One forward/backward; returns (output, input grad, {param name: grad}, {buffer name: value})."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    if reference:
        with reference_kernels():
            y = bam(x)
    else:
        y = bam(x)
        assert type(y.grad_fn).__name__ == "BamBlockFunctionBackward", "the one-node path was not taken"
    y.backward(dy.to(y.dtype))
    grads = {n: p.grad for n, p in bam.named_parameters()}
    return y.detach(), x.grad, grads, {n: b.clone() for n, b in bam.named_buffers()}


def _compare(bam, x, dy=None, rtol=1e-4, atol=1e-5):
    reference = copy.deepcopy(bam).double()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) if dy is None else dy
    got = _step(bam, x, False, dy)
    want = _step(reference, x.double(), True, dy.double())
    torch.testing.assert_close(got[0].double(), want[0], rtol=rtol, atol=atol)
    if x.requires_grad:
        torch.testing.assert_close(got[1].double(), want[1], rtol=rtol, atol=atol)
    assert got[2].keys() == want[2].keys()
    # float32 rounding scales with the largest gradient of the block: a BatchNorm-cancelled gradient (fc1.bias,
    # exactly 0 in float64) comes out as a few 1e-6 of it in float32, through the modules just the same
    scale = max(g.abs().max().item() for g in want[2].values() if g is not None)
    atol = max(atol, 1e-5 * scale)
    for name in got[2]:
        if want[2][name] is None:
            assert got[2][name] is None, name
        else:
            torch.testing.assert_close(got[2][name].double(), want[2][name], rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{name}: {m}")
    for name in got[3]:
        torch.testing.assert_close(got[3][name].double(), want[3][name].double(), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("channels,shape", [
    (16, (4, 16, 12, 12)),    # rd_channels 1 (bam_resnet20's first BAM): native few-channel convs
    (32, (3, 32, 9, 11)),     # rd_channels 2, non-square
    (64, (2, 64, 7, 7)),      # rd_channels 4, map smaller than twice the dilation
    (256, (2, 256, 20, 20)),  # ResNet-50's first BAM, conv_reduce on a >= 400-pixel map
    (32, (2, 32, 1, 1)),      # 1x1 maps
    (128, (2, 128, 6, 6)),    # rd_channels 8 on a small map: conv_reduce through oneDNN, not a matmul
])
def test_one_node_step_matches_modules(channels, shape):
    torch.manual_seed(0)
    bam = BAM(channels).train()
    randomise_bn(bam)
    _compare(bam, torch.randn(shape, requires_grad=True))


@pytest.mark.parametrize("num_dilated_convs", [0, 1, 3])
def test_one_node_step_any_depth(num_dilated_convs):
    torch.manual_seed(0)
    bam = BAM(32, num_dilated_convs=num_dilated_convs, dilation=2).train()
    _compare(bam, torch.randn(2, 32, 8, 8, requires_grad=True))


def test_one_node_step_with_batch_one_uses_running_stats():
    torch.manual_seed(0)
    bam = BAM(32).train()
    randomise_bn(bam)
    _compare(bam, torch.randn(1, 32, 6, 6, requires_grad=True))


def test_one_node_step_of_a_folded_block_in_eval_mode():
    """After fuse_for_inference conv_reduce has a bias and act_reduce follows it directly (in place);
    gradients in eval mode (e.g. saliency maps) still go through the node and match."""
    torch.manual_seed(0)
    bam = BAM(32, num_dilated_convs=0)
    randomise_bn(bam)
    fuse_for_inference(bam)
    assert bam.spatial_attn.body.conv_reduce.bias is not None
    _compare(bam, torch.randn(2, 32, 5, 5, requires_grad=True))


def test_saturated_logits_fall_back_inside_the_node():
    """Logits beyond the native kernels' +-40 take the ATen gate; the node still matches."""
    torch.manual_seed(0)
    bam = BAM(32).train()
    with torch.no_grad():
        bam.channel_attn.fc2.bias.fill_(60.0)
    _compare(bam, torch.randn(2, 32, 6, 6, requires_grad=True))


def test_frozen_parameters_and_input_without_grad():
    """Fine-tuning with part of the block frozen, and an input that needs no gradient."""
    torch.manual_seed(0)
    bam = BAM(32).train()
    for p in bam.channel_attn.parameters():
        p.requires_grad_(False)
    bam.spatial_attn.body.conv_reduce.weight.requires_grad_(False)
    _compare(bam, torch.randn(2, 32, 6, 6))


def test_autograd_grad_sees_every_parameter():
    """The parameters are inputs of the node, so the functional API (and DDP's graph walk) finds them."""
    torch.manual_seed(0)
    bam = BAM(16).train()
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    y = bam(x)
    assert type(y.grad_fn).__name__ == "BamBlockFunctionBackward"
    grads = torch.autograd.grad(y.square().sum(), [x] + list(bam.parameters()))
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in bam.parameters())  # nothing accumulated behind the caller's back


def test_double_backward_says_how():
    """create_graph=True (gradient penalties) gets a message naming the fix, and the fix works."""
    bam = BAM(16).train()
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="reference_kernels"):
        torch.autograd.grad(bam(x).square().sum(), x, create_graph=True)
    with reference_kernels():
        (grad_x,) = torch.autograd.grad(bam(x).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    assert all(p.grad is not None for p in bam.parameters())


def test_hooks_on_the_branches_keep_the_module_path():
    bam = BAM(16).train()
    seen = []
    bam.channel_attn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    y = bam(torch.randn(2, 16, 4, 4, requires_grad=True))
    assert seen == [torch.Size([2, 16, 1, 1])]
    assert type(y.grad_fn).__name__ != "BamBlockFunctionBackward"


def test_model_training_step_matches_reference():
    """A whole bam_resnet20 step: every gradient equals the module-by-module float64 step."""
    import bam_zoo

    torch.manual_seed(0)
    model = bam_zoo.create_model("bam_resnet20", in_chans=1, num_classes=10).train()
    reference = copy.deepcopy(model).double()
    x, target = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 5, 9])
    torch.nn.functional.cross_entropy(model(x), target).backward()
    with reference_kernels():
        torch.nn.functional.cross_entropy(reference(x.double()), target).backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_small_maps_keep_the_module_path(monkeypatch):
    """Below _NODE_MIN_PIXELS the node costs more than it saves (measured), so the modules run."""
    monkeypatch.setattr(bam_training, "_NODE_MIN_PIXELS", 400)
    bam = BAM(16).train()
    small = bam(torch.randn(2, 16, 14, 14, requires_grad=True))
    large = bam(torch.randn(2, 16, 20, 20, requires_grad=True))
    assert type(small.grad_fn).__name__ != "BamBlockFunctionBackward"
    assert type(large.grad_fn).__name__ == "BamBlockFunctionBackward"
