"""Every registered BAM architecture: placement, channels, timm round trips, paper parameter counts."""
import pytest
import timm
import torch

import bam_zoo
from bam_zoo import BAM_ARCHS, BAM_PLACEMENT
from bam_zoo.errors import UnknownModelError, UnknownPretrainedTagError

ALL_BAM = bam_zoo.list_models()
CIFAR_BAM = [n for n in ALL_BAM if BAM_ARCHS[n] == "cifar_resnet"]
IMAGENET_BAM = [n for n in ALL_BAM if BAM_ARCHS[n] != "cifar_resnet"]
# A cheap representative per family for the heavier checks.
SMALL = ["bam_resnet20", "bam_resnet18", "bam_mobilenetv2_100", "bam_efficientnet_b0"]


def _input(name: str, batch: int = 2) -> torch.Tensor:
    """An input in the default cfg's channels (bam_resnet20's default tag is 1-channel Fashion-MNIST)."""
    size = 32 if BAM_ARCHS[name] == "cifar_resnet" else 64
    in_chans = timm.models.get_pretrained_cfg(name).input_size[0]
    return torch.randn(batch, in_chans, size, size)


def test_registry_lists_every_required_arch():
    required = {
        "bam_resnet18", "bam_resnet34", "bam_resnet50", "bam_resnet101", "bam_resnet152", "bam_wide_resnet50_2",
        "bam_wide_resnet101_2", "bam_resnext50_32x4d", "bam_resnext101_32x8d", "bam_mobilenetv2_100",
        "bam_efficientnet_b0", "bam_resnet20", "bam_resnet32", "bam_resnet44", "bam_resnet56", "bam_resnet110",
    }
    assert set(ALL_BAM) == required
    assert set(timm.list_models("bam_*")) == required | {"bam_inserted"}  # add_bam's exports rebuild through it
    assert set(bam_zoo.list_models(include_baselines=True)) == required | {
        "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"}
    assert bam_zoo.list_models("bam_resnet1*") == ["bam_resnet101", "bam_resnet110", "bam_resnet152", "bam_resnet18"]


@pytest.mark.parametrize("name", ALL_BAM)
def test_bam_sits_at_every_bottleneck(name):
    """One BAM per stage that is followed by a downsampling (not the stem, not the last stage)."""
    # RGB both: a default tag may be a grey Fashion-MNIST weight that only one of the pair has
    model = bam_zoo.create_model(name, in_chans=3)
    twin = timm.create_model(name[len("bam_"):], in_chans=3, num_classes=model.num_classes)
    info = twin.feature_info
    stages = [f for f in info if f["module"] not in ("act1", "blocks.0")]  # the stem is no bottleneck
    expected = [f["module"] for f, nxt in zip(stages, stages[1:]) if nxt["reduction"] > f["reduction"]]
    assert list(BAM_PLACEMENT[BAM_ARCHS[name]].stages) == expected
    bams = bam_zoo.bam_modules(model)
    assert [n for n, _ in bams] == [f"{m}.bam" for m in expected]
    channels = {f["module"]: f["num_chs"] for f in info}
    assert [b.channels for _, b in bams] == [channels[m] for m in expected]
    assert all(b.rd_channels == max(1, int(b.channels / 16 + 0.5)) and b.fusion == "sum" for _, b in bams)
    # Everything else is the twin, unchanged.
    bam_free = {k: v.shape for k, v in model.state_dict().items() if ".bam." not in k}
    assert bam_free == {k: v.shape for k, v in twin.state_dict().items()}


@pytest.mark.parametrize("name, expected_m", [
    ("bam_resnet18", 11.71), ("bam_resnet50", 25.92), ("bam_resnet101", 44.91),
])
def test_parameter_counts_match_paper(name, expected_m):
    params = bam_zoo.count_params(bam_zoo.create_model(name, num_classes=1000))
    assert abs(params / 1e6 - expected_m) <= 0.01


