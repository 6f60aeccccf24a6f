"""add_bam: BAM into any timm CNN, onto its weights, starting as the identity, for every tested family."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import bam_zoo
from bam_zoo.hub import push, save_pretrained
from huggingface_hub import hf_hub_download
from bam_zoo.models.placement import TESTED_FAMILIES, bottleneck_stages
from bam_zoo.training.cli import cli_main
from _helpers import randomise_bn
from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import write_imagefolder

try:
    from tests.hf_server import hub_env, hub_server  # noqa: F401
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from hf_server import hub_env, hub_server  # noqa: F401

FAMILIES = sorted(TESTED_FAMILIES.items())
IDS = [family for family, _ in FAMILIES]
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # not the global RNG: collection order


def _plain(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **kwargs).eval()
    randomise_bn(model)  # eval-mode identity must hold with non-trivial BatchNorm statistics
    return model


def _plain_weights(name: str, folder: Path) -> tuple[torch.nn.Module, Path]:
    model = _plain(name)
    path = folder / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.mark.parametrize("family, name", FAMILIES, ids=IDS)
def test_identity_start_on_plain_weights_loaded_strictly(family, name, tmp_path):
    """timm's own pretrained loading (``file=``) fills the backbone; the logits are the plain model's, bit for bit."""
    plain, path = _plain_weights(name, tmp_path)
    model = bam_zoo.create_model(name, pretrained=True, add_bam=True, num_classes=7,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=7)).eval()
    bams = bam_zoo.bam_modules(model)
    assert [n for n, _ in bams] == [f"{s}.bam" for s in bottleneck_stages(plain)] and len(bams) == 3
    state, plain_state = model.state_dict(), plain.state_dict()
    assert {k for k in state if ".bam." not in k} == set(plain_state)  # every plain key, under its own name
    assert all(torch.equal(state[k], v) for k, v in plain_state.items())
    with torch.no_grad():
        assert torch.equal(model(X), plain(X))
    # BAM really runs: with its scale switched on, every BAM is called exactly once and the logits move
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: calls.append(n)) for n, b in bams]
    for _, bam in bams:
        bam.gamma.data.fill_(0.5)
    with torch.no_grad():
        assert not torch.allclose(model(X), plain(X))
    assert sorted(calls) == sorted(n for n, _ in bams)
    for h in hooks:
        h.remove()
    # and the plain weights load strictly into the backbone after insertion too
    missing, unexpected = model.load_state_dict(plain_state, strict=False)
    # (torch leaves a missing BatchNorm step counter, num_batches_tracked, unreported)
    assert unexpected == [] and set(missing) == {k for k in state if ".bam." in k and "num_batches" not in k}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("family, name", FAMILIES, ids=IDS)
def test_gradients_reach_bam_from_the_first_step(family, name, seed):
    """A sane step (lr 0.05) on a batch of 4: at lr 0.5 the first gamma step could blow the features up until every
    sample looked alike and batch statistics zeroed the channel branch's gradient, depending on the input drawn."""
    torch.manual_seed(0)
    model = bam_zoo.create_model(name, add_bam=True, num_classes=7).train()
    bams = bam_zoo.bam_modules(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    for step in range(2):
        optimizer.zero_grad()
        model(batch).logsumexp(1).sum().backward()
        if step == 0:  # gamma = 0: only gamma can move, and it does
            assert all(b.gamma.grad.abs().sum() > 0 for _, b in bams)
        optimizer.step()
    # second step: the branches learn too, except where the gradient is zero in exact arithmetic
    dead = [f"{n}.{p}" for n, b in bams for p, t in b.named_parameters()
            if p not in _zero_gradient_by_design(b) and not t.grad.abs().sum() > 0]
    assert dead == []


def _zero_gradient_by_design(bam) -> set:
    """Parameters whose gradient is zero up to rounding: fc1.bias sits before a training-mode BatchNorm; in a
    one-channel spatial branch, a BatchNorm weight only scales a map that passes ReLU and a 1 -> 1 convolution
    into the next BatchNorm, which normalises the scale away."""
    names = {"channel_attn.fc1.bias"}
    body = bam.spatial_attn.body
    if body.conv_reduce.out_channels == 1:
        bns = [n for n, m in body.named_children() if isinstance(m, torch.nn.BatchNorm2d)]
        names |= {f"spatial_attn.body.{n}.weight" for n in bns[:-1]}
    return names


@pytest.mark.parametrize("name, why", [
    ("vit_tiny_patch16_224", "never downsamples"), ("swin_tiny_patch4_window7_224", "NHWC"),
    ("resnet18", "already has a BAM"),
])
def test_models_bam_cannot_refine_are_refused_in_one_line(name, why):
    model = timm.create_model(name)
    if why == "already has a BAM":
        bam_zoo.add_bam(model)
    with pytest.raises(ValueError, match=why) as error:
        bam_zoo.add_bam(model)
    assert "\n" not in str(error.value)


def test_stage_names_are_checked_and_explicit_stages_placed():
    model = bam_zoo.add_bam(timm.create_model("resnet18"), stages=["layer3"], dilation=2)
    assert [(n, b.spatial_attn.body.conv0.dilation) for n, b in bam_zoo.bam_modules(model)] == [("layer3.bam", (2, 2))]
    with pytest.raises(ValueError, match="no stage 'layer9'.*layer4"):
        bam_zoo.add_bam(timm.create_model("resnet18"), stages=["layer9"])
    with pytest.raises(ValueError, match="'auto' or a list"):
        bam_zoo.add_bam(timm.create_model("resnet18"), stages="layer1")


def test_insertion_keeps_the_callers_random_stream():
    torch.manual_seed(3)
    bam_zoo.add_bam(timm.create_model("resnet18"))
    after_insert = torch.rand(3)
    torch.manual_seed(3)
    timm.create_model("resnet18")
    assert torch.equal(after_insert, torch.rand(3))


def test_registered_architectures_are_the_same_mechanism_with_the_papers_block():
    for name in bam_zoo.list_models():
        model = bam_zoo.create_model(name, in_chans=3)
        twin = timm.create_model(name[len("bam_"):], in_chans=3)
        assert [n for n, _ in bam_zoo.bam_modules(model)] == [f"{s}.bam" for s in bottleneck_stages(twin)]
        assert all(b.gamma is None for _, b in bam_zoo.bam_modules(model))  # state dicts as shipped


@pytest.mark.parametrize("name", ["convnext_atto", "densenet121", "resnet18d"])
def test_timm_backbone_api_on_inserted_models(name):
    model = bam_zoo.create_model(name, add_bam=True, num_classes=7).eval()
    for _, bam in bam_zoo.bam_modules(model):
        bam.gamma.data.fill_(0.3)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(X), pre_logits=True)
        model.reset_classifier(0)
        assert torch.equal(model(X), pooled)
    headless = bam_zoo.create_model(name, add_bam=True, num_classes=0)
    assert headless(X).shape == pooled.shape
    torch.manual_seed(0)
    full = bam_zoo.create_model(name, add_bam=True).eval()
    torch.manual_seed(0)
    features = bam_zoo.create_model(name, add_bam=True, features_only=True).eval()
    assert [n for n, _ in bam_zoo.bam_modules(features)]  # the wrapper holds the BAMs
    for (_, a), (_, b) in zip(bam_zoo.bam_modules(full), bam_zoo.bam_modules(features)):
        a.gamma.data.fill_(0.3), b.gamma.data.fill_(0.3)
    stage_out = {}
    for n, b in bam_zoo.bam_modules(full):
        b.register_forward_hook(lambda m, i, o, n=n: stage_out.update({n[: -len(".bam")]: o}))
    with torch.no_grad():
        full(X)
        maps = dict(zip(features.feature_info.module_name(), features(X)))
    assert stage_out and all(torch.equal(maps[stage], out) for stage, out in stage_out.items())
    with bam_zoo.capture_attention(full) as maps:
        with torch.no_grad():
            full(X)
    assert len(maps) == 3 and all(m.dim() == 4 for m in maps.values())


