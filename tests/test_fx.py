"""Traced, exported and compiled graphs compute exactly what eager mode computes.

Every registered model is FX-traceable (forward and backward) and scriptable once traced, as timm's own are, so
timm's and torchvision's FX feature extraction work on BAM models. A traced graph holds each BAM as one op,
``bam_zoo::bam_forward``, that runs the same implementation as eager mode: outputs, gradients and running
statistics are bitwise equal (timm's ``test_model_forward_fx`` compares with ``==``). ``torch.jit.trace``,
``torch.export`` and ``torch.compile`` hold the same op; ONNX export, which has no such op, takes the definition.
"""
import copy
import io
import re

import pytest
import timm
import torch
import torch.fx
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import bam_zoo
from bam_zoo.layers import BAM, disable_cpu_fast_path
from bam_zoo.layers.bam import check_bam_input

ALL_MODELS = bam_zoo.list_models(include_baselines=True)
BAM_OP = torch.ops.bam_zoo.bam_forward


def test_every_bam_architecture_is_covered():
    assert set(bam_zoo.BAM_ARCHS) <= set(ALL_MODELS)
    assert {"resnet20", "resnet56", "resnet110"} <= set(ALL_MODELS)


def _count(graph: torch.fx.Graph, target) -> int:
    return sum(node.op == "call_function" and node.target in (target, getattr(target, "default", None))
               for node in graph.nodes)


def _assert_equal(got, want, name=""):
    assert got.shape == want.shape and torch.equal(got, want), \
        f"{name}: max difference {(got - want).abs().max().item():.3e}"


def _train_step(model, x):
    """Output, input gradient, parameter gradients and buffers after one step of ``model`` on a copy of ``x``."""
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_symbolic_trace_is_exact_forward_backward_and_scripted(name):
    torch.manual_seed(0)
    model = bam_zoo.create_model(name, in_chans=3, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)

    traced = torch.fx.symbolic_trace(model)
    bams = len(bam_zoo.bam_modules(model))
    assert _count(traced.graph, check_bam_input) == bams and _count(traced.graph, BAM_OP) == bams
    with torch.no_grad():
        want = model(x)
        _assert_equal(traced(x), want, "traced")
        _assert_equal(torch.jit.script(traced)(x), want, "scripted")

    # Training: a graph traced from a copy of the model against the model itself.
    model.train()
    twin = torch.fx.symbolic_trace(copy.deepcopy(model))
    torch.manual_seed(1)  # the same dropout masks
    got = _train_step(twin, x)
    torch.manual_seed(1)
    want = _train_step(model, x)
    _assert_equal(got[0], want[0], "output")
    _assert_equal(got[1], want[1], "input grad")
    for key in got[2]:  # a graph holds the parameters and buffers it uses, under the model's names
        _assert_equal(got[2][key], want[2][key], key)
    for key in got[3]:
        _assert_equal(got[3][key], want[3][key], key)


def _timm_fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """The graph timm's ``tests/test_models.py::test_model_forward_fx`` builds: torchvision's feature extractor with
    timm's leaf modules and functions, returning the last node."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                    eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", bam_zoo.BAM_ARCHS)
def test_timm_forward_fx_check_holds_on_every_bam_architecture(name):
    """timm's check, on each BAM architecture: eval mode, batch 1, the FX graph's output ``==`` eager's."""
    model = bam_zoo.create_model(name).eval()
    size = min(model.pretrained_cfg["input_size"][-1], 64)
    with torch.no_grad():
        inputs = torch.randn(1, model.pretrained_cfg["input_size"][0], size, size)
        outputs = model(inputs)
        fx_outputs = tuple(_timm_fx_model(model)(inputs).values())[0]
    assert outputs.shape == fx_outputs.shape
    assert torch.all(fx_outputs == outputs)


@pytest.mark.parametrize("name", ["bam_resnet20", "bam_resnet18", "bam_mobilenetv2_100", "bam_efficientnet_b0"])
def test_timm_fx_feature_extraction(name):
    """``features_only=True, feature_cls="fx"`` gives exactly the maps of timm's default feature wrapper."""
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    fx_features = bam_zoo.create_model(name, in_chans=3, features_only=True, feature_cls="fx").eval()
    torch.manual_seed(0)
    features = bam_zoo.create_model(name, in_chans=3, features_only=True).eval()
    state = features.state_dict()
    for key, value in fx_features.state_dict().items():  # the same seed built the same weights
        key = re.sub(r"^blocks\.(\d+)\.", r"blocks_\1.", key.removeprefix("graph_module."))  # timm's stage names
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        got, want = fx_features(x), features(x)
    assert len(got) == len(want) == len(features.feature_info.channels())
    for a, b in zip(got, want):
        _assert_equal(a, b)


def test_timm_create_feature_extractor_reaches_bam_outputs():
    model = bam_zoo.create_model("bam_resnet18", in_chans=3).eval()
    extractor = timm.models.create_feature_extractor(model, {"layer1.bam": "bam1", "layer3": "layer3"})
    out = extractor(torch.randn(2, 3, 32, 32))
    assert out["bam1"].shape == (2, 64, 8, 8) and out["layer3"].shape == (2, 256, 2, 2)


