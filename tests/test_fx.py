"""Every registered model is FX-traceable (forward and backward) and scriptable once traced, as timm's own are; so
timm's and torchvision's FX feature extraction work on BAM models. Traced graphs run BAM's plain definition, and
keep its input check as a leaf that runs on real shapes."""
import pytest
import timm
import torch
import torch.fx

import bam_zoo
from bam_zoo.layers import BAM, disable_cpu_fast_path
from bam_zoo.layers.bam import check_bam_input

ALL_MODELS = bam_zoo.list_models(include_baselines=True)


def test_every_bam_architecture_is_covered():
    assert set(bam_zoo.BAM_ARCHS) <= set(ALL_MODELS)
    assert {"resnet20", "resnet56", "resnet110"} <= set(ALL_MODELS)


def _close(got, want, tol=1e-4):
    """Traced graphs run the definition, eager float32 the CPU fast path: equal up to float32 rounding."""
    scale = max(want.detach().abs().max().item(), 1.0)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


def _bam_checks(graph: torch.fx.Graph) -> int:
    return sum(node.op == "call_function" and node.target is check_bam_input for node in graph.nodes)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_symbolic_trace_forward_backward_and_script(name):
    torch.manual_seed(0)
    model = bam_zoo.create_model(name, in_chans=3, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)

    traced = torch.fx.symbolic_trace(model)
    assert _bam_checks(traced.graph) == len(bam_zoo.bam_modules(model))
    with torch.no_grad():
        want = model(x)
        _close(traced(x), want)
        _close(torch.jit.script(traced)(x), want)

    # Training: against the eager definition (the traced graph runs it, op for op). Against the fast path the
    # float32 rounding differs, and BatchNorm over two values (batch 2 of 1x1 maps) amplifies it.
    model.train()
    traced_train = torch.fx.symbolic_trace(model)  # the graph shares the model's parameters and buffers
    disable_cpu_fast_path(model)
    x_eager, x_traced = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)  # the same dropout masks
    y_eager = model(x_eager)
    torch.manual_seed(1)
    y_traced = traced_train(x_traced)
    _close(y_traced, y_eager, 1e-5)
    y_eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    y_traced.square().sum().backward()
    _close_norm(x_traced.grad, x_eager.grad)
    for (pname, p), g in zip(model.named_parameters(), eager_grads):
        assert p.grad is not None, pname
        _close_norm(p.grad, g, pname)


def _close_norm(got, want, name="", tol=1e-4):
    """Gradients through a deep float32 net: close as whole tensors."""
    error = (got - want).norm().item()
    assert error <= tol * max(want.norm().item(), 1.0), f"{name}: error {error:.2e}, norm {want.norm().item():.2e}"


@pytest.mark.parametrize("name", ["bam_resnet20", "bam_resnet18", "bam_mobilenetv2_100", "bam_efficientnet_b0"])
def test_timm_fx_feature_extraction(name):
    """``features_only=True, feature_cls="fx"`` gives the same maps as timm's default feature wrapper."""
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    fx_features = bam_zoo.create_model(name, in_chans=3, features_only=True, feature_cls="fx").eval()
    torch.manual_seed(0)
    features = bam_zoo.create_model(name, in_chans=3, features_only=True).eval()
    for (name, a), b in zip(fx_features.state_dict().items(), features.state_dict().values()):
        assert torch.equal(a, b), name  # the same seed built the same weights
    with torch.no_grad():
        got, want = fx_features(x), features(x)
    assert len(got) == len(want) == len(features.feature_info.channels())
    for a, b in zip(got, want):
        _close(a, b)


def test_timm_create_feature_extractor_reaches_bam_outputs():
    model = bam_zoo.create_model("bam_resnet18", in_chans=3).eval()
    extractor = timm.models.create_feature_extractor(model, {"layer1.bam": "bam1", "layer3": "layer3"})
    out = extractor(torch.randn(2, 3, 32, 32))
    assert out["bam1"].shape == (2, 64, 8, 8) and out["layer3"].shape == (2, 256, 2, 2)


def test_torchvision_create_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = bam_zoo.create_model("bam_resnet20", in_chans=3).eval()
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: captured.update({n: o}))
               for n in ("layer1.bam", "layer2.bam")]
    with torch.no_grad():
        logits = model(x)
    for h in handles:
        h.remove()
    extractor = create_feature_extractor(model, {"layer1.bam": "bam1", "layer2.bam": "bam2", "fc": "logits"})
    with torch.no_grad():
        out = extractor(x)
    _close(out["bam1"], captured["layer1.bam"])
    _close(out["bam2"], captured["layer2.bam"])
    _close(out["logits"], logits)


def test_wrong_channel_count_raises_the_clear_error_eager_traced_and_scripted():
    bam = BAM(8).eval()
    traced = torch.fx.symbolic_trace(bam)
    assert _bam_checks(traced.graph) == 1
    bad = torch.randn(2, 9, 4, 4)
    message = "built for 8 channels but got an input with 9 channels"
    for run in (bam, traced):
        with pytest.raises(ValueError, match=message):
            run(bad)
    with pytest.raises(torch.jit.Error, match=message):  # TorchScript re-raises it as its own error type
        torch.jit.script(traced)(bad)
    with pytest.raises(ValueError, match=r"4-D input \(N, C, H, W\) with C=8"):
        traced(torch.randn(8, 4, 4))


def test_wrong_channel_count_in_a_traced_model():
    """A BAM of the wrong width inside a model: eager, traced and scripted graphs all raise the clear error."""
    model = bam_zoo.create_model("bam_resnet20", in_chans=3).eval()
    model.layer1.bam = BAM(17).eval()  # layer1 outputs 16 channels
    x = torch.randn(1, 3, 16, 16)
    message = "BAM was built for 17 channels but got an input with 16 channels"
    with pytest.raises(ValueError, match=message):
        model(x)
    traced = torch.fx.symbolic_trace(model)  # tracing sees no shapes: the check is a leaf that runs later
    with pytest.raises(ValueError, match=message):
        traced(x)
    with pytest.raises(torch.jit.Error, match=message):
        torch.jit.script(traced)(x)
