"""The BAM block: paper semantics, the edge cases the official code gets wrong, export paths, bad input."""
import copy
import io

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import bam_zoo
from _helpers import randomise_bn
from bam_zoo.layers import BAM, SingleSampleSafeBatchNorm1d, SingleSampleSafeBatchNorm2d, bam_cpu


def _independent_bam(bam: BAM, x: torch.Tensor, training: bool = False) -> torch.Tensor:
    """The paper's equations written out from the block's own parameters: BatchNorm with batch statistics in
    training (biased variance), running ones in eval; any dilation and number of dilated convolutions."""
    ca, body = bam.channel_attn, bam.spatial_attn.body

    def bn(m, t):
        shape = (1, -1) + (1,) * (t.dim() - 2)
        dims = [d for d in range(t.dim()) if d != 1]
        mean, var = ((t.mean(dims), t.var(dims, unbiased=False)) if training
                     else (m.running_mean, m.running_var))
        return (t - mean.view(shape)) / torch.sqrt(var.view(shape) + m.eps) * m.weight.view(shape) + m.bias.view(shape)

    pooled = x.flatten(2).mean(-1)
    mc = F.linear(torch.relu(bn(ca.bn, F.linear(pooled, ca.fc1.weight, ca.fc1.bias))), ca.fc2.weight, ca.fc2.bias)
    h = torch.relu(bn(body.bn_reduce, F.conv2d(x, body.conv_reduce.weight)))
    i = 0
    while hasattr(body, f"conv{i}"):
        conv = getattr(body, f"conv{i}")
        h = torch.relu(bn(getattr(body, f"bn{i}"), F.conv2d(h, conv.weight, padding=conv.dilation,
                                                            dilation=conv.dilation)))
        i += 1
    ms = F.conv2d(h, body.conv_final.weight, body.conv_final.bias)
    mc = mc[:, :, None, None]
    logits = mc * ms if bam.fusion == "product" else mc + ms
    return x + x * torch.sigmoid(logits)