@pytest.mark.parametrize("name, expected_m", [
    ("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.7),
])
def test_cifar_baselines_match_he_et_al(name, expected_m):
    """He et al. 2016, Table 6 (rounded to two significant digits there)."""
    params = bam_zoo.count_params(bam_zoo.create_model(name)) / 1e6
    assert abs(params - expected_m) / expected_m < 0.02


@pytest.mark.parametrize("name", IMAGENET_BAM + CIFAR_BAM)
def test_forward_shapes_and_finite(name):
    model = bam_zoo.create_model(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(_input(name))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", SMALL)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = bam_zoo.create_model(name, num_classes=4).train()
    # A one-channel BN followed by conv + BN is scale-invariant, so with zero bias its gamma has an exactly
    # zero gradient at init (bam_resnet20's first BAM has C/r = 1). Random biases lift that symmetry.
    for _, bam in bam_zoo.bam_modules(model):
        for m in bam.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.bias.data.normal_(0, 0.1)
    model(_input(name, batch=3)).logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    missing = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    # timm zero-inits each residual block's last BN gamma, so its conv gets no gradient at step 0; and a
    # bias right before a training-mode BatchNorm (BAM's fc1, kept for official-code compatibility) has an
    # exactly zero gradient, as the BatchNorm subtracts the batch mean.
    missing = [n for n in missing if (not n.startswith(("layer", "blocks")) or ".bam." in n)
               and not n.endswith("channel_attn.fc1.bias")]
    assert missing == []


@pytest.mark.parametrize("name", SMALL)
def test_features_only_carries_bam_refinement(name):
    torch.manual_seed(0)
    model = bam_zoo.create_model(name).eval()
    torch.manual_seed(0)  # same construction order, so the same weights
    features = bam_zoo.create_model(name, features_only=True).eval()
    x = _input(name)
    outputs = {}
    hooks = [bam.register_forward_hook(lambda m, i, o, n=n: outputs.update({n: o}))
             for n, bam in bam_zoo.bam_modules(model)]
    with torch.no_grad():
        model(x)
        feats = features(x)
    for h in hooks:
        h.remove()
    assert [f.shape[1] for f in feats] == features.feature_info.channels()
    by_module = dict(zip(features.feature_info.module_name(), feats))
    for bam_name, out in outputs.items():
        stage = bam_name[: -len(".bam")]
        key = stage if stage in by_module else stage.replace(".", "_")
        torch.testing.assert_close(by_module[key], out)


@pytest.mark.parametrize("name", ["bam_resnet20", "bam_resnet18", "bam_efficientnet_b0"])
def test_timm_model_api(name):
    model = timm.create_model(name, in_chans=1, num_classes=3, drop_rate=0.2, drop_path_rate=0.1)
    x = _input(name)[:, :1]
    feats = model.forward_features(x)
    assert feats.shape[1] == model.num_features
    assert model.forward_head(feats).shape == (2, 3)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.drop_rate == 0.2
    assert any(isinstance(m, timm.layers.DropPath) for m in model.modules())
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] + ".weight" in model.state_dict()
    assert cfg["classifier"] + ".weight" in model.state_dict()
    assert model.state_dict()[cfg["first_conv"] + ".weight"].shape[1] == 1
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ["bam_resnet20", "resnet56"])
def test_cifar_resnet_new_head_follows_the_network(name):
    """reset_classifier builds the head on the network's device and dtype, in its mode, keeping the pool type (as
    timm's own networks do; timm's battery checks it on the meta device)."""
    model = bam_zoo.create_model(name, num_classes=10, global_pool="max").eval().to(dtype=torch.float64)
    model.reset_classifier(3)
    assert model.fc.weight.dtype == torch.float64 and not model.fc.training and not model.global_pool.training
    assert model.global_pool.pool_type == "max"
    model.train().to(device="meta")
    model.reset_classifier(0)
    model.reset_classifier(5, global_pool="avg")
    assert model.fc.weight.device.type == "meta" and model.fc.training and model.global_pool.pool_type == "avg"


def test_bam_args_reach_every_block():
    model = bam_zoo.create_model("bam_resnet20", bam_args=dict(fusion="product", dilation=2))
    assert all(b.fusion == "product" and b.spatial_attn.body.conv0.dilation == (2, 2)
               for _, b in bam_zoo.bam_modules(model))


def test_create_model_matches_timm():
    torch.manual_seed(0)
    a = bam_zoo.create_model("bam_resnet20")
    torch.manual_seed(0)
    b = timm.create_model("bam_resnet20")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_unknown_name_suggests_close_names():
    with pytest.raises(UnknownModelError, match=r"Unknown model 'bam_resnet2'\. Did you mean: .*bam_resnet20") as e:
        bam_zoo.create_model("bam_resnet2")
    assert isinstance(e.value, ValueError) and "bam_resnet20" in e.value.suggestions
    with pytest.raises(UnknownModelError, match="bam_efficientnet_b0"):
        bam_zoo.create_model("bam_efficentnet_b0")


def test_unknown_tag_lists_available_tags():
    with pytest.raises(UnknownPretrainedTagError, match="Unknown pretrained tag 'nope' for 'resnet18'.*a1_in1k"):
        bam_zoo.create_model("resnet18.nope")


@pytest.mark.parametrize("stride", [1, 2])
def test_zero_pad_shortcut_is_option_a_and_keeps_channels_last_gradients(stride):
    """The CIFAR ResNets' option-A shortcut subsamples and zero-pads; in a channels_last network the gradient it
    hands back (summed with the convolution path's) stays channels_last, so the layer below (BAM, or the plain
    block's ReLU) gets no NCHW gradient to convert or to iterate in mixed layouts."""
    from bam_zoo.models.cifar_resnet import ZeroPadShortcut
    shortcut = ZeroPadShortcut(16, 32, stride)
    x = torch.randn(4, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, 16))
    assert torch.equal(shortcut(x), expected)

    conv = torch.nn.Conv2d(16, 32, 3, stride, 1).to(memory_format=torch.channels_last)
    leaf = x.clone().requires_grad_()
    mid = leaf * 1.0  # a non-leaf, as a block's input is
    layouts = []
    mid.register_hook(lambda grad: layouts.append(grad.is_contiguous(memory_format=torch.channels_last)))
    (conv(mid) + shortcut(mid)).square().sum().backward()
    assert layouts == [True]