def test_torchvision_create_feature_extractor():
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
    _assert_equal(out["bam1"], captured["layer1.bam"])
    _assert_equal(out["bam2"], captured["layer2.bam"])
    _assert_equal(out["logits"], logits)


def _block(train: bool, identity_init: bool = False, channels: int = 16) -> BAM:
    torch.manual_seed(0)
    bam = BAM(channels, identity_init=identity_init).train(train)
    if identity_init:
        with torch.no_grad():
            bam.gamma.normal_()
    return bam


@pytest.mark.parametrize("identity_init", [False, True], ids=["paper", "identity_init"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_traced_block_runs_the_op_on_other_inputs_as_the_definition(train, identity_init):
    """A graph traced for float32 CPU maps, run on a strided view or in float64, computes the definition inside the
    op: exactly what the eager module (which then runs its definition) computes."""
    bam = _block(train, identity_init)
    x = torch.randn(2, 16, 8, 16)[..., ::2]
    for dtype in (torch.float32, torch.float64):
        traced = torch.fx.symbolic_trace(copy.deepcopy(bam)).to(dtype)
        got, want = _train_step(traced, x.to(dtype)), _train_step(copy.deepcopy(bam).to(dtype), x.to(dtype))
        for a, b in zip(got[:2], want[:2]):
            _assert_equal(a, b, str(dtype))
        for key in got[2]:
            _assert_equal(got[2][key], want[2][key], key)


def test_traced_fused_block_backpropagates_as_eager():
    """A fused BAM has no BatchNorm, so the op gets an empty list of floats: its backward must still match it."""
    bam = bam_zoo.fuse_for_inference(_block(train=False))
    traced = torch.fx.symbolic_trace(copy.deepcopy(bam))
    assert _count(traced.graph, BAM_OP) == 1
    x = torch.randn(2, 16, 8, 8)
    got, want = _train_step(traced, x), _train_step(bam, x)
    for a, b, name in zip(got[:2], want[:2], ("output", "input gradient")):
        _assert_equal(a, b, name)
    frozen = {n for n, p in bam.named_parameters() if not p.requires_grad}  # biases torch's folding added
    assert frozen and all(got[2][n] is None for n in frozen)
    for key in want[2].keys() - frozen:
        _assert_equal(got[2][key], want[2][key], key)


def test_graph_traced_after_disable_holds_the_definition():
    model = disable_cpu_fast_path(bam_zoo.create_model("bam_resnet20", in_chans=3).eval())
    traced = torch.fx.symbolic_trace(model)
    assert _count(traced.graph, BAM_OP) == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _assert_equal(traced(x), model(x))


def test_jit_trace_and_export_hold_the_op_and_are_exact():
    torch.manual_seed(0)
    model = bam_zoo.create_model("bam_resnet20", in_chans=1).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
        _assert_equal(traced(x), want, "jit.trace")
        assert "bam_zoo::bam_forward" in str(traced.inlined_graph)
        batch = torch.export.Dim("batch", min=1, max=64)
        exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        assert _count(exported.graph, BAM_OP) == 2
        _assert_equal(exported.module()(x), want, "export")
        x5 = torch.randn(5, 1, 28, 28)
        _assert_equal(exported.module()(x5), model(x5), "export, other batch")


@pytest.mark.parametrize("identity_init", [False, True], ids=["paper", "identity_init"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compiled_block_is_one_opaque_op_with_eager_numbers(train, identity_init):
    """Under ``torch.compile`` (inductor) BAM is the op, not decomposed: a compiled block gives eager's output,
    gradients and running statistics bitwise."""
    bam = _block(train, identity_init, channels=32)
    twin = _block(train, identity_init, channels=32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(twin, backend=backend, fullgraph=True)
    x = torch.randn(4, 32, 9, 9)
    got, want = _train_step(compiled, x), _train_step(bam, x)
    got = got[:2] + tuple({k.removeprefix("_orig_mod."): v for k, v in d.items()} for d in got[2:])
    assert _count(graphs[0].graph, BAM_OP) == 1
    assert not any("sigmoid" in str(node.target) for node in graphs[0].graph.nodes)
    for a, b in zip(got[:2], want[:2]):
        _assert_equal(a, b)
    for key in got[2]:  # a graph holds the parameters and buffers it uses, under the model's names
        _assert_equal(got[2][key], want[2][key], key)
    for key in got[3]:
        _assert_equal(got[3][key], want[3][key], key)


def test_onnx_export_takes_the_definition():
    """ONNX has no ``bam_zoo`` op: the exporter gets the definition's standard ops, equal to eager up to float32
    rounding."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = bam_zoo.create_model("bam_resnet20", in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=True, verbose=False)
    ops = {node.op_type for node in onnx.load_from_string(buf.getvalue()).graph.node}
    assert {"Sigmoid", "Conv", "ReduceMean"} <= ops and not any("bam" in op.lower() for op in ops)
    session = ort.InferenceSession(buf.getvalue())
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-5, atol=1e-5)


def test_wrong_channel_count_raises_the_clear_error_eager_traced_and_scripted():
    bam = BAM(8).eval()
    traced = torch.fx.symbolic_trace(bam)
    assert _count(traced.graph, check_bam_input) == 1
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