@pytest.mark.parametrize("family, name", FAMILIES, ids=IDS)
def test_export_round_trip_rebuilds_the_inserted_model(family, name, tmp_path):
    plain, path = _plain_weights(name, tmp_path)
    model = bam_zoo.create_model(name, pretrained=True, add_bam=True, num_classes=7,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=7)).eval()
    for _, bam in bam_zoo.bam_modules(model):  # a trained-looking BAM, so the round trip is not the identity
        bam.gamma.data.normal_(0, 0.5)
    save_pretrained(model, tmp_path / "export", model_name=f"{name}.bam_test")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architecture"] == "bam_inserted" and config["model_args"]["base_model"] == name
    assert config["bam_zoo"]["inserted_into"] == name
    assert f"BAM inserted into {name}" in (tmp_path / "export" / "README.md").read_text()
    again = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(again(X), model(X))


@pytest.mark.slow
@pytest.mark.parametrize("family, name", FAMILIES, ids=IDS)
def test_two_step_cli_fine_tune_with_add_bam(family, name, tmp_path):
    plain, path = _plain_weights(name, tmp_path)
    data = write_imagefolder(tmp_path / "images", size=64)  # 64 px: every family downsamples 32x
    cli = cli_main([
        "fit", "--model.model_name", name, "--model.pretrained_file", str(path), "--model.add_bam", "true",
        "--model.lr", "0.01", "--data.class_path", "bam_zoo.training.data.ImageFolderDataModule",
        "--data.init_args.root", str(data), "--data.init_args.img_size", "64", "--data.init_args.batch_size", "4",
        "--data.init_args.num_workers", "0", "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
        "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    assert cli.trainer.global_step == 2
    gammas = [b.gamma for _, b in bam_zoo.bam_modules(cli.model.model)]
    assert len(gammas) == 3 and all(g.abs().sum() > 0 for g in gammas)  # BAM trained from zero
    config = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert config["model_args"]["base_model"] == name and config["model_args"]["num_classes"] == 3


def test_inserted_export_pushes_and_comes_back_from_the_hub(hub_env, tmp_path):
    """push -> hf-hub: through bam_zoo and timm, identical logits; the card names the plain weights."""
    plain, path = _plain_weights("resnet10t", tmp_path)
    model = bam_zoo.create_model("resnet10t", pretrained=True, add_bam=True, num_classes=7,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=7)).eval()
    for _, bam in bam_zoo.bam_modules(model):
        bam.gamma.data.normal_(0, 0.5)
    save_pretrained(model, tmp_path / "export", model_name="resnet10t.bam_test")
    repo_id = hub_env.repo_id()
    push(tmp_path / "export", repo_id)
    card = (Path(hf_hub_download(repo_id, "README.md"))).read_text()
    assert "BAM inserted into resnet10t" in card and f"hf-hub:{repo_id}" in card
    with torch.no_grad():
        for again in (bam_zoo.create_model(f"hf-hub:{repo_id}", pretrained=True),
                      timm.create_model(f"hf-hub:{repo_id}", pretrained=True)):
            assert torch.equal(again.eval()(X), model(X))
