"""pytorchcv's and the official code's BAM checkpoints, converted: the same logits as the source model.

pytorchcv (0.0.74, a test dependency) builds the reference models with random weights; their BatchNorm
statistics are measured on random images (so activations stay O(1)) and then perturbed at random, and the
spatial convolutions get random biases, so every term of the conversion (renaming, placement, bias folding)
shows in the logits. No network: downloads are served from a ``file://`` URL.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from pytorchcv.model_provider import get_model

import bam_zoo
from bam_zoo.cli import main
from bam_zoo.errors import CheckpointKeysError, ChecksumMismatchError
from bam_zoo.models import pretrained as shipped
from bam_zoo.models.convert import convert_state_dict, from_official, from_pytorchcv

TAG = "bam_resnet50.imgclsmob_in1k"


def randomise(model: nn.Module, size: int = 64) -> nn.Module:
    """Random conv biases, BN statistics of random images, then perturbed; returns ``model`` in eval mode."""
    g = torch.Generator().manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
        for m in bns:
            m.momentum = 1.0  # running statistics := those of this batch
        model.train()(torch.randn(4, 3, size, size, generator=g))
        for m in bns:
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.1 * m.running_var.sqrt())
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.4 + 0.8)
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.6)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.momentum = 0.1
    return model.eval()


def pytorchcv_model(arch: str, size: int = 64) -> nn.Module:
    model = get_model(arch, pretrained=False)
    if size != 224:  # its AvgPool2d(7) is the global average at 224 px only
        model.features.final_pool = nn.AdaptiveAvgPool2d(1)
    return randomise(model, size)


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


def assert_same_logits(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    """Equal to float32 round-off: |a - b| <= 1e-5 + 1e-5 |b| for every logit."""
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bam_resnet18", "bam_resnet34", "bam_resnet50", "bam_resnet101"])
def test_pytorchcv_parity_float32_and_float64(arch: str) -> None:
    ref = pytorchcv_model(arch)
    x = torch.randn(2, 3, 64, 64)
    model = from_pytorchcv(ref.state_dict(), arch).eval()
    assert all(bam.fusion == "product" for _, bam in bam_zoo.bam_modules(model))
    assert_same_logits(model, ref, x)
    d32 = max_diff(model, ref, x)
    ref.double()  # float64 end to end: the folded means computed and stored in float64 too
    model.double().load_state_dict(convert_state_dict(ref.state_dict(), model, "pytorchcv"))
    d64 = max_diff(model, ref, x.double())
    print(f"{arch}: max |logit difference| float32 {d32:.2e}, float64 {d64:.2e}")
    assert d64 < 1e-12


def to_official(model: nn.Module, g: torch.Generator) -> dict:
    """``model``'s weights in the official code's documented layout: DataParallel prefix, wrapper, conv biases
    (folded the other way into the running means), and no BatchNorm counters (checkpoints of torch < 0.4.1)."""
    names = [("channel_attn.fc1.", "channel_att.gate_c.gate_c_fc_0."),
             ("channel_attn.bn.", "channel_att.gate_c.gate_c_bn_1."),
             ("channel_attn.fc2.", "channel_att.gate_c.gate_c_fc_final."),
             ("spatial_attn.body.conv_reduce.", "spatial_att.gate_s.gate_s_conv_reduce0."),
             ("spatial_attn.body.bn_reduce.", "spatial_att.gate_s.gate_s_bn_reduce0."),
             ("spatial_attn.body.conv_final.", "spatial_att.gate_s.gate_s_conv_final.")]
    names += [(f"spatial_attn.body.{a}{i}.", f"spatial_att.gate_s.gate_s_{b}_di_{i}.") for i in range(2)
              for a, b in (("conv", "conv"), ("bn", "bn"))]
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if ".bam." in key:
            stage, rest = key.split(".bam.")
            rest = next(new + rest[len(old):] for old, new in names if rest.startswith(old))
            key = f"bam{stage[-1]}.{rest}"
        state["module." + key] = value.clone()
    for key in [k for k in state if "gate_s_bn_" in k and k.endswith("running_mean")]:
        bias = torch.randn(state[key].shape, generator=g)
        state[key.replace("gate_s_bn_", "gate_s_conv_").replace("running_mean", "bias")] = bias
        state[key] += bias  # BN(conv(x) + b) with mean m + b is BN(conv(x)) with mean m
    return {"state_dict": state, "epoch": 90, "best_prec1": torch.tensor(77.0), "arch": "resnet"}


def test_official_checkpoint_converts_by_function_cli_and_on_load(tmp_path: Path) -> None:
    source = randomise(bam_zoo.create_model("bam_resnet18", bam_args=dict(fusion="product")))
    checkpoint = to_official(source, torch.Generator().manual_seed(1))
    for documented in ("module.layer1.0.conv1.weight", "module.bam1.channel_att.gate_c.gate_c_fc_0.weight",
                       "module.bam1.channel_att.gate_c.gate_c_bn_1.running_mean",
                       "module.bam1.spatial_att.gate_s.gate_s_conv_reduce0.bias",
                       "module.bam3.spatial_att.gate_s.gate_s_bn_di_1.weight", "module.fc.weight"):
        assert documented in checkpoint["state_dict"]
    path = tmp_path / "model_best.pth.tar"
    torch.save(checkpoint, path)
    x = torch.randn(2, 3, 64, 64)
    assert_same_logits(from_official(checkpoint, "bam_resnet18").eval(), source, x)

    main(["convert", "--source", "official", "--checkpoint", str(path), "--model", "bam_resnet18",
          "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_args"]["bam_args"] == {"fusion": "product"}
    exported = bam_zoo.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert_same_logits(exported, source, x)

    on_load = bam_zoo.create_model("bam_resnet18", pretrained=True, bam_args=dict(fusion="product"),
                                   pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert_same_logits(on_load, source, x)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """pytorchcv's bam_resnet50 as published (its own pooling, 224 px), saved as a plain state dict."""
    ref = pytorchcv_model("bam_resnet50", size=224)
    path = tmp_path_factory.mktemp("pytorchcv") / "bam_resnet50-0547-a04adf3c.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_tag_converts_a_local_pytorchcv_file(resnet50_file) -> None:
    ref, path = resnet50_file
    model = bam_zoo.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert_same_logits(model, ref, torch.randn(1, 3, 224, 224))
    cfg = model.pretrained_cfg
    assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]) == ((3, 224, 224), 0.875, "bilinear")
    assert model._model_args["bam_args"] == {"fusion": "product"}
    assert sum(p.numel() for p in model.parameters()) == shipped.WEIGHT_METADATA[TAG]["num_params"]
    head = bam_zoo.create_model(TAG, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
    assert head.fc.out_features == 10 and torch.equal(head.layer3.bam.channel_attn.fc1.weight,
                                                      model.layer3.bam.channel_attn.fc1.weight)


def test_tag_downloads_once_checks_sha1_and_reads_the_zip(resnet50_file, tmp_path: Path, monkeypatch) -> None:
    ref, pth = resnet50_file
    published = tmp_path / "release" / "bam_resnet50-0547-a04adf3c.pth.zip"
    published.parent.mkdir()
    with zipfile.ZipFile(published, "w") as archive:
        archive.write(pth, pth.name)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    overlay = dict(url=published.as_uri())
    cached = tmp_path / "hub" / "checkpoints" / published.name
    with pytest.raises(OSError) as info:  # unreachable: says where a copy goes
        bam_zoo.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(url=(tmp_path / "nowhere.zip").as_uri()))
    assert f"copy nowhere.zip to {tmp_path / 'hub' / 'checkpoints'}" in info.value.__notes__[0]
    expected = shipped.WEIGHT_METADATA[TAG]["sha1"]
    with pytest.raises(ChecksumMismatchError, match=f"has sha1 .*{expected}.*Delete {re.escape(str(cached))}"):
        bam_zoo.create_model(TAG, pretrained=True, pretrained_cfg_overlay=overlay)  # not the published file
    sha1 = hashlib.sha1(published.read_bytes()).hexdigest()
    monkeypatch.setitem(shipped.WEIGHT_METADATA, TAG, {**shipped.WEIGHT_METADATA[TAG], "sha1": sha1})
    published.unlink()  # served from the cache now
    model = bam_zoo.create_model(TAG, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    assert_same_logits(model, ref, torch.randn(1, 3, 224, 224))


def test_cli_reads_the_zip_and_lists_what_does_not_fit(tmp_path: Path, capsys) -> None:
    ref = pytorchcv_model("bam_resnet18")
    path = tmp_path / "bam_resnet18.pth"
    torch.save(ref.state_dict(), path)
    with zipfile.ZipFile(tmp_path / "bam_resnet18.pth.zip", "w") as archive:
        archive.write(path, path.name)
    main(["convert", "--source", "pytorchcv", "--checkpoint", str(tmp_path / "bam_resnet18.pth.zip"),
          "--model", "bam_resnet18", "--out", str(tmp_path / "out")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    exported = bam_zoo.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert_same_logits(exported, ref, torch.randn(2, 3, 64, 64))

    with pytest.raises(SystemExit) as info:
        main(["convert", "--source", "pytorchcv", "--checkpoint", str(path), "--model", "bam_resnet34",
              "--out", str(tmp_path / "wrong")])
    err = capsys.readouterr().err
    assert info.value.code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "does not fit bam_resnet34" in err and "missing (layer1.2.conv1.weight" in err
    assert not (tmp_path / "wrong").exists()

    with pytest.raises(SystemExit):
        main(["convert", "--source", "pytorchcv", "--checkpoint", str(path), "--model", "resnet18", "--out", "x"])
    assert "ResNets: pass the bam-zoo model they were trained as" in capsys.readouterr().err

    state = {**ref.state_dict(), "features.stage9.extra.weight": torch.zeros(1)}
    state["output.weight"] = state["output.weight"][:, :3]
    del state["features.stage2.unit1.bam.sp_att.final_conv.bias"]
    with pytest.raises(CheckpointKeysError) as info:
        from_pytorchcv(state, "bam_resnet18")
    assert info.value.unexpected == ["features.stage9.extra.weight"]
    assert info.value.missing == ["layer1.bam.spatial_attn.body.conv_final.bias"]
    assert info.value.misshaped == ["output.weight (1000, 3) (bam-zoo fc.weight (1000, 512))"]


def test_foreign_weights_refuse_a_model_that_sums(tmp_path: Path) -> None:
    path = tmp_path / "bam_resnet18.pth"
    torch.save(get_model("bam_resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match=r"fusion='product'"):
        bam_zoo.create_model("bam_resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
