"""Shipped tags as timm users load them: headless, with a new head, strict everywhere else, and from an
installed package that has no repository beside it."""
import subprocess
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

import bam_zoo
from bam_zoo.errors import WeightsNotFoundError
from bam_zoo.models import pretrained
from bam_zoo.models.pretrained import FASHION_MNIST_TAGS, mirror_root, strict_keys, weight_facts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """The repository's mirror serves the weights; no Hub request is tried."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", list(FASHION_MNIST_TAGS))
def test_headless_tag_gives_the_pooled_features_of_its_weights(name):
    full = bam_zoo.create_model(name, pretrained=True).eval()
    headless = bam_zoo.create_model(name, pretrained=True, num_classes=0).eval()
    backbone = headless.state_dict()
    assert "fc.weight" not in backbone and backbone.keys() == {k for k in full.state_dict() if not k.startswith("fc.")}
    for key, value in backbone.items():
        assert torch.equal(value, full.state_dict()[key]), key
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        features = headless(x)
        assert features.shape == (3, full.num_features)
        torch.testing.assert_close(features, full.forward_head(full.forward_features(x), pre_logits=True))


def test_new_head_is_initialised_and_the_backbone_loaded():
    full = bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True)
    five = bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True, num_classes=5)
    assert five.fc.weight.shape == (5, full.num_features)
    assert not torch.equal(five.fc.weight, full.fc.weight[:5])
    for key, value in five.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, full.state_dict()[key]), key


@pytest.mark.parametrize("num_classes", [0, 5, 10])
def test_keys_outside_the_head_stay_strict(num_classes):
    """Dropping the head must not let a stray or missing backbone key through."""
    weights = bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True).state_dict()
    model = bam_zoo.create_model("bam_resnet20.fmnist", num_classes=num_classes)
    with pytest.raises(Exception, match="bogus"):
        strict_keys({**weights, "bogus.weight": torch.zeros(1)}, model)
    missing = dict(weights)
    del missing["layer1.bam.channel_attn.fc1.weight"]
    with pytest.raises(Exception, match="layer1.bam.channel_attn.fc1.weight"):
        strict_keys(missing, model)
    kept = strict_keys(dict(weights), model)
    assert ("fc.weight" in kept) == (num_classes == 10)


def test_the_mirror_is_the_named_folder_else_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("BAM_ZOO_CHECKPOINTS", raising=False)
    assert mirror_root() == REPO / "checkpoints"
    monkeypatch.setenv("BAM_ZOO_CHECKPOINTS", str(tmp_path))
    assert mirror_root() == tmp_path


def test_without_hub_or_mirror_one_line_says_where_it_looked(monkeypatch):
    """As an installed package without BAM_ZOO_CHECKPOINTS: no checkout, so no mirror."""
    monkeypatch.setattr(pretrained, "mirror_root", lambda: None)
    with pytest.raises(WeightsNotFoundError) as info:
        bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True)
    message = str(info.value)
    assert "\n" not in message and info.value.__suppress_context__ and isinstance(info.value, FileNotFoundError)
    assert "HF_HUB_OFFLINE is set" in message and "no mirror folder is set" in message
    assert "set BAM_ZOO_CHECKPOINTS to a folder holding bam_resnet20.fmnist/model.safetensors" in message
    assert weight_facts("bam_resnet20.fmnist") == pretrained.WEIGHT_METADATA["bam_resnet20.fmnist"]  # no numbers


@pytest.mark.slow
def test_built_wheel_works_without_the_repository():
    """scripts/check_wheel.sh (CI runs it too): the wheel in a fresh venv loads a tag from a mirror folder."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "check_wheel.sh")], capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loads bam_resnet20.fmnist from BAM_ZOO_CHECKPOINTS" in proc.stdout
    assert "WeightsNotFoundError: No weights for bam_resnet20.fmnist" in proc.stdout