@pytest.mark.parametrize("dilation,num_dilated_convs", [(4, 2), (2, 1), (2, 3)])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("fusion", ["sum", "product"])
@pytest.mark.parametrize("hw", [(12, 12), (9, 14)])
def test_matches_paper_equations(fusion, hw, training, dilation, num_dilated_convs):
    torch.manual_seed(0)
    bam = BAM(32, fusion=fusion, dilation=dilation, num_dilated_convs=num_dilated_convs).train(training)
    randomise_bn(bam)
    assert len([m for m in bam.spatial_attn.body if isinstance(m, nn.Conv2d)]) == num_dilated_convs + 2
    x = torch.randn(3, 32, *hw)
    expected = _independent_bam(bam, x, training)
    torch.testing.assert_close(bam(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("fusion", ["sum", "product"])
@pytest.mark.parametrize("gate_layer", ["hard_sigmoid", "tanh", "sigmoid"])
def test_output_is_x_times_one_plus_gate_of_the_branches(gate_layer, fusion, training):
    """``y = x * (1 + gate(Mc (+ or *) Ms))`` from the block's own branches, for any gate: the sigmoid gate on the
    CPU fast path, other gates (hard_sigmoid's values cross 0.5 and stay in [0, 1]) on the definition."""
    torch.manual_seed(0)
    bam = BAM(16, gate_layer=gate_layer, fusion=fusion).train(training)
    randomise_bn(bam)
    with torch.no_grad():  # logits of a few units, so the gate spans its range
        bam.channel_attn.fc2.weight.mul_(4)
        bam.spatial_attn.body.conv_final.weight.mul_(4)
    x = torch.randn(2, 16, 7, 9)
    assert bam_cpu.cpu_fast_path_applies(bam, x) == (gate_layer == "sigmoid")
    branches = copy.deepcopy(bam)  # the branches update their running statistics in training too
    mc, ms = branches.channel_attn(x), branches.spatial_attn(x)
    assert mc.shape == (2, 16, 1, 1) and ms.shape == (2, 1, 7, 9)
    gate = branches.gate(mc * ms if fusion == "product" else mc + ms)
    assert gate.std() > 0.05  # the gate varies over the map: a wrong formula cannot hide in a constant
    torch.testing.assert_close(bam(x), x * (1 + gate), rtol=1e-5, atol=1e-5)
    for (name, b), b_ref in zip(bam.named_buffers(), branches.buffers()):
        torch.testing.assert_close(b, b_ref, msg=name)


def test_structure_follows_arguments():
    bam = BAM(64, rd_ratio=1 / 8, dilation=2, num_dilated_convs=3)
    assert bam.rd_channels == 8
    convs = [m for m in bam.spatial_attn.body if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (3, 3), (3, 3), (1, 1)]
    assert all(c.dilation == (2, 2) and c.padding == (2, 2) for c in convs[1:-1])
    assert convs[-1].out_channels == 1
    assert bam.channel_attn.fc1.out_features == 8 and bam.channel_attn.fc2.out_features == 64
    assert BAM(64, rd_channels=5).rd_channels == 5


def test_train_mode_uses_batch_statistics():
    """With >= 2 values per channel the BatchNorms are exactly nn.BatchNorm in training."""
    torch.manual_seed(0)
    bam = BAM(16).train()
    x = torch.randn(4, 16, 6, 6)
    pooled = bam.channel_attn.fc1(x.mean((2, 3)))
    ref = F.batch_norm(pooled, None, None, bam.channel_attn.bn.weight, bam.channel_attn.bn.bias, True)
    torch.testing.assert_close(bam.channel_attn.bn(pooled.clone()), ref)
    assert int(bam.channel_attn.bn.num_batches_tracked) == 1


def test_non_square_maps_pool_over_whole_map():
    """The official code pools a square H x H window; BAM here averages the full H x W map."""
    bam = BAM(8).eval()
    x = torch.zeros(1, 8, 4, 10)
    x[..., 6:] = 5.0  # only the part of the map beyond column H differs
    pooled = {}
    bam.channel_attn.fc1.register_forward_hook(lambda m, i, o: pooled.update(input=i[0]))
    bam(x)
    torch.testing.assert_close(pooled["input"], x.mean((2, 3)))


@pytest.mark.parametrize("shape", [(1, 16, 5, 7), (1, 16, 1, 1), (2, 16, 1, 1)])
def test_tiny_batches_and_maps_train(shape):
    """Batch size 1 and 1x1 maps train: one-value BatchNorms fall back to running stats, others don't."""
    torch.manual_seed(0)
    bam = BAM(16).train()
    before = {k: v.clone() for k, v in bam.state_dict().items() if "running" in k}
    x = torch.randn(*shape, requires_grad=True)
    y = bam(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    after = bam.state_dict()
    single_sample = shape[0] == 1
    # channel branch: one value per channel exactly when the batch has one sample
    assert torch.equal(before["channel_attn.bn.running_mean"], after["channel_attn.bn.running_mean"]) == single_sample
    # spatial branch: one value per channel only for a single 1x1 sample
    one_value = shape[0] * shape[2] * shape[3] == 1
    assert torch.equal(before["spatial_attn.body.bn_reduce.running_mean"],
                       after["spatial_attn.body.bn_reduce.running_mean"]) == one_value


def test_single_sample_bn_equals_eval_bn():
    bn = SingleSampleSafeBatchNorm1d(4)
    randomise_bn(bn)
    x = torch.randn(1, 4)
    out_train = bn.train()(x)
    torch.testing.assert_close(out_train, bn.eval()(x))
    assert isinstance(SingleSampleSafeBatchNorm2d(4), nn.BatchNorm2d)


@pytest.mark.parametrize("channels", [1, 2, 3, 7, 15, 16, 17])
def test_reduced_width_never_zero(channels):
    bam = BAM(channels)
    assert bam.rd_channels >= 1
    assert bam(torch.randn(2, channels, 5, 5)).shape == (2, channels, 5, 5)


@pytest.mark.parametrize("bad", [torch.randn(2, 8, 5), torch.randn(8, 5, 5), torch.randn(1, 2, 8, 5, 5)])
def test_non_4d_input_is_rejected(bad):
    with pytest.raises(ValueError, match=r"4-D input \(N, C, H, W\) with C=8, got shape"):
        BAM(8)(bad)


def test_wrong_channel_count_is_rejected():
    with pytest.raises(ValueError, match="built for 8 channels but got an input with 9 channels"):
        BAM(8)(torch.randn(2, 9, 4, 4))


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=0), "channels must be a positive int"),
    (dict(channels=8, fusion="mul"), "fusion must be one of"),
    (dict(channels=8, num_dilated_convs=-1), "num_dilated_convs must be >= 0"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BAM(**kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    torch.manual_seed(0)
    bam = BAM(32).train()
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    ref = bam.eval()(x)
    with torch.autocast("cpu", dtype=dtype):
        y = bam(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_timm_attn_layer_in_every_block():
    """BAM plugs into timm wherever it takes an attn_layer (CBAM-style placement)."""
    model = timm.create_model("resnet50", block_args=dict(attn_layer=BAM), num_classes=7)
    assert len(bam_zoo.bam_modules(model)) == 16  # 3 + 4 + 6 + 3 bottleneck blocks
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.layer4[2].se.channels == 2048  # timm puts attn_layer after the block's last conv


def test_capture_attention_is_free_when_off():
    torch.manual_seed(0)
    model = bam_zoo.create_model("bam_resnet20", in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    plain = model(x)
    with bam_zoo.capture_attention(model) as maps:
        captured = model(x)
    torch.testing.assert_close(captured, plain)
    assert set(maps) == {"layer1.bam", "layer2.bam"}
    assert maps["layer1.bam"].shape == (2, 16, 28, 28) and maps["layer2.bam"].shape == (2, 32, 14, 14)
    assert ((maps["layer1.bam"] > 0) & (maps["layer1.bam"] < 1)).all()
    # the map is what BAM multiplies by: y = x * (1 + map)
    bam = model.layer1.bam
    inp = {}
    h = bam.register_forward_hook(lambda m, i, o: inp.update(x=i[0], y=o))
    with bam_zoo.capture_attention(model) as maps:
        model(x)
    h.remove()
    torch.testing.assert_close(inp["y"], inp["x"] * (1 + maps["layer1.bam"]))
    assert all(b.attention_map is None and not b.store_attention for _, b in bam_zoo.bam_modules(model))
    with pytest.raises(ValueError, match="contains no BAM"):
        with bam_zoo.capture_attention(nn.Linear(2, 2)):
            pass


@pytest.fixture(scope="module")
def small_bam_net():
    torch.manual_seed(0)
    model = bam_zoo.create_model("bam_resnet20", in_chans=1).eval()
    randomise_bn(model)
    return model, torch.randn(2, 1, 28, 28)


def test_torchscript_trace_and_script(small_bam_net):
    model, x = small_bam_net
    ref = model(x)
    torch.testing.assert_close(torch.jit.trace(model, x)(x), ref)
    torch.testing.assert_close(torch.jit.script(model)(x), ref)


def test_torch_export(small_bam_net):
    model, x = small_bam_net
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(exported.module()(x), model(x))
    x5 = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(exported.module()(x5), model(x5))


def test_onnx_export_runs_in_onnxruntime(small_bam_net):
    ort = pytest.importorskip("onnxruntime")
    model, x = small_bam_net
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=True, verbose=False)
    session = ort.InferenceSession(buf.getvalue())
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-4)


def test_torch_compile_block():
    torch.manual_seed(0)
    bam = BAM(16).train()
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    compiled = torch.compile(bam, backend="eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, BAM.forward(bam, x))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
